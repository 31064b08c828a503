"""The native engine's synchronous core: add requests, run steps, emit outputs. Single-threaded by
design: only the engine thread (see `engine.py`) touches it, so no state here needs a lock."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from time import perf_counter

import torch

from kvrelay.kvbm.block_pool import BlockPool
from kvrelay.kvbm.cost_model import CostModel
from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.kvbm.fingerprint import model_fingerprint
from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.kvbm.tiers.disk import aligned_empty
from kvrelay.workers.engines.handoff import HandoffCounters, PullPlan, finish_pull, plan_pull
from kvrelay.workers.engines.native.batch import build_batch
from kvrelay.workers.engines.native.config import DTYPES
from kvrelay.workers.engines.native.kv_event_log import KvEventLog
from kvrelay.workers.engines.native.loader import load_model
from kvrelay.workers.engines.native.offload import OffloadTracker
from kvrelay.workers.engines.native.sampler import sample
from kvrelay.workers.engines.native.scheduler import Scheduler, SchedulerConfig
from kvrelay.workers.engines.native.sequence import Sequence, Status
from kvrelay.workers.engines.onboard import OnboardTicket, plan_onboard
from kvrelay.workers.protocol import (
    PREFILLED,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    KvLayout,
    RequestError,
)


class EngineOverloaded(EngineError):
    """The waiting queue is full; the client may retry later (HTTP 503)."""


@dataclass(frozen=True)
class NativeEngineConfig:
    model: str
    dtype: str = "auto"  # auto = the checkpoint's dtype
    device: str = "cpu"
    block_size: int = 16
    kv_cache_bytes: int = 256 << 20  # sizes the G1 pool when num_blocks is 0
    num_blocks: int = 0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_waiting: int = 1024
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    tiers: TierConfig | None = None  # lower tiers (G2/G3/G4) opened by NativeEngine; None = G1 only


class LLMEngine:
    def __init__(self, cfg: NativeEngineConfig):
        self.cfg = cfg
        dtype = None if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        self.model = load_model(cfg.model, dtype=dtype, device=cfg.device)
        m = self.model.cfg
        self.dtype = next(self.model.parameters()).dtype
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        block_bytes = m.num_layers * 2 * cfg.block_size * m.num_kv_heads * m.head_dim * itemsize
        num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_bytes // block_bytes)
        # Block-contiguous layout (DESIGN.md "KV layout"): one block = one contiguous byte range.
        shape = (num_blocks, m.num_layers, 2, cfg.block_size, m.num_kv_heads, m.head_dim)
        if torch.device(cfg.device).type == "cpu":  # 4 KiB-aligned: G3 reads/writes blocks in place (O_DIRECT)
            self.kv_cache = aligned_empty(num_blocks * block_bytes).view(self.dtype).view(shape).zero_()
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=cfg.device)
        self.events = KvEventLog()
        self.pool = BlockPool(num_blocks, on_evict=self.events.g1_removed)
        self.max_model_len = cfg.max_model_len or m.max_position_embeddings
        self.scheduler = Scheduler(SchedulerConfig(
            block_size=cfg.block_size, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs, max_waiting=cfg.max_waiting, max_model_len=self.max_model_len,
        ), self.pool, on_stored=self.events.g1_stored)
        self.fingerprint = model_fingerprint(cfg.model)
        self.eos = frozenset(m.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}
        self.held: set[str] = set()  # prefill role: parked request ids (their blocks stay allocated)
        self.handoff = HandoffCounters()
        self.offload: OffloadTracker | None = None  # set by enable_tiers
        self.cost: CostModel | None = None
        self.loading_aborted: dict[str, Sequence] = {}  # aborted while PULLING: blocks freed on report
        self.onboarded_blocks = 0
        self.reonboarded_blocks = 0  # of those, blocks of preempted sequences
        self.tickets: list[tuple[str, OnboardTicket]] = []  # see take_tickets
        self.failed: list[str] = []  # see take_failed
        self._arrivals = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0

    # -- requests ---------------------------------------------------------------------------------------
    def enable_tiers(self, mode: str, cost: CostModel) -> None:
        """Lower tiers are open: offload blocks to them (`take_offload`) and weigh onboards by `cost`."""
        self.offload = OffloadTracker(self.pool, mode, max_pinned=self.pool.num_blocks // 4)
        self.cost = cost
        self.scheduler.track_preempted = True

    def add_request(self, req: EngineRequest, hold: bool = False,
                    in_lower: Seq[str | None] | None = None) -> PullPlan | OnboardTicket | None:
        """Queue a request. `hold`: prefill role (park after the first token, blocks kept). A request with
        a `kv_handle` gets its blocks now; the returned plan says what to pull into them. `in_lower`
        (per leading prompt block: the lower tier holding it, or None) may return a ticket to onboard."""
        try:
            req.sampling.validate()
        except RequestError as e:
            raise EngineError(str(e)) from None
        n = len(req.prompt_token_ids)
        if n == 0:
            raise EngineError("the prompt must contain at least one token")
        if n >= self.max_model_len:
            raise EngineError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} "
                              f"and at least one must be generated")
        vocab = self.model.cfg.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise EngineError(f"prompt token ids must be in [0, {vocab})")
        if -(-(n + 1) // self.cfg.block_size) > self.pool.num_blocks:
            raise EngineError(f"the prompt needs more KV blocks than this worker has ({self.pool.num_blocks})")
        if req.request_id in self.seqs:
            raise EngineError(f"duplicate request id {req.request_id!r}")
        if len(self.scheduler.waiting) + len(self.scheduler.looking) >= self.cfg.max_waiting:
            raise EngineOverloaded(f"server busy: {self.cfg.max_waiting} requests already waiting")
        hasher = BlockHasher(self.cfg.block_size, root_hash(self.fingerprint, req.cache_salt),
                             req.lora_name.encode())
        seq = Sequence(req.request_id, req.prompt_token_ids, req.sampling, hasher, self._arrivals)
        seq.hold_kv = hold
        self._arrivals += 1
        self.seqs[seq.request_id] = seq
        self.scheduler.waiting.append(seq)
        self.prompt_tokens += n
        if req.kv_handle is None:
            if in_lower and any(in_lower) and self.cost is not None:
                return plan_onboard(self.scheduler, seq, in_lower, self.cost)
            return None
        seq.continue_from(req.kv_handle.first_token)
        return plan_pull(self.scheduler, seq, req.kv_handle, self.fingerprint, self.handoff)

    def pulled(self, request_id: str, plan: PullPlan, ok: bool) -> None:
        if not self._loader_reported(request_id):
            finish_pull(self.scheduler, self.seqs.get(request_id), plan, ok, self.handoff)

    def onboarded(self, request_id: str, ticket: OnboardTicket, ok: list[bool]) -> None:
        seq = self.seqs.get(request_id)
        if not self._loader_reported(request_id) and seq is not None:
            again = seq.admitted
            n = self.scheduler.onboarded(seq, ticket.fresh_idx, ok)
            self.onboarded_blocks += n
            self.reonboarded_blocks += n if again else 0

    def take_lookups(self) -> list[tuple[str, list[int]]]:
        """(request id, block hashes) of preempted sequences parked until a lower-tier lookup answers
        (`replan`); every one must be answered, even with no hits, or it stays parked."""
        lookups, self.scheduler.lookups = self.scheduler.lookups, []
        return lookups

    def replan(self, request_id: str, in_lower: Seq[str | None]) -> None:
        """A parked sequence's lookup answered: it waits at the head again, with the answer as a hint
        for `_onboard_head` (it was preempted for lack of blocks: they may be short now)."""
        seq = self.seqs.get(request_id)
        if seq is not None and self.scheduler.end_lookup(seq) and any(in_lower):
            seq.lower_hint = list(in_lower)

    def take_tickets(self) -> list[tuple[str, OnboardTicket]]:
        """Loads planned for preempted sequences since the last call, for the loop to run."""
        tickets, self.tickets = self.tickets, []
        return tickets

    def _onboard_head(self) -> None:
        """Before scheduling: if the head of the queue is a preempted sequence with blocks in a lower
        tier, load them (when blocks allow and the cost model agrees) instead of recomputing them."""
        waiting = self.scheduler.waiting
        if not waiting or waiting[0].lower_hint is None or self.cost is None:
            return
        seq = waiting[0]
        ticket = plan_onboard(self.scheduler, seq, seq.lower_hint, self.cost)
        if ticket is not None:
            seq.lower_hint = None
            self.tickets.append((seq.request_id, ticket))

    def _loader_reported(self, request_id: str) -> bool:
        """True if the request was aborted while loading: its blocks are free only now."""
        seq = self.loading_aborted.pop(request_id, None)
        if seq is not None:
            self.scheduler.release_blocks(seq)
        return seq is not None

    def abort(self, request_id: str) -> EngineOutput | None:
        """End a request in any state (a held prefill included) and free its blocks (a PULLING one's
        once its loader reports: it may still be writing them)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.held.discard(request_id)
        if not self.scheduler.finish(seq, "abort"):
            self.loading_aborted[request_id] = seq
        return seq.take_output()

    def take_offload(self) -> tuple[list[int], list[int]] | None:
        return self.offload.take() if self.offload is not None else None

    def offloaded(self, block_ids: list[int]) -> None:
        if self.offload is not None:
            self.offload.done(block_ids)

    def take_failed(self) -> list[str]:
        """Requests whose sampling failed since the last call (already aborted, blocks freed)."""
        failed, self.failed = self.failed, []
        return failed

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # -- one step ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[EngineOutput]:
        self._onboard_head()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        t0 = perf_counter()
        batch = build_batch(scheduled, self.cfg.block_size, self.cfg.device)
        logits = self.model(batch.input_ids, batch.meta, self.kv_cache, batch.logits_index)
        samplers = batch.sample_seqs
        tokens, logprobs, failed = sample(logits, [s.sampling for s in samplers],
                                          [s.next_generator() for s in samplers])
        for seq, n in scheduled:
            self.scheduler.commit(seq, n)
        if self.cost is not None:
            self.cost.observe_prefill(sum(n for _, n in scheduled if n > 1), perf_counter() - t0)
        outputs = []
        bad = {samplers[i].request_id for i in failed}
        for rid in bad:  # only the rows that failed end; the rest of the batch goes on
            self.abort(rid)
            self.failed.append(rid)
        for i, seq in enumerate(samplers):
            if seq.request_id in bad:
                continue
            seq.append(tokens[i], logprobs[i] if logprobs is not None and seq.sampling.logprobs else None)
            self.generated_tokens += 1
            reason = seq.stop_reason(tokens[i], self.eos, self.max_model_len)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.seqs[seq.request_id]
            elif seq.hold_kv:
                self.scheduler.park(seq)
                self.held.add(seq.request_id)
                seq.finish_reason = PREFILLED
            outputs.append(seq.take_output())
        return outputs

    # -- KV events (DESIGN.md "Events"), every tier numbered in self.events ------------------------------
    def held_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.seqs[request_id].blocks]

    def drain_kv_events(self) -> list[KvEvent]:
        return self.events.drain()

    def kv_snapshot(self) -> KvSnapshot:
        return self.events.snapshot(self.pool.cached)

    # -- introspection ----------------------------------------------------------------------------------
    def kv_layout(self) -> KvLayout:
        m = self.model.cfg
        return KvLayout(layout="block_contiguous", num_blocks=self.pool.num_blocks, num_layers=m.num_layers,
                        block_size=self.cfg.block_size, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                        dtype=str(self.dtype).removeprefix("torch."), device=str(self.kv_cache.device))

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            running=len(s.running), waiting=len(s.waiting) + len(s.looking),
            used_blocks=self.pool.num_blocks - self.pool.num_free, free_blocks=self.pool.num_free,
            total_blocks=self.pool.num_blocks, prefix_hit_tokens=s.prefix_hit_tokens,
            prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
            preemptions=s.preemptions, held_requests=len(self.held), remote_prefills=self.handoff.remote_prefills,
            pulled_blocks=self.handoff.pulled_blocks, pull_failures=self.handoff.pull_failures,
            onboarded_blocks=self.onboarded_blocks, reonboarded_blocks=self.reonboarded_blocks,
            offload_pinned=self.offload.pinned if self.offload is not None else 0,
            offload_skipped=self.offload.skipped if self.offload is not None else 0,
        )


__all__ = ["EngineOverloaded", "LLMEngine", "NativeEngineConfig", "Status"]

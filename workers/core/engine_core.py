"""`EngineCore`: the engine-neutral, synchronous core: add requests, run steps, emit outputs. One
thread (or one event loop) owns it, so no state here needs a lock. What is engine-specific is the
`Executor` (executor.py) that runs a scheduled step; KV that the steps do not compute comes through
one door (`self.door`, kv_sources/: the prefill handoff, the lower tiers). Everything else, from
admission checks to KV events, is here once for every engine (workers/README.md).

Invariants:
- A request is checked whole before it is queued: a refused one raises `EngineError` and holds nothing.
- A step commits only sequences still RUNNING when it completes (one aborted meanwhile, possible when
  the step runs outside the owner's thread of control, was finished and freed at once).
- A sequence that would need more blocks than the whole pool for its next token stops with "length":
  it could never be scheduled again.
- Blocks a source is filling are freed only once it reported, even if the request ended meanwhile
  (`loading_aborted`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.workers.api.errors import EngineError, EngineOverloaded
from kvrelay.workers.api.messages import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestError,
    SamplingParams,
)
from kvrelay.workers.api.prefill import PREFILLED
from kvrelay.workers.core.block_leases import BlockLeases
from kvrelay.workers.core.executor import Executor, Scheduled, StepResult
from kvrelay.workers.core.kv_cache import KvCache
from kvrelay.workers.core.kv_sources.kv_door import KvDoor
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.core.scheduler import Scheduler
from kvrelay.workers.core.sequence import Sequence, Status

NewSequence = Callable[[str, list[int], SamplingParams, BlockHasher, int], Sequence]


class EngineCore:
    def __init__(self, limits: EngineLimits, num_blocks: int, executor: Executor, fingerprint: str,
                 eos_ids: Iterable[int], vocab_limit: int, new_sequence: NewSequence = Sequence):
        if limits.problems() or not limits.max_model_len:
            raise ValueError(f"engine limits: {'; '.join(limits.problems()) or 'max_model_len must be resolved'}")
        self.executor = executor
        self.limits = limits
        self.fingerprint = fingerprint  # root of every block hash
        self.eos = frozenset(eos_ids)
        self.vocab_limit = vocab_limit  # prompt ids must be in [0, vocab_limit)
        self.max_model_len = limits.max_model_len
        self.block_size = limits.block_size
        self.kv = KvCache(num_blocks)
        self.pool = self.kv.pool
        self.door = KvDoor()
        self.scheduler = Scheduler(limits, self.kv, self.door)
        self._new_sequence = new_sequence
        self.seqs: dict[str, Sequence] = {}
        self.hold: set[str] = set()  # prefill role: park these after their first token, blocks kept
        self.held: set[str] = set()  # parked request ids (their blocks stay allocated until aborted)
        self.leases = BlockLeases(self.kv)  # G1 blocks lent to peers' pulls (freed by `abort(lease id)`)
        self.loading_aborted: dict[str, Sequence] = {}  # ended while a source filled its blocks
        self.failed: list[str] = []  # see take_failed
        self._arrivals = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prefill_tokens_computed = 0  # prompt tokens computed, and the seconds of the steps that did
        self.prefill_seconds = 0.0

    # -- requests ---------------------------------------------------------------------------------------
    def add_request(self, req: EngineRequest, hold: bool = False, hints: dict[str, Any] | None = None) -> None:
        """Queue a request. `hold`: prefill role (park after the first token, blocks kept). `hints`: per
        KV source, what its loop half found before (a request with a `kv_handle` continues from the
        handle's first token, its prompt's KV pulled by the handoff source)."""
        self._check(req)
        hasher = BlockHasher(self.block_size, root_hash(self.fingerprint, req.cache_salt), req.lora_name.encode())
        seq = self._new_sequence(req.request_id, req.prompt_token_ids, req.sampling, hasher, self._arrivals)
        seq.num_prior_output = req.prior_output_tokens
        self._arrivals += 1
        self.seqs[seq.request_id] = seq
        if hold:
            self.hold.add(seq.request_id)
        self.prompt_tokens += len(req.prompt_token_ids)
        self.door.add(seq, req, hints or {})
        self.scheduler.add(seq)

    def _check(self, req: EngineRequest) -> None:
        try:
            req.sampling.validate(self.vocab_limit)  # logit_bias and stop ids index the logits
        except RequestError as e:
            raise EngineError(str(e)) from None
        prompt, n = req.prompt_token_ids, len(req.prompt_token_ids)
        if n == 0:
            raise EngineError("the prompt must contain at least one token")
        if n >= self.max_model_len:
            raise EngineError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} "
                              f"and at least one must be generated")
        if not 0 <= req.prior_output_tokens < n:
            raise EngineError("prior_output_tokens must be in [0, the prompt's length)")
        if min(prompt) < 0 or max(prompt) >= self.vocab_limit:
            raise EngineError(f"prompt token ids must be in [0, {self.vocab_limit})")
        if -(-(n + 1) // self.block_size) > self.pool.num_blocks:
            raise EngineError(f"the prompt needs more KV blocks than this worker has ({self.pool.num_blocks})")
        if req.request_id in self.seqs:
            raise EngineError(f"duplicate request id {req.request_id!r}")
        if len(self.scheduler.waiting) + len(self.scheduler.asking) >= self.limits.max_waiting:
            raise EngineOverloaded(f"server busy: {self.limits.max_waiting} requests already waiting")

    # -- what KV sources report -------------------------------------------------------------------------
    def kv_loaded(self, request_id: str, ok: list[bool]) -> None:
        """A source's load into a request's blocks ended (`ok` per block it filled)."""
        seq = self.loading_aborted.pop(request_id, None)
        if seq is not None:  # it ended while loading: its blocks are free only now
            self.door.dropped(request_id)
            self.scheduler.release_blocks(seq)
            return
        seq = self.seqs.get(request_id)
        if seq is None:
            return
        fresh, kept = self.scheduler.kv_arrived(seq, ok)
        if fresh:
            self.door.arrived(seq, fresh, kept)

    def kv_answered(self, source: str, request_id: str, answer: Any) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self.door.answered(source, request_id, answer)
            self.scheduler.kv_answered(seq)

    def kv_saved(self, source: str, block_ids: list[int]) -> None:
        self.door.saved(source, block_ids)

    def take_failed(self) -> list[str]:
        """Requests whose sampling failed since the last call (already aborted, blocks freed)."""
        failed, self.failed = self.failed, []
        return failed

    def abort(self, request_id: str) -> EngineOutput | None:
        """End a request in any state (a held prefill included) and free its blocks (a loading one's once
        its source reports: it may still be writing them). A lease id frees the lease's blocks."""
        if self.leases.release(request_id):
            return None
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self._end(seq, "abort")
        return seq.take_output()

    def _end(self, seq: Sequence, reason: str) -> None:
        rid = seq.request_id
        self.hold.discard(rid)
        self.held.discard(rid)
        if not self.scheduler.finish(seq, reason):
            self.loading_aborted[rid] = seq
        self.door.finished(rid)

    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.running or s.waiting or s.ready)

    # -- one step ---------------------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        """Schedule, execute and complete one step (the executor's time is the step's)."""
        scheduled = self.schedule()
        if not scheduled:
            return []
        t0 = perf_counter()
        result = self.executor.execute(scheduled)
        return self.complete(scheduled, result, perf_counter() - t0)

    def schedule(self) -> Scheduled:
        return self.scheduler.schedule()

    def complete(self, scheduled: Scheduled, result: StepResult, seconds: float) -> list[EngineOutput]:
        """The step ran in `seconds`: commit its KV, append the sampled tokens, stop, park or go on."""
        running, commit = Status.RUNNING, self.scheduler.commit
        for seq, n in scheduled:
            if seq.status is running:  # else aborted meanwhile: freed already, publish nothing
                commit(seq, n)
        prefill = sum(n for _, n in scheduled if n > 1)
        if prefill:
            self.prefill_tokens_computed += prefill
            self.prefill_seconds += seconds
        self.door.observe_step(prefill, seconds)
        for i in result.failed:  # only the rows that failed end (aborted: blocks freed); the batch goes on
            rid = result.seqs[i].request_id
            if self.abort(rid) is not None:
                self.failed.append(rid)
        outputs = []
        max_tokens = self.pool.num_blocks * self.block_size  # the most any sequence can ever hold
        logprobs = result.logprobs if result.logprobs is not None else [None] * len(result.seqs)
        tops = result.top_logprobs if result.top_logprobs is not None else [None] * len(result.seqs)
        complete = set(result.stopped)
        for i, (seq, token, logprob, top) in enumerate(zip(result.seqs, result.tokens, logprobs, tops, strict=True)):
            if seq.status is not running:
                continue
            p = seq.sampling
            seq.append(token, logprob if p.logprobs else None, top if p.top_logprobs else None)
            self.generated_tokens += 1
            reason = seq.stop_reason(token, self.eos, self.max_model_len)
            if reason is None and i in complete:
                reason = "stop"  # its grammar is complete: nothing may follow
            if reason is None and seq.num_tokens + 1 > max_tokens:
                reason = "length"  # the next token would not fit even the whole pool: stop, never livelock
            if reason is not None:
                del self.seqs[seq.request_id]
                self._end(seq, reason)
            elif seq.request_id in self.hold:
                self.hold.discard(seq.request_id)
                self.scheduler.park(seq)
                self.held.add(seq.request_id)
                seq.finish_reason = PREFILLED
            outputs.append(seq.take_output())
        return outputs

    # -- KV events (docs/ARCHITECTURE.md "Events"), every tier numbered in one log ----------------------------------
    def held_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.seqs[request_id].blocks]

    def drain_kv_events(self) -> list[KvEvent]:
        return self.kv.drain_events()

    def kv_snapshot(self) -> KvSnapshot:
        return self.kv.snapshot()

    def stats(self) -> EngineStats:
        s, c = self.scheduler, self.door.counters()
        return EngineStats(
            running=len(s.running), waiting=len(s.waiting) + len(s.asking) + len(s.ready),
            used_blocks=self.pool.num_blocks - self.pool.num_free, free_blocks=self.pool.num_free,
            total_blocks=self.pool.num_blocks, prefix_hit_tokens=s.prefix_hit_tokens,
            prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
            preemptions=s.preemptions, held_requests=len(self.held),
            remote_prefills=c.get("remote_prefills", 0), pulled_blocks=c.get("pulled_blocks", 0),
            pull_failures=c.get("pull_failures", 0), onboarded_blocks=c.get("onboarded_blocks", 0),
            reonboarded_blocks=c.get("reonboarded_blocks", 0), offload_pinned=c.get("offload_pinned", 0),
            offload_skipped=c.get("offload_skipped", 0), peer_asked=c.get("peer_asked", 0),
            peer_pulled_blocks=c.get("peer_pulled_blocks", 0), peer_pull_failures=c.get("peer_failures", 0),
            peer_fallbacks=c.get("peer_fallbacks", 0), peer_followed=c.get("peer_followed", 0),
            peer_lent_blocks=self.leases.lent_blocks,
            peer_lease_pinned=self.leases.pinned, peer_lent_from_g2=self.leases.lent_from_g2,
            prefill_tokens_computed=self.prefill_tokens_computed,
            prefill_seconds=self.prefill_seconds)

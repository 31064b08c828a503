"""`EngineCore`: the engine-neutral, synchronous core: add requests, run steps, emit outputs. One
thread (or one event loop) owns it, so no state here needs a lock. What is engine-specific is the
`Executor` (executor.py) that runs a scheduled step; everything else, from admission checks to
handoff, onboarding and KV events, is here once for every engine (workers/README.md).

Invariants:
- A request is checked whole before it is queued: a refused one raises `EngineError` and holds nothing.
- A step commits only sequences still RUNNING when it completes (one aborted meanwhile, possible when
  the step runs outside the owner's thread of control, was finished and freed at once).
- A sequence that would need more blocks than the whole pool for its next token stops with "length":
  it could never be scheduled again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from time import perf_counter

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.workers.api.messages import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestError,
    SamplingParams,
)
from kvrelay.workers.core.errors import EngineError, EngineOverloaded
from kvrelay.workers.core.executor import Executor, Scheduled, StepResult
from kvrelay.workers.core.handoff import HandoffCounters, PullPlan, finish_pull, plan_pull
from kvrelay.workers.core.kv_cache import KvCache
from kvrelay.workers.core.onboard import OnboardTicket, plan_onboard
from kvrelay.workers.core.scheduler import Scheduler, SchedulerConfig
from kvrelay.workers.core.sequence import PREFILLED, Sequence, Status

NewSequence = Callable[[str, list[int], SamplingParams, BlockHasher, int], Sequence]


class EngineCore:
    def __init__(self, sched: SchedulerConfig, num_blocks: int, executor: Executor, fingerprint: str,
                 eos_ids: Iterable[int], vocab_limit: int, new_sequence: NewSequence = Sequence):
        self.executor = executor
        self.fingerprint = fingerprint  # root of every block hash
        self.eos = frozenset(eos_ids)
        self.vocab_limit = vocab_limit  # prompt ids must be in [0, vocab_limit)
        self.max_model_len = sched.max_model_len
        self.block_size = sched.block_size
        self.max_waiting = sched.max_waiting
        self.kv = KvCache(num_blocks)
        self.pool = self.kv.pool
        self.scheduler = Scheduler(sched, self.kv)
        self._new_sequence = new_sequence
        self.seqs: dict[str, Sequence] = {}
        self.held: set[str] = set()  # prefill role: parked request ids (their blocks stay allocated)
        self.handoff = HandoffCounters()
        self.cost: CostModel | None = None  # set by enable_tiers
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
        self.kv.enable_offload(mode)
        self.cost = cost
        self.scheduler.track_preempted = True

    def add_request(self, req: EngineRequest, hold: bool = False,
                    in_lower: Seq[str | None] | None = None) -> PullPlan | OnboardTicket | None:
        """Queue a request. `hold`: prefill role (park after the first token, blocks kept). A request with
        a `kv_handle` gets its blocks now; the returned plan says what to pull into them. `in_lower`
        (per leading prompt block: the lower tier holding it, or None) may return a ticket to onboard."""
        self._check(req)
        n = len(req.prompt_token_ids)
        hasher = BlockHasher(self.block_size, root_hash(self.fingerprint, req.cache_salt), req.lora_name.encode())
        seq = self._new_sequence(req.request_id, req.prompt_token_ids, req.sampling, hasher, self._arrivals)
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

    def _check(self, req: EngineRequest) -> None:
        try:
            req.sampling.validate()
        except RequestError as e:
            raise EngineError(str(e)) from None
        prompt, n = req.prompt_token_ids, len(req.prompt_token_ids)
        if n == 0:
            raise EngineError("the prompt must contain at least one token")
        if n >= self.max_model_len:
            raise EngineError(f"the prompt has {n} tokens; this model's context is {self.max_model_len} "
                              f"and at least one must be generated")
        if min(prompt) < 0 or max(prompt) >= self.vocab_limit:
            raise EngineError(f"prompt token ids must be in [0, {self.vocab_limit})")
        if -(-(n + 1) // self.block_size) > self.pool.num_blocks:
            raise EngineError(f"the prompt needs more KV blocks than this worker has ({self.pool.num_blocks})")
        if req.request_id in self.seqs:
            raise EngineError(f"duplicate request id {req.request_id!r}")
        if len(self.scheduler.waiting) + len(self.scheduler.looking) >= self.max_waiting:
            raise EngineOverloaded(f"server busy: {self.max_waiting} requests already waiting")

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

    def take_failed(self) -> list[str]:
        """Requests whose sampling failed since the last call (already aborted, blocks freed)."""
        failed, self.failed = self.failed, []
        return failed

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

    @property
    def offload(self):  # the OffloadTracker, once tiers are enabled
        return self.kv.offload

    def take_offload(self) -> tuple[list[int], list[int]] | None:
        return self.kv.take_offload()

    def offloaded(self, block_ids: list[int]) -> None:
        self.kv.offloaded(block_ids)

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self.scheduler.ready)

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
        self._onboard_head()
        return self.scheduler.schedule()

    def complete(self, scheduled: Scheduled, result: StepResult, seconds: float) -> list[EngineOutput]:
        """The step ran in `seconds`: commit its KV, append the sampled tokens, stop, park or go on."""
        running, commit = Status.RUNNING, self.scheduler.commit
        for seq, n in scheduled:
            if seq.status is running:  # else aborted meanwhile: freed already, publish nothing
                commit(seq, n)
        if self.cost is not None:
            self.cost.observe_prefill(sum(n for _, n in scheduled if n > 1), seconds)
        for i in result.failed:  # only the rows that failed end (aborted: blocks freed); the batch goes on
            rid = result.seqs[i].request_id
            if self.abort(rid) is not None:
                self.failed.append(rid)
        outputs = []
        max_tokens = self.pool.num_blocks * self.block_size  # the most any sequence can ever hold
        logprobs = result.logprobs if result.logprobs is not None else [None] * len(result.seqs)
        for seq, token, logprob in zip(result.seqs, result.tokens, logprobs, strict=True):
            if seq.status is not running:
                continue
            seq.append(token, logprob if seq.sampling.logprobs else None)
            self.generated_tokens += 1
            reason = seq.stop_reason(token, self.eos, self.max_model_len)
            if reason is None and seq.num_tokens + 1 > max_tokens:
                reason = "length"  # the next token would not fit even the whole pool: stop, never livelock
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.seqs[seq.request_id]
            elif seq.hold_kv:
                self.scheduler.park(seq)
                self.held.add(seq.request_id)
                seq.finish_reason = PREFILLED
            outputs.append(seq.take_output())
        return outputs

    # -- KV events (DESIGN.md "Events"), every tier numbered in one log ----------------------------------
    def held_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.seqs[request_id].blocks]

    def drain_kv_events(self) -> list[KvEvent]:
        return self.kv.drain_events()

    def kv_snapshot(self) -> KvSnapshot:
        return self.kv.snapshot()

    def stats(self) -> EngineStats:
        s, offload = self.scheduler, self.kv.offload
        return EngineStats(
            running=len(s.running), waiting=len(s.waiting) + len(s.looking) + len(s.ready),
            used_blocks=self.pool.num_blocks - self.pool.num_free, free_blocks=self.pool.num_free,
            total_blocks=self.pool.num_blocks, prefix_hit_tokens=s.prefix_hit_tokens,
            prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
            preemptions=s.preemptions, held_requests=len(self.held), remote_prefills=self.handoff.remote_prefills,
            pulled_blocks=self.handoff.pulled_blocks, pull_failures=self.handoff.pull_failures,
            onboarded_blocks=self.onboarded_blocks, reonboarded_blocks=self.reonboarded_blocks,
            offload_pinned=offload.pinned if offload is not None else 0,
            offload_skipped=offload.skipped if offload is not None else 0,
        )

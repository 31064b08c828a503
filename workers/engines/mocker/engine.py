"""`MockerEngine`: an `Engine` that schedules like the native engine but computes nothing.

Real parts: the native `Scheduler` (continuous batching, chunked prefill, preemption, prefix hits),
a `BlockPool` with prefix cache and LRU, the shared block hashing, KV events and stats. Simulated
parts: the step time (`TimingModel`, slept as modeled / speedup) and the tokens (`tokens.py`).

One asyncio task runs the steps; everything else runs on the same event loop, so no state needs a
lock. Invariants:
- A step is scheduled, slept, then committed. A request aborted while its step sleeps is finished at
  once (its blocks freed) and skipped at commit: nothing is ever published from a released block.
- KV events are handed to the sink synchronously, in event_id order, after each schedule and each
  commit, and before `kv_snapshot` reads the pool: the events handed out always describe exactly
  `pool.cached`.
- Every request that entered `generate` ends with exactly one final output or one exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from kvrelay.kvbm.block_pool import BlockPool
from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.kvbm.fingerprint import model_fingerprint
from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.workers.core.handoff import HandoffCounters, PullPlan, finish_pull, plan_pull
from kvrelay.workers.core.scheduler import Scheduler, SchedulerConfig
from kvrelay.workers.core.sequence import Status
from kvrelay.workers.engines.mocker.config import MockerConfig, ModelInfo
from kvrelay.workers.engines.mocker.kv_events import KvEventLog
from kvrelay.workers.engines.mocker.timing import TimingModel
from kvrelay.workers.engines.mocker.tokens import MockSequence, TokenSource
from kvrelay.workers.protocol import (
    PREFILLED,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    KvLayout,
    KvPuller,
    PrefillResult,
    RequestError,
)

log = logging.getLogger(__name__)


class EngineOverloaded(EngineError):
    """The waiting queue is full. Same class name as the native engine's: the frontend maps it to 503."""


class MockerEngine:
    def __init__(self, cfg: MockerConfig):
        cfg.validate()
        self.cfg = cfg
        self.info = ModelInfo.from_dir(cfg.model)
        # Never equal to a native engine's fingerprint: mocked KV must not look like real KV.
        self.fingerprint = f"mocker-{model_fingerprint(cfg.model)}"
        self.max_model_len = cfg.max_model_len
        self.timing = TimingModel(cfg)
        vocab = cfg.vocab_size or self.info.vocab_size
        self.tokens = TokenSource(vocab, self.info.excluded_ids, self.info.eos_ids, cfg.eos_probability)
        self._id_limit = max(vocab, max(self.info.excluded_ids, default=-1) + 1)  # prompts may hold specials
        self.events = KvEventLog()
        self.pool = BlockPool(cfg.num_blocks, on_evict=self.events.removed)
        self.scheduler = Scheduler(SchedulerConfig(
            block_size=cfg.block_size, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs, max_waiting=cfg.max_waiting, max_model_len=cfg.max_model_len,
        ), self.pool, on_stored=self.events.stored)
        self.seqs: dict[str, MockSequence] = {}
        self._streams: dict[str, asyncio.Queue[EngineOutput | PrefillResult | Exception]] = {}
        self.held: set[str] = set()  # prefill role: parked request ids
        self.handoff = HandoffCounters()
        self._puller: KvPuller | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._arrivals = self.prompt_tokens = self.generated_tokens = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kvrelay-mocker")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._fail_all(EngineError("engine shut down"))

    # -- Engine protocol --------------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._task is None:
            raise EngineError("engine is not running")
        if request.kv_handle is not None and self._puller is None:
            raise EngineError("this worker cannot take a KV handle (no KV puller)")
        plan = self._add(request)  # raises EngineError before any output
        rid = request.request_id
        queue: asyncio.Queue[EngineOutput | PrefillResult | Exception] = asyncio.Queue()
        self._streams[rid] = queue
        self._wake.set()
        finished = False
        try:
            if plan is not None and request.kv_handle is not None and self._puller is not None:
                ok = await self._puller.pull(request.kv_handle, plan.local_block_ids, plan.start)
                finish_pull(self.scheduler, self.seqs.get(rid), plan, ok, self.handoff)
                self._wake.set()
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                assert isinstance(item, EngineOutput)
                finished = item.finish_reason is not None
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer left early: free the request's blocks now
                self._abort(rid)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        if self._task is None:
            raise EngineError("engine is not running")
        self._add(request, hold=True)
        rid = request.request_id
        queue: asyncio.Queue[EngineOutput | PrefillResult | Exception] = asyncio.Queue()
        self._streams[rid] = queue
        self._wake.set()
        done = False
        try:
            item = await queue.get()
            done = True
            if isinstance(item, Exception):
                raise item
            return item if isinstance(item, PrefillResult) else PrefillResult(item, [])
        finally:
            self._streams.pop(rid, None)
            if not done:
                self._abort(rid)

    def set_kv_puller(self, puller: KvPuller) -> None:
        self._puller = puller

    def kv_pool(self) -> None:
        return None  # nothing real to transfer: the puller simulates the link

    def subscribe_kv_events(self, sink: Callable[[list[KvEvent]], None]) -> None:
        """`sink` is called on this event loop with each step's KV events, in event_id order."""
        self.events.sink = sink

    async def kv_snapshot(self) -> KvSnapshot:
        self.events.flush()  # every event up to last_event_id reaches the sink first
        return KvSnapshot(worker_id="", last_event_id=self.events.last_event_id,
                          tiers={"G1": list(self.pool.cached)})

    def kv_layout(self) -> KvLayout:
        i = self.info
        return KvLayout(layout="block_contiguous", num_blocks=self.pool.num_blocks, num_layers=i.num_layers,
                        block_size=self.cfg.block_size, num_kv_heads=i.num_kv_heads, head_dim=i.head_dim,
                        dtype=i.dtype, device="mock")

    def stats(self) -> EngineStats:
        s, p = self.scheduler, self.pool
        return EngineStats(running=len(s.running), waiting=len(s.waiting),
                           used_blocks=p.num_blocks - p.num_free, free_blocks=p.num_free, total_blocks=p.num_blocks,
                           prefix_hit_tokens=s.prefix_hit_tokens, prompt_tokens=self.prompt_tokens,
                           generated_tokens=self.generated_tokens, preemptions=s.preemptions,
                           held_requests=len(self.held), remote_prefills=self.handoff.remote_prefills,
                           pulled_blocks=self.handoff.pulled_blocks, pull_failures=self.handoff.pull_failures)

    def simulated_transfer_seconds(self, num_blocks: int) -> float:
        """Wall seconds (speedup applied) to move `num_blocks` KV blocks at `transfer_gbps` (the
        simulated prefill -> decode handoff; see workers/kv_handoff.py SimulatedPuller)."""
        return self.timing.wall(self.timing.transfer_seconds(num_blocks * self.kv_layout().block_bytes))

    # -- requests ---------------------------------------------------------------------------------------
    def _add(self, req: EngineRequest, hold: bool = False) -> PullPlan | None:
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
        if min(prompt) < 0 or max(prompt) >= self._id_limit:
            raise EngineError(f"prompt token ids must be in [0, {self._id_limit})")
        if -(-(n + 1) // self.cfg.block_size) > self.pool.num_blocks:
            raise EngineError(f"the prompt needs more KV blocks than this worker has "
                              f"({self.pool.num_blocks})")
        if req.request_id in self.seqs:
            raise EngineError(f"duplicate request id {req.request_id!r}")
        if len(self.scheduler.waiting) >= self.cfg.max_waiting:
            raise EngineOverloaded(f"server busy: {self.cfg.max_waiting} requests already waiting")
        root = root_hash(self.fingerprint, req.cache_salt)
        hasher = BlockHasher(self.cfg.block_size, root, req.lora_name.encode())
        seq = MockSequence(req.request_id, prompt, req.sampling, hasher, self._arrivals, self.cfg.seed)
        seq.hold_kv = hold
        self._arrivals += 1
        self.seqs[seq.request_id] = seq
        self.scheduler.waiting.append(seq)
        self.prompt_tokens += n
        if req.kv_handle is None:
            return None
        seq.continue_from(req.kv_handle.first_token)
        plan = plan_pull(self.scheduler, seq, req.kv_handle, self.fingerprint, self.handoff)
        self.events.flush()  # allocation may have evicted cached blocks
        return plan

    def _abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return
        self.held.discard(request_id)
        self.scheduler.finish(seq, "abort")  # frees its blocks, even mid-step (see the module invariants)
        self._deliver([seq.take_output()])
        self._wake.set()  # freed blocks may admit a waiting request

    def _fail_all(self, error: Exception) -> None:
        for seq in list(self.seqs.values()):
            self.scheduler.finish(seq, "abort")
        self.seqs.clear()
        for queue in self._streams.values():
            queue.put_nowait(error)
        self._streams.clear()
        self.events.flush()

    # -- the step loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                started, preemptions = loop.time(), self.scheduler.preemptions
                scheduled = self.scheduler.schedule()
                self.events.flush()  # allocation may have evicted cached blocks
                if not scheduled:
                    if self.scheduler.preemptions == preemptions:  # idle: wait for a request or an abort
                        self._wake.clear()
                        await self._wake.wait()
                    continue  # else the preempted sequence is admitted again on the next schedule
                # Sleep until the modeled end of the step; bookkeeping time counts toward it.
                await asyncio.sleep(max(0.0, started + self.timing.wall(self.timing.step_seconds(scheduled))
                                        - loop.time()))
                self._commit(scheduled)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave a request hanging on an engine bug
            log.exception("mocker step failed; failing every in-flight request")
            self._fail_all(EngineError(f"engine failure: {e}"))
            self._task = None

    def _commit(self, scheduled: list[tuple[MockSequence, int]]) -> None:
        outputs = []
        for seq, n in scheduled:
            if seq.status is not Status.RUNNING:
                continue  # aborted while the step slept: blocks already freed, nothing to publish
            self.scheduler.commit(seq, n)
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk short of the prompt's end samples nothing
            h = seq.next_hash()
            token = self.tokens.token(h, seq.sampling.ignore_eos)
            seq.append(token, self.tokens.logprob(h) if seq.sampling.logprobs else None)
            self.generated_tokens += 1
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.seqs[seq.request_id]
            elif seq.hold_kv:
                self.scheduler.park(seq)
                self.held.add(seq.request_id)
                seq.finish_reason = PREFILLED
            outputs.append(seq.take_output())
        self.events.flush()
        self._deliver(outputs)

    def _stop_reason(self, seq: MockSequence, token: int) -> str | None:
        reason = seq.stop_reason(token, self.info.eos_ids, self.max_model_len)
        if reason is None and -(-(seq.num_tokens + 1) // self.cfg.block_size) > self.pool.num_blocks:
            return "length"  # the next token would not fit even the whole pool: stop, never livelock
        return reason

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is None:
                continue
            if out.finish_reason == PREFILLED:
                out.finish_reason = None
                queue.put_nowait(PrefillResult(out, [b.block_id for b in self.seqs[out.request_id].blocks]))
                del self._streams[out.request_id]
                continue
            queue.put_nowait(out)
            if out.finish_reason is not None:
                del self._streams[out.request_id]

"""A discrete-event simulation of routers in front of workers with LRU prefix caches (virtual clock),
for tests/frontend/test_routing_quality.py, whose docstring describes the model and the workloads."""

from __future__ import annotations

import heapq
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.frontend.kv_router import KvRouter
from kvrelay.frontend.router import (
    BaseRouter,
    LeastLoadedRouter,
    RandomRouter,
    RoundRobinRouter,
    RouteRequest,
    WorkerState,
)
from kvrelay.kvbm.events import KvEvent
from kvrelay.kvbm.hashing import block_hashes, root_hash

BLOCK = 16
ROOT = root_hash("sim-model")
N_WORKERS = 4
PREFILL_S_PER_TOKEN = 0.0002
DECODE_S_PER_TOKEN = 0.02
EVENT_DELAY_S = 0.005
METRICS_PERIOD_S = 0.5
VOCAB = 32_000


@dataclass(frozen=True)
class MultiTurn:
    users: int = 32
    turns: int = 6
    system_tokens: int = 200
    user_tokens: tuple[int, int] = (40, 60)  # uniform range per message
    reply_tokens: tuple[int, int] = (40, 60)
    mean_gap_s: float = 0.02  # mean inter-arrival gap within a turn: ~all 32 conversations overlap
    capacity: int = 2000  # blocks per worker


class SimWorker:
    """LRU prefix cache. Invariant: `cache` holds at most `capacity` hashes, oldest use first, and
    every change to it is emitted as a KvEvent with consecutive ids."""

    def __init__(self, worker_id: str, capacity: int):
        self.worker_id, self.capacity = worker_id, capacity
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.last_event_id = 0
        self.running: dict[str, set[int]] = {}  # request id -> its prompt's blocks
        self.waiting: set[str] = set()  # requests whose prefill has not ended
        self.queue: deque[Callable[[], None]] = deque()  # with a prefill queue: prefills not started yet
        self.busy = False  # with a prefill queue: a prefill is running (then the next waits in `queue`)

    def lookup(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            n += 1
        return n

    def store(self, hashes: list[int]) -> list[KvEvent]:
        events: list[KvEvent] = []
        run: list[int] = []
        parent: int | None = None
        for i, h in enumerate(hashes):
            if h in self.cache:
                self.cache.move_to_end(h)
                if run:
                    events.append(self._event("stored", run, parent))
                    run = []
            else:
                if not run:
                    parent = hashes[i - 1] if i else None
                self.cache[h] = None
                run.append(h)
        if run:
            events.append(self._event("stored", run, parent))
        evicted = [self.cache.popitem(last=False)[0] for _ in range(len(self.cache) - self.capacity)]
        if evicted:
            events.append(self._event("removed", evicted))
        return events

    def _event(self, kind: str, hashes: list[int], parent: int | None = None) -> KvEvent:
        self.last_event_id += 1
        return KvEvent(worker_id=self.worker_id, event_id=self.last_event_id, kind=kind,  # type: ignore[arg-type]
                       seq_hashes=hashes, parent_hash=parent)


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    oracle_tokens: int = 0
    per_worker: Counter[str] = field(default_factory=Counter)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens

    @property
    def best_hit_rate(self) -> float:
        return self.oracle_tokens / self.prompt_tokens

    @property
    def spread(self) -> float:
        counts = [self.per_worker.get(f"w{i}", 0) for i in range(N_WORKERS)]
        return max(counts) / max(min(counts), 1)

    @property
    def max_over_mean(self) -> float:
        counts = [self.per_worker.get(f"w{i}", 0) for i in range(N_WORKERS)]
        return max(counts) / (sum(counts) / len(counts))


class Sim:
    def __init__(self, mode: str, capacity: int, seed: int, prefill_queue: bool = False, **kv_options: float):
        """`prefill_queue`: a worker computes one prefill at a time, in arrival order (decodes still batch
        without limit), so a worker sent more prompts than others makes them wait: TTFT and queueing
        become visible. Without it every prefill starts at once."""
        self.prefill_queue = prefill_queue
        self.ttfts: list[float] = []
        self.max_waiting: Counter[str] = Counter()  # per worker, the most requests ever queued for prefill
        self.waiting_area: Counter[str] = Counter()  # per worker, the integral over time of its waiting count
        self.active_area: Counter[str] = Counter()  # ... of its active (waiting + decoding) count
        self._areas_at = 0.0
        self.index = KvIndex()
        self.router = make_router(mode, self.index, random.Random(seed + 1), lambda: self.now, **kv_options)
        self.workers = {f"w{i}": SimWorker(f"w{i}", capacity) for i in range(N_WORKERS)}
        self.reported = {w: WorkerState(worker_id=w) for w in self.workers}
        self.reported_at = 0.0
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.seen: set[int] = set()  # the oracle's unbounded shared cache
        self.stats = Stats()
        self._n = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn))

    def run(self) -> Stats:
        self.at(0.0, self._report)
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            for w in self.workers.values():
                self.waiting_area[w.worker_id] += len(w.waiting) * (t - self._areas_at)
                self.active_area[w.worker_id] += len(w.running) * (t - self._areas_at)
            self.now = self._areas_at = t
            fn()
            if all(not w.running for w in self.workers.values()) and all(
                    f == self._report for _, _, f in self._heap):
                break
        assert len(self.router.inflight) == 0, "router in-flight accounting drifted"
        return self.stats

    def _report(self) -> None:
        self.reported = {w: WorkerState(worker_id=w, active_requests=len(sw.running),
                                        active_decode_blocks=len(set().union(*sw.running.values())),
                                        waiting_requests=len(sw.waiting))
                         for w, sw in self.workers.items()}
        self.reported_at = self.now
        self.at(self.now + METRICS_PERIOD_S, self._report)

    def _publish(self, events: list[KvEvent]) -> None:
        def deliver() -> None:
            for ev in events:
                assert self.index.apply(ev), "simulated delivery is lossless: no gap expected"
        self.at(self.now + EVENT_DELAY_S, deliver)

    def submit(self, prompt: list[int], reply: list[int], on_done: Callable[[], None]) -> None:
        self._n += 1
        rid = f"r{self._n}"
        hashes = block_hashes(prompt, BLOCK, ROOT)
        age = self.now - self.reported_at
        d = self.router.select(RouteRequest(request_id=rid, block_hashes=hashes, num_prompt_tokens=len(prompt),
                                            block_size=BLOCK),
                               [msgspec.structs.replace(ws, report_age=age) for ws in self.reported.values()])
        w = self.workers[d.worker_id]
        self.stats.per_worker[w.worker_id] += 1
        w.running[rid] = {*hashes, -self._n}  # + its partial last block (never a real hash)
        w.waiting.add(rid)
        self.max_waiting[w.worker_id] = max(self.max_waiting[w.worker_id], len(w.waiting))
        sent = self.now

        def start_prefill() -> None:  # the cache lookup happens when the worker schedules the prompt
            cached = w.lookup(hashes)
            oracle = next((i for i, h in enumerate(hashes) if h not in self.seen), len(hashes))
            st = self.stats
            st.prompt_tokens += len(prompt)
            st.cached_tokens += cached * BLOCK
            st.oracle_tokens += oracle * BLOCK
            self.at(self.now + PREFILL_S_PER_TOKEN * (len(prompt) - cached * BLOCK), lambda: after_prefill(cached))

        def after_prefill(cached: int) -> None:
            self.seen.update(hashes)
            self._publish(w.store(hashes))
            w.waiting.discard(rid)
            self.ttfts.append(self.now - sent)
            self.router.on_first_token(rid, self.now - sent, cached * BLOCK)
            self.at(self.now + DECODE_S_PER_TOKEN * len(reply), finish)
            if self.prefill_queue:
                if w.queue:
                    w.queue.popleft()()
                else:
                    w.busy = False

        def finish() -> None:
            full = block_hashes(prompt + reply, BLOCK, ROOT)
            self.seen.update(full)
            self._publish(w.store(full))
            del w.running[rid]
            self.router.on_finish(rid)
            on_done()

        if not self.prefill_queue:
            start_prefill()
        elif w.busy:
            w.queue.append(start_prefill)
        else:
            w.busy = True
            start_prefill()


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def run_multi_turn(mode: str, wl: MultiTurn, seed: int = 0, **kv_options: float) -> Stats:
    # The workload is drawn up front from its own RNG: every router sees the same prompts and gaps.
    rng = random.Random(seed)
    system = tokens(rng, wl.system_tokens)
    msgs = [[(tokens(rng, rng.randint(*wl.user_tokens)), tokens(rng, rng.randint(*wl.reply_tokens)))
             for _ in range(wl.turns)] for _ in range(wl.users)]
    orders = [rng.sample(range(wl.users), wl.users) for _ in range(wl.turns)]
    gaps = [[rng.expovariate(1 / wl.mean_gap_s) for _ in range(wl.users)] for _ in range(wl.turns)]
    sim = Sim(mode, wl.capacity, seed, **kv_options)
    history = {u: list(system) for u in range(wl.users)}
    pending: dict[int, int] = {}  # user -> turn that arrived while its previous turn was running
    busy: set[int] = set()
    arrived = [0] * wl.turns

    def arrive(u: int, t: int) -> None:
        if u in busy:
            pending[u] = t
            return
        busy.add(u)
        msg, reply = msgs[u][t]
        prompt = history[u] + msg

        def done() -> None:
            history[u] = prompt + reply
            busy.discard(u)
            if u in pending:
                arrive(u, pending.pop(u))

        sim.submit(prompt, reply, done)
        arrived[t] += 1
        if arrived[t] == wl.users and t + 1 < wl.turns:
            start_turn(t + 1)

    def start_turn(t: int) -> None:
        at = sim.now
        for u, gap in zip(orders[t], gaps[t], strict=True):
            at += gap
            sim.at(at, lambda u=u: arrive(u, t))

    start_turn(0)
    return sim.run()


def run_single_turn(mode: str, n: int = 1000, burst: int = 50, burst_every_s: float = 2.0, template: int = 0,
                    seed: int = 0, **kv_options: float) -> Stats:
    """`n` requests with random prompts (100..1500 tokens, so no shared prefix unless `template` > 0:
    then every prompt starts with the same `template` tokens, like a chat template's header), arriving
    `burst` at a time, every `burst_every_s` seconds."""
    rng = random.Random(seed)
    sim = Sim(mode, 2000, seed, **kv_options)
    header = tokens(rng, template)
    for b in range(n // burst):
        for _ in range(burst):
            prompt, reply = header + tokens(rng, rng.randint(100, 1500)), tokens(rng, rng.randint(20, 200))
            sim.at(b * burst_every_s, lambda p=prompt, r=reply: sim.submit(p, r, lambda: None))
    return sim.run()


def run_hot_spot(mode: str, n: int = 600, rate: float = 60.0, family_share: float = 0.5, family_tokens: int = 1024,
                 seed: int = 0, **kv_options: float) -> Sim:
    """Single-turn requests arriving as a Poisson stream (`rate` per second) on workers with a prefill
    queue: a `family_share` of them start with the same `family_tokens`-token prefix (one hot
    conversation family: a shared document or agent prompt) and end with 64 fresh tokens; the others are
    random prompts of 200-800 tokens. Replies of 20-200 tokens. Returns the finished simulation."""
    rng = random.Random(seed)
    family = tokens(rng, family_tokens)
    sim = Sim(mode, 4000, seed, prefill_queue=True, **kv_options)
    at = 0.0
    for _ in range(n):
        at += rng.expovariate(rate)
        prompt = family + tokens(rng, 64) if rng.random() < family_share else tokens(rng, rng.randint(200, 800))
        reply = tokens(rng, rng.randint(20, 200))
        sim.at(at, lambda p=prompt, r=reply: sim.submit(p, r, lambda: None))
    sim.run()
    return sim


def make_router(mode: str, index: KvIndex, rng: random.Random, clock: Callable[[], float],
                **kv_options: float) -> BaseRouter:
    if mode == "kv":  # speculative entries expire on the virtual clock
        return KvRouter(index, rng=rng, clock=clock, **kv_options)
    cls = {"round-robin": RoundRobinRouter, "random": RandomRouter, "least-loaded": LeastLoadedRouter}[mode]
    return cls(rng=rng)

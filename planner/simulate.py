"""`kvrelay planner simulate`: a request trace replayed through an engine timing model (the mocker's)
with the planner in the loop, in modeled time: seconds of compute for minutes of traffic.

Model: prefill workers serve their FCFS queue one prompt at a time (`prefill_seconds(isl)`; the first
token comes out of the prefill); decode workers run continuous batching, one step = `decode_seconds(B,
K)` for B running sequences holding K KV blocks, admitting up to `max_num_seqs`. Without prefill
workers a decode worker prefills admitted prompts inside its step. New workers serve `startup_s` after
the planner asks for them; removed ones drain (take no new work, finish what they hold). Worker-seconds
count every worker from the moment it is asked for until it has drained.

The planner is the real one (planner/loop.py, the same policy objects) on a simulated clock; its
observations are computed from the simulation exactly as observe.py computes them from /metrics.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from kvrelay.planner.loop import Planner
from kvrelay.planner.metrics import PlannerMetrics
from kvrelay.planner.observation import Observation, Pool, PoolObservation
from kvrelay.planner.policy import Policy
from kvrelay.planner.profile import StepCost
from kvrelay.planner.targets import LatencyTargets
from kvrelay.planner.trace import TraceRequest


@dataclass
class SimRequest:
    arrival: float
    isl: int
    osl: int
    first: float = math.nan
    finish: float = math.nan
    generated: int = 0
    last_token: float = 0.0
    itl_sum: float = 0.0  # sum of gaps between its tokens (after the first)


@dataclass
class SimWorker:
    pool: Pool
    asked: float
    ready_at: float
    draining: bool = False
    gone_at: float | None = None
    queue: list[SimRequest] = field(default_factory=list)  # prefill FCFS / decode waiting
    running: list[SimRequest] = field(default_factory=list)
    busy: bool = False

    def serving(self, now: float) -> bool:
        return self.ready_at <= now and not self.draining and self.gone_at is None

    @property
    def load(self) -> int:
        return len(self.queue) + len(self.running) + (1 if self.busy and self.pool is Pool.PREFILL else 0)


@dataclass(frozen=True)
class SimConfig:
    targets: LatencyTargets
    startup_s: float = 30.0
    interval_s: float = 10.0
    block_size: int = 16
    max_num_seqs: int = 64
    scale_timeout_s: float = 120.0


@dataclass(frozen=True)
class SimResult:
    requests: int
    attainment: float  # fraction meeting both TTFT and ITL targets
    goodput: float  # requests within SLA per second of trace
    worker_seconds: float
    duration_s: float
    ttft_p90: float
    itl_p90: float
    max_workers: dict[str, int]

    def line(self) -> str:
        return (f"requests {self.requests}  attainment {self.attainment:.1%}  goodput {self.goodput:.2f}/s  "
                f"worker-seconds {self.worker_seconds:.0f}  TTFT p90 {self.ttft_p90:.3f}s  ITL p90 "
                f"{self.itl_p90 * 1000:.1f}ms  max workers {self.max_workers}")


def _p90(xs: list[float]) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(0.9 * len(xs))) - 1)]


class Simulation:
    def __init__(self, trace: list[TraceRequest], cost: StepCost, cfg: SimConfig, initial: dict[Pool, int]):
        self.cost, self.cfg = cost, cfg
        t0 = trace[0].timestamp if trace else 0.0
        self.requests = [SimRequest((r.timestamp - t0) / 1000.0, r.input_length, r.output_length) for r in trace]
        self.now = 0.0
        self.workers: list[SimWorker] = [SimWorker(p, 0.0, 0.0) for p, n in initial.items() for _ in range(n)]
        self.unrouted: list[SimRequest] = []
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self._window_done: list[SimRequest] = []
        self._window_arrived = 0
        self.max_workers = {p.value: n for p, n in initial.items()}
        self.planner: Planner | None = None
        self.counts: list[dict[Pool, int]] = []  # ready counts at every planning interval

    # -- event plumbing -------------------------------------------------------------------------------
    def _at(self, t: float, kind: str, obj: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, obj))

    def _serving(self, pool: Pool) -> list[SimWorker]:
        return [w for w in self.workers if w.pool is pool and w.serving(self.now)]

    def _route(self, req: SimRequest) -> None:
        prefill = self._serving(Pool.PREFILL)
        if prefill and math.isnan(req.first):
            w = min(prefill, key=lambda w: w.load)
            w.queue.append(req)
            self._kick(w)
            return
        decode = self._serving(Pool.DECODE)
        if not decode:
            self.unrouted.append(req)
            return
        w = min(decode, key=lambda w: w.load)
        w.queue.append(req)
        self._kick(w)

    def _kick(self, w: SimWorker) -> None:
        if w.busy:
            return
        if w.pool is Pool.PREFILL:
            if w.queue:
                req = w.queue.pop(0)
                w.busy = True
                self._at(self.now + self.cost.prefill_seconds(req.isl), "prefilled", (w, req))
            return
        while w.queue and len(w.running) < self.cfg.max_num_seqs:
            w.running.append(w.queue.pop(0))
        if not w.running:
            return
        local = [r for r in w.running if math.isnan(r.first)]
        blocks = sum(-(-(r.isl + r.generated) // self.cfg.block_size) for r in w.running if r not in local)
        step = sum(self.cost.prefill_seconds(r.isl) for r in local) + self.cost.decode_seconds(
            len(w.running) - len(local), blocks)
        w.busy = True
        self._at(self.now + step, "stepped", w)

    def _token(self, req: SimRequest) -> None:
        if math.isnan(req.first):
            req.first = self.now
        else:
            req.itl_sum += self.now - req.last_token
        req.last_token = self.now
        req.generated += 1
        if req.generated >= req.osl:
            req.finish = self.now
            self._window_done.append(req)

    def _retire_if_drained(self, w: SimWorker) -> None:
        if w.draining and w.gone_at is None and not w.busy and w.load == 0:
            w.gone_at = self.now

    def _handle(self, kind: str, obj) -> None:
        if kind == "arrival":
            self._window_arrived += 1
            self._route(obj)
        elif kind == "prefilled":
            w, req = obj
            w.busy = False
            self._token(req)
            if req.finish != req.finish:  # not finished by its first token: on to decode
                self._route(req)
            self._kick(w)
            self._retire_if_drained(w)
        elif kind == "stepped":
            w = obj
            w.busy = False
            for req in list(w.running):
                self._token(req)
                if req.finish == req.finish:
                    w.running.remove(req)
            self._kick(w)
            self._retire_if_drained(w)
        elif kind == "ready":
            pending, self.unrouted = self.unrouted, []
            for req in pending:
                self._route(req)

    # -- what the planner sees and does ---------------------------------------------------------------
    def observation(self, interval: float) -> Observation:
        done, self._window_done = self._window_done, []
        arrived, self._window_arrived = self._window_arrived, 0
        n = len(done)
        itls = [r.itl_sum / (r.generated - 1) for r in done if r.generated > 1]
        pools = {}
        for pool in Pool:
            ws = self._serving(pool)
            pools[pool] = PoolObservation(
                workers=len(ws), running=float(sum(len(w.running) + (w.busy and pool is Pool.PREFILL) for w in ws)),
                waiting=float(sum(len(w.queue) for w in ws) + (len(self.unrouted) if pool is Pool.DECODE else 0)),
                capacity_seqs=len(ws) * (self.cfg.max_num_seqs if pool is Pool.DECODE else 1))
        return Observation(interval_s=interval, request_rate=n / interval, arrival_rate=arrived / interval,
                           isl=sum(r.isl for r in done) / n if n else None,
                           osl=sum(r.osl for r in done) / n if n else None,
                           ttft_p90=_p90([r.first - r.arrival for r in done]) if n else None,
                           itl_p90=_p90(itls) if itls else None, hit_rate=0.0 if n else None, pools=pools)

    def scale(self, target: dict[Pool, int]) -> None:
        for pool, n in target.items():
            live = [w for w in self.workers if w.pool is pool and not w.draining and w.gone_at is None]
            for _ in range(n - len(live)):
                w = SimWorker(pool, self.now, self.now + self.cfg.startup_s)
                self.workers.append(w)
                self._at(w.ready_at, "ready")
            for w in sorted(live, key=lambda w: -w.asked)[:max(0, len(live) - n)]:
                w.draining = True
                if w.ready_at > self.now:
                    w.gone_at = self.now  # never started: costs nothing more
                self._retire_if_drained(w)
            self.max_workers[pool.value] = max(self.max_workers.get(pool.value, 0), n)

    def ready(self) -> dict[Pool, int]:
        return {p: len(self._serving(p)) for p in Pool}

    # -- run ------------------------------------------------------------------------------------------
    async def run(self, policy: Policy | None) -> SimResult:
        for req in self.requests:
            self._at(req.arrival, "arrival", req)
        end_of_trace = self.requests[-1].arrival if self.requests else 0.0
        planner = None
        if policy is not None:
            sim = self

            class _Observer:
                async def next(self) -> Observation:
                    return sim.observation(sim.cfg.interval_s)

            class _Connector:
                kind = "simulated"

                async def ready(self) -> dict[Pool, int]:
                    return sim.ready()

                async def scale(self, target: dict[Pool, int]) -> None:
                    sim.scale(target)

                async def close(self) -> None:
                    pass

            planner = self.planner = Planner(_Observer(), _Connector(), policy, PlannerMetrics(CollectorRegistry()),
                                             interval=self.cfg.interval_s, scale_timeout=self.cfg.scale_timeout_s,
                                             clock=lambda: self.now)
            self._at(self.cfg.interval_s, "plan")
        while self._events:
            t, _, kind, obj = heapq.heappop(self._events)
            self.now = t
            if kind == "plan":
                assert planner is not None  # "plan" events are scheduled only with a planner
                if any(r.finish != r.finish for r in self.requests) or t <= end_of_trace:
                    await planner.step()
                    self.counts.append(self.ready())
                    self._at(t + self.cfg.interval_s, "plan")
                continue
            self._handle(kind, obj)
        return self.result(end_of_trace)

    def result(self, end_of_trace: float) -> SimResult:
        end = max([self.now, end_of_trace])
        done = [r for r in self.requests if r.finish == r.finish]
        itl = [r.itl_sum / (r.generated - 1) if r.generated > 1 else 0.0 for r in done]
        ok = sum(1 for r, i in zip(done, itl, strict=True)
                 if r.first - r.arrival <= self.cfg.targets.ttft_target and i <= self.cfg.targets.itl_target)
        ws = sum((w.gone_at if w.gone_at is not None else end) - w.asked for w in self.workers)
        n = max(1, len(self.requests))
        return SimResult(requests=len(self.requests), attainment=ok / n, goodput=ok / max(1e-9, end_of_trace),
                         worker_seconds=ws, duration_s=end, ttft_p90=_p90([r.first - r.arrival for r in done]),
                         itl_p90=_p90(itl), max_workers=self.max_workers)

"""`load`: the reactive policy. Per pool, one step (+1/-1) per interval at most, a cooldown after each
change, and a scale-down only when the survivors would still be under the thresholds.

Signals: decode utilization = (running + waiting) / capacity (sum of max_num_seqs), queue depth per
worker, and the frontend's TTFT/ITL p90 against the targets. A TTFT breach is charged to the pool
that prefills (prefill if it has workers, else decode, which then prefills locally); an ITL breach to
decode.

Scale-down re-prediction (Dynamo PR #9294): removing one of N workers moves its share onto the N-1
survivors, so the load each survivor sees is `load * N / (N - 1)`; a worker is removed only if that
re-predicted utilization stays under `high_util - hysteresis` and latency has room (p90 under
`down_latency_fraction` of the target), and only after it looked safe `down_stable_intervals` in a row
(a single quiet sample of a noisy load caused remove/add flapping in simulation). Zero traffic steps
down to the minimum (PR #11624).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvrelay.planner.decision import Bounds, Decision
from kvrelay.planner.observation import Observation, Pool, PoolObservation
from kvrelay.planner.targets import LatencyTargets


@dataclass(frozen=True)
class LoadConfig:
    targets: LatencyTargets = LatencyTargets()
    high_util: float = 0.85
    hysteresis: float = 0.25
    queue_high: float = 1.0  # waiting sequences per worker that call for another worker
    down_latency_fraction: float = 0.6
    cooldown_intervals: int = 1  # intervals a pool holds after a change (its new worker warms up)
    # a removal must be safe this many intervals in a row: one quiet sample of a noisy load is not a trend
    down_stable_intervals: int = 3


@dataclass(frozen=True)
class LoadState:
    since_change: dict[Pool, int] = field(default_factory=dict)  # intervals since the pool last moved
    down_ok: dict[Pool, int] = field(default_factory=dict)  # consecutive intervals a removal looked safe


def _util(p: PoolObservation, workers: int) -> float:
    cap = p.capacity_seqs / p.workers if p.workers and p.capacity_seqs else 0
    return p.in_flight / (workers * cap) if workers > 0 and cap > 0 else 0.0


def _pool_step(pool: Pool, obs: Observation, n: int, cfg: LoadConfig, prefills: bool) -> tuple[int, str]:
    p = obs.pool(pool)
    if n == 0:
        return (1, "no worker but requests in flight") if p.in_flight > 0 else (0, "idle, at zero")
    if obs.idle:
        return -1, "zero traffic"
    ttft_over = prefills and obs.ttft_p90 is not None and obs.ttft_p90 > cfg.targets.ttft_target
    itl_over = pool is Pool.DECODE and obs.itl_p90 is not None and obs.itl_p90 > cfg.targets.itl_target
    util = _util(p, n)
    queue = p.waiting / n
    if ttft_over or itl_over or util > cfg.high_util or queue > cfg.queue_high:
        why = [w for w, on in ((f"TTFT p90 {obs.ttft_p90 or 0:.3g}s > {cfg.targets.ttft_target:.3g}s", ttft_over),
                               (f"ITL p90 {obs.itl_p90 or 0:.3g}s > {cfg.targets.itl_target:.3g}s", itl_over),
                               (f"utilization {util:.2f} > {cfg.high_util}", util > cfg.high_util),
                               (f"queue {queue:.1f}/worker > {cfg.queue_high}", queue > cfg.queue_high)) if on]
        return 1, "; ".join(why)
    if n <= 1:
        return 0, "within thresholds"
    survivors = _util(p, n - 1)  # the N/(N-1) re-prediction
    room = cfg.down_latency_fraction
    latency_ok = ((not prefills or obs.ttft_p90 is None or obs.ttft_p90 < room * cfg.targets.ttft_target)
                  and (pool is not Pool.DECODE or obs.itl_p90 is None or obs.itl_p90 < room * cfg.targets.itl_target))
    if p.waiting == 0 and survivors < cfg.high_util - cfg.hysteresis and latency_ok:
        return -1, f"survivors would run at {survivors:.2f} utilization"
    if not latency_ok:
        return 0, "latency too close to target to remove a worker"
    return 0, f"removing one would put survivors at {survivors:.2f} utilization"


def decide_load(obs: Observation | None, current: dict[Pool, int], state: LoadState, cfg: LoadConfig,
                bounds: Bounds) -> tuple[Decision, LoadState]:
    if obs is None:
        return Decision(dict(current), {p: "no observation this interval: no change" for p in Pool}), state
    desired: dict[Pool, float] = {}
    reasons: dict[Pool, str] = {}
    since, down_ok = dict(state.since_change), dict(state.down_ok)
    prefills_pool = Pool.PREFILL if current.get(Pool.PREFILL, 0) > 0 else Pool.DECODE
    for pool in Pool:
        n = current.get(pool, 0)
        lo, hi = bounds.limits(pool)
        step, why = _pool_step(pool, obs, n, cfg, pool is prefills_pool)
        if hi == 0:
            step, why = 0, "pool disabled (max 0)"
        down_ok[pool] = down_ok.get(pool, 0) + 1 if step < 0 else 0
        if step < 0 and down_ok[pool] < cfg.down_stable_intervals:
            step, why = 0, f"{why} ({down_ok[pool]}/{cfg.down_stable_intervals} intervals before removing one)"
        elif step and since.get(pool, cfg.cooldown_intervals) < cfg.cooldown_intervals:
            step, why = 0, f"cooldown ({why})"
        desired[pool] = n + step
        reasons[pool] = why
    decision = bounds.apply(desired, reasons)
    for pool in Pool:
        moved = decision.counts[pool] != current.get(pool, 0)
        since[pool] = 0 if moved else since.get(pool, cfg.cooldown_intervals) + 1
        if moved:
            down_ok[pool] = 0
    return decision, replace(state, since_change=since, down_ok=down_ok)

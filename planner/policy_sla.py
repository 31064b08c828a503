"""`sla`: the predictive policy. Sizes each pool for the next interval's predicted load so that the
estimated TTFT and ITL p90 meet their targets.

    uncached ISL   = ISL * (1 - expected hit rate)             (cached prompt tokens cost no prefill)
    service s      = profile.ttft(uncached ISL) * ttft_correction
    per prefill worker, M/D/1: rho = rate * s / N,  mean wait Wq = rho * s / (2 * (1 - rho))
    TTFT p90 est   = s + ln(10) * Wq                           (queue wait included: Dynamo #10528)
    prefill N      = smallest N with rho < 1 and TTFT est <= target
    decode: c*     = most sequences per worker with profile.itl(c*, ISL + OSL/2) * itl_correction <= target
            N      = ceil((rate * OSL + backlog) / (c* / itl(c*)))  (tokens/s needed over tokens/s per worker;
             backlog = queued sequences * OSL / interval)

Removals need the load to fit with `down_margin` headroom for `down_stable_intervals` in a row (a
predicted load hovering at a worker boundary must not add and remove one every other interval);
additions happen at once. Corrections are observed p90 / estimated p90 for the current deployment, smoothed and clamped, so a
profile that is optimistic or pessimistic for this traffic converges to what is seen. Without prefill
workers (max prefill 0) decode workers prefill locally and are sized for both. With min prefill 0 the
prefill pool is emptied while local prefill would take at most `local_prefill_share` of the decode
workers' time and still meet the TTFT target (low traffic needs no dedicated prefill worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvrelay.planner.decision import Bounds, Decision
from kvrelay.planner.observation import Observation, Pool
from kvrelay.planner.predictors import Predictor, PredictorKind, make_predictor
from kvrelay.planner.profile import Profile
from kvrelay.planner.targets import LatencyTargets

_P90_WAIT = math.log(10)  # p90 of an exponential wait is ln(10) times its mean
_CORRECTION_RANGE = (0.5, 4.0)
_MAX_SEARCH = 1024


@dataclass(frozen=True)
class SlaConfig:
    targets: LatencyTargets = LatencyTargets()
    predictor: PredictorKind = PredictorKind.KALMAN
    correction_alpha: float = 0.5
    # with min prefill 0: decode workers prefill locally while that takes at most this share of their time
    local_prefill_share: float = 0.15
    down_margin: float = 0.1  # a removal must leave this much headroom on the predicted load
    down_stable_intervals: int = 1  # ... for this many intervals in a row (simulated: the margin alone
    # stops flapping at a boundary; each interval more costs ~3% of worker-seconds on the bursty trace)


@dataclass
class SlaState:
    """The predictors and corrections carried between intervals (mutable, owned by one planner)."""

    rate: Predictor
    isl: Predictor
    osl: Predictor
    hit: Predictor
    ttft_correction: float = 1.0
    itl_correction: float = 1.0
    estimates: dict[str, float] = field(default_factory=dict)
    down_ok: dict[Pool, int] = field(default_factory=dict)  # consecutive intervals a removal was safe

    @classmethod
    def new(cls, kind: PredictorKind | str) -> SlaState:
        return cls(rate=make_predictor(kind), isl=make_predictor(kind), osl=make_predictor(kind),
                   hit=make_predictor(kind))


def prefill_estimate(rate: float, service_s: float, workers: int) -> float:
    """TTFT p90 estimate with `workers` serving `rate` requests/s of `service_s` each (inf: overloaded)."""
    if rate <= 0:
        return service_s
    if workers <= 0:
        return math.inf
    rho = rate * service_s / workers
    if rho >= 1:
        return math.inf
    return service_s + _P90_WAIT * rho * service_s / (2 * (1 - rho))


def decode_concurrency(profile: Profile, context: float, itl_budget: float, cap: int) -> float:
    """Most sequences per worker whose ITL stays within `itl_budget` (at least the profile's first point)."""
    lo, hi = profile.decode_concurrency[0], profile.decode_concurrency[-1]
    if cap > 0:
        hi = min(hi, float(cap))
    if profile.itl(lo, context) > itl_budget or hi <= lo:
        return lo
    for _ in range(40):  # bisection: itl is non-decreasing in concurrency
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if profile.itl(mid, context) <= itl_budget else (lo, mid)
    return lo


def _smallest(lo: int, hi: int, ok) -> int:
    for n in range(max(lo, 1), min(hi, _MAX_SEARCH) + 1):
        if ok(n):
            return n
    return hi


def _correct(old: float, observed: float | None, estimated: float, alpha: float) -> float:
    """Moves the correction by the smoothed observed/estimated ratio of the estimate made *with* it, so
    it settles where the corrected estimate equals what is observed (an overloaded estimate, inf,
    against a finite observation means the correction is too high)."""
    if observed is None or estimated <= 0:
        return old
    ratio = observed / estimated if math.isfinite(estimated) else _CORRECTION_RANGE[0]
    new = old * (alpha * ratio + (1 - alpha))
    return min(_CORRECTION_RANGE[1], max(_CORRECTION_RANGE[0], new))


def decide_sla(obs: Observation | None, current: dict[Pool, int], state: SlaState, cfg: SlaConfig,
               profile: Profile, bounds: Bounds) -> Decision:
    if obs is None:
        return Decision(dict(current), {p: "no observation this interval: no change" for p in Pool})
    # arrivals, not completions: at a burst's start requests arrive long before they finish
    state.rate.update(obs.arrival_rate if obs.arrival_rate is not None else obs.request_rate)
    state.isl.update(obs.isl)
    state.osl.update(obs.osl)
    state.hit.update(obs.hit_rate)
    rate, isl, osl = state.rate.predict() or 0.0, state.isl.predict(), state.osl.predict()
    hit = min(1.0, max(0.0, state.hit.predict() or 0.0))
    if obs.idle and rate < 1e-3:
        return bounds.apply({p: bounds.limits(p)[0] for p in Pool}, {p: "zero traffic: minimum" for p in Pool})
    if isl is None or osl is None:
        return Decision(dict(current), {p: "no request finished yet: lengths unknown, no change" for p in Pool})
    has_prefill = bounds.max_prefill > 0
    cap = obs.pool(Pool.DECODE).capacity_seqs // max(1, obs.pool(Pool.DECODE).workers) or profile.max_num_seqs
    context = isl + osl / 2
    # corrections from the current deployment at the observed rate
    base_s = profile.ttft(isl * (1 - hit))
    # who prefills now: the prefill pool, or the decode workers when it has none (local prefill)
    prefill_n = current.get(Pool.PREFILL, 0) if has_prefill and current.get(Pool.PREFILL, 0) else current.get(
        Pool.DECODE, 0)
    est_ttft = prefill_estimate(obs.request_rate, base_s * state.ttft_correction, prefill_n)
    state.ttft_correction = _correct(state.ttft_correction, obs.ttft_p90, est_ttft, cfg.correction_alpha)
    n_dec = max(1, current.get(Pool.DECODE, 0))
    c_now = max(profile.decode_concurrency[0], obs.pool(Pool.DECODE).running / n_dec)
    if obs.pool(Pool.DECODE).waiting == 0:  # with a queue, observed gaps include waiting: not the curve's error
        state.itl_correction = _correct(state.itl_correction, obs.itl_p90,
                                        profile.itl(c_now, context) * state.itl_correction, cfg.correction_alpha)
    service = base_s * state.ttft_correction

    def size(rate: float) -> Decision:
        lo_p, hi_p = bounds.limits(Pool.PREFILL if has_prefill else Pool.DECODE)
        n_prefill = _smallest(lo_p, hi_p, lambda n: prefill_estimate(rate, service, n) <= cfg.targets.ttft_target)
        c_star = decode_concurrency(profile, context, cfg.targets.itl_target / state.itl_correction, cap)
        tokens_per_worker = c_star / (profile.itl(c_star, context) * state.itl_correction)
        # the queued sequences' tokens are demand too: cleared over the next interval
        backlog = obs.pool(Pool.DECODE).waiting * osl / max(obs.interval_s, 1e-9)
        n_decode = math.ceil((rate * osl + backlog) / tokens_per_worker - 1e-9)
        if has_prefill and lo_p == 0:  # can the decode workers prefill locally instead (no prefill worker)?
            n_local = max(1, n_decode)
            share = rate * service / n_local  # of each decode worker's time, taken from decoding
            if share <= cfg.local_prefill_share and prefill_estimate(rate, service, n_local) <= cfg.targets.ttft_target:
                n_decode = math.ceil((rate * osl + backlog) / (tokens_per_worker * (1 - share)) - 1e-9)
                return bounds.apply({Pool.PREFILL: 0, Pool.DECODE: n_decode}, {
                    Pool.PREFILL: f"decode workers prefill locally ({share:.0%} of their time)", Pool.DECODE:
                    f"{rate * osl:.0f} tok/s at {tokens_per_worker * (1 - share):.0f} tok/s/worker with local prefill"})
        why_p = (f"rate {rate:.2f}/s, uncached ISL {isl * (1 - hit):.0f} -> TTFT est "
                 f"{prefill_estimate(rate, service, n_prefill):.3g}s (x{state.ttft_correction:.2f})")
        why_d = f"{rate * osl:.0f} tok/s at {tokens_per_worker:.0f} tok/s/worker (c={c_star:.1f}, x{state.itl_correction:.2f})"
        state.estimates = {"rate": rate, "isl": isl, "osl": osl, "hit": hit, "ttft_est": prefill_estimate(
            rate, service, n_prefill)}
        if has_prefill:
            return bounds.apply({Pool.PREFILL: n_prefill, Pool.DECODE: n_decode},
                                {Pool.PREFILL: why_p, Pool.DECODE: why_d})
        return bounds.apply({Pool.PREFILL: 0, Pool.DECODE: max(n_prefill, n_decode)},
                            {Pool.PREFILL: "pool disabled (max 0)", Pool.DECODE: f"{why_d}; local prefill: {why_p}"})

    decision = size(rate)
    lower = [p for p in Pool if decision.counts[p] < current.get(p, 0)]
    for p in Pool:
        if p not in lower:
            state.down_ok[p] = 0
    if not lower:
        return decision
    # removing workers: the load must fit with a margin, and have fitted for a few intervals in a row
    cautious = size(rate * (1 + cfg.down_margin))
    counts, reasons = dict(decision.counts), dict(decision.reasons)
    for p in lower:
        target = min(current[p], max(decision.counts[p], cautious.counts[p]))
        state.down_ok[p] = state.down_ok.get(p, 0) + 1 if target < current[p] else 0
        if target < current[p] and state.down_ok[p] < cfg.down_stable_intervals:
            reasons[p] = f"{reasons[p]}; {state.down_ok[p]}/{cfg.down_stable_intervals} intervals before removing"
            target = current[p]
        elif target == current[p]:
            reasons[p] = f"{reasons[p]}; holds: not below {current[p]} with a {cfg.down_margin:.0%} margin"
        counts[p] = target
    return bounds.apply(counts, reasons)

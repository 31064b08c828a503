"""Workers' prefill speed, learned online from first-token times (issue 27), for the kv router's
expected-TTFT cost.

The fallback for workers that do not report their prefill throughput (`LoadMetrics.prefill_rate` 0: a
fresh worker, or the vLLM engine), so the frontend measures it: for each request it tells `observe(worker, tokens, seconds)`
with `tokens` = the prefill work the router expected before the request's first token (the worker's
queued prefill tokens at routing time + the request's own uncached tokens) and `seconds` = the time from
sending the request to its first token. The model is `seconds = overhead + tokens / rate`, fitted by
least squares over exponentially decayed samples (half-life `half_life` samples), so a worker that slows
down is followed. The fixed overhead (RPC, scheduling) is fitted but not used: it is the same wherever the
request goes. Until a worker has `min_samples` samples spanning a range of token counts (no slope can be
fitted from equal x), or when the fit is not a positive slope, its rate is `prior` tokens/s; a fitted rate
is clamped to [prior / 100, prior * 100] (a burst of overhead-dominated samples must not make one worker
look free or frozen).

One fit over all workers by default: fitted per worker, identical mocker workers behind a busy frontend
(issue 27's benchmark, first tokens read 270 ms p50 after the worker produced them) got rates from 13K
to 2M tokens/s, the frontend's own lag dominating each worker's few samples, and those differences moved
conversations away from their cached history. `per_worker=True` is for fleets of unequal workers whose
first-token times the frontend's lag does not dominate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_PRIOR = 20_000.0  # tokens/s: the order of an 8B model's prefill on one modern GPU


@dataclass
class _Fit:
    n: float = 0.0  # decayed sample weight; the sums below are decayed alike
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    count: int = 0  # samples seen (not decayed)


class PrefillRate:
    def __init__(self, prior: float = DEFAULT_PRIOR, half_life: float = 64.0, min_samples: int = 8,
                 per_worker: bool = False):
        """`per_worker`: fit each worker on its own samples; else (the default) one fit over every
        worker's samples, which every worker gets."""
        if not prior > 0:
            raise ValueError("the prior prefill rate must be > 0 tokens/s")
        self.prior, self.min_samples, self.per_worker = prior, min_samples, per_worker
        self._decay = 0.5 ** (1.0 / half_life)
        self._fits: dict[str, _Fit] = {}

    def observe(self, worker_id: str, tokens: float, seconds: float) -> None:
        if not (seconds > 0 and tokens >= 0 and math.isfinite(seconds) and math.isfinite(tokens)):
            return
        f = self._fits.setdefault(worker_id if self.per_worker else "", _Fit())
        d = self._decay
        f.n, f.sx, f.sy = f.n * d + 1, f.sx * d + tokens, f.sy * d + seconds
        f.sxx, f.sxy = f.sxx * d + tokens * tokens, f.sxy * d + tokens * seconds
        f.count += 1

    def rate(self, worker_id: str) -> float:
        """Prefill tokens per second on the worker (the prior until enough samples)."""
        f = self._fits.get(worker_id if self.per_worker else "")
        if f is None or f.count < self.min_samples:
            return self.prior
        var = f.sxx / f.n - (f.sx / f.n) ** 2
        mean_x = f.sx / f.n
        if var <= (0.05 * max(mean_x, 1.0)) ** 2:  # token counts too alike to separate slope from overhead
            return self.prior
        slope = (f.sxy / f.n - mean_x * f.sy / f.n) / var
        if slope <= 0:
            return self.prior
        return min(max(1.0 / slope, self.prior / 100), self.prior * 100)

    def forget(self, worker_id: str) -> None:
        self._fits.pop(worker_id, None)

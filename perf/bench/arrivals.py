"""When requests are sent: a closed loop at fixed concurrency, or an open loop of arrival times.

- closed: `--concurrency` workers, each sending its next request as soon as its last one finished.
- poisson / gamma: inter-arrival gaps drawn from a gamma distribution with shape `--burstiness` and
  mean 1/`--request-rate` (shape 1 is the exponential, i.e. Poisson arrivals; < 1 is burstier, > 1
  more regular), as `vllm bench serve --burstiness` does. A rate of inf sends everything at once.
- trace: the trace's own timestamps, divided by `--trace-speedup`.
Open-loop arrivals are scheduled on absolute times (t0 + offset), so a late wake-up is not carried
into the next gap; `--concurrency` then caps requests in flight (a capped request waits for a slot).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from kvrelay.perf.bench.config import BenchConfig
from kvrelay.perf.bench.workloads import RequestSpec

_ARRIVALS_STREAM = 97


def gamma_gaps(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """Endless inter-arrival gaps (s): gamma(shape=burstiness, scale=1/(rate*burstiness)); mean 1/rate."""
    if math.isinf(rate):
        while True:
            yield 0.0
    gen = np.random.default_rng([seed, _ARRIVALS_STREAM])
    scale = 1.0 / (rate * burstiness)
    while True:
        yield from gen.gamma(burstiness, scale, 1024).tolist()


def offsets(gaps: Iterable[float]) -> Iterator[float]:
    """Cumulative arrival offsets (s) from the start: the first request goes at 0."""
    t = 0.0
    for gap in gaps:
        yield t
        t += gap


def schedule(cfg: BenchConfig, requests: Iterator[RequestSpec]) -> Iterator[tuple[float, RequestSpec]]:
    """(offset in seconds from the measured start, request) pairs for the open-loop modes."""
    mode = cfg.arrival_mode()
    if mode == "trace":
        for spec in requests:
            yield (spec.timestamp_ms or 0.0) / 1000.0 / cfg.trace_speedup, spec
        return
    if mode not in ("poisson", "gamma"):
        raise ValueError(f"{mode} arrivals have no schedule")
    assert cfg.request_rate is not None
    shape = 1.0 if mode == "poisson" else cfg.burstiness
    yield from zip(offsets(gamma_gaps(cfg.request_rate, shape, cfg.seed)), requests, strict=False)


def max_in_flight(cfg: BenchConfig) -> int | None:
    """Closed loop: the number of workers; open loop: the cap (None = unbounded)."""
    if cfg.arrival_mode() == "closed":
        return cfg.concurrency or 1
    return cfg.concurrency

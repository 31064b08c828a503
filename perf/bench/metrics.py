"""From request records to the numbers a run reports.

Latencies are in milliseconds: TTFT and e2e per request, TPOT = (e2e - TTFT)/(output_tokens - 1) per
request with >= 2 output tokens, ITL over every gap between content chunks of every request (as vLLM
and aiperf pool them). Percentiles interpolate linearly (numpy's default). Throughputs divide by the
measured window: first request sent to last stream ended (warm-up excluded).
Goodput (`--slo ttft=..,itl=..,tpot=..,e2e=..`, ms) counts successful requests meeting every bound:
ttft, tpot and e2e per request; itl as the request's mean inter-token gap (aiperf's per-request ITL).
Prefix hit rate = sum(cached_tokens) / sum(prompt_tokens) over requests that report cached_tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from kvrelay.perf.bench.client import RequestRecord
from kvrelay.perf.bench.config import BenchConfig

MS = 1000.0


class Stat(msgspec.Struct):
    count: int = 0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


class Summary(msgspec.Struct, kw_only=True):
    requests: int
    succeeded: int
    failed: int
    duration_s: float
    request_throughput: float  # successful requests / s
    input_token_throughput: float  # prompt tokens / s
    output_token_throughput: float  # output tokens / s
    total_token_throughput: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int | None
    prefix_hit_rate: float | None
    ttft_ms: Stat
    itl_ms: Stat
    tpot_ms: Stat
    e2e_ms: Stat
    slo_ms: dict[str, float] = {}
    slo_attainment: float | None = None  # share of all requests meeting every SLO
    goodput: float | None = None  # requests meeting every SLO / s
    output_length_mismatches: int = 0  # succeeded with output tokens != max_tokens asked
    errors: dict[str, int] = {}


class BenchResult(msgspec.Struct, kw_only=True):
    kvrelay_version: str
    started_at: str  # ISO 8601, UTC
    model: str
    config: BenchConfig
    summary: Summary
    warmup_requests: int
    records: list[RequestRecord]


def stat(values: Sequence[float], scale: float = MS) -> Stat:
    if len(values) == 0:
        return Stat()
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(a, [50, 90, 99]).tolist()
    return Stat(count=len(a), mean=float(a.mean()), std=float(a.std()), min=float(a.min()), p50=p50, p90=p90,
                p99=p99, max=float(a.max()))


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    if not rec.ok or rec.ttft is None:
        return False
    values = {"ttft": rec.ttft, "e2e": rec.e2e, "tpot": rec.tpot,
              "itl": sum(rec.itl) / len(rec.itl) if rec.itl else None}
    for key, bound_ms in slo.items():
        value = values[key]
        if value is not None and value * MS > bound_ms:
            return False
    return True


def window(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def summarize(records: Sequence[RequestRecord], slo: dict[str, float] | None = None) -> Summary:
    slo = slo or {}
    ok = [r for r in records if r.ok]
    duration = window(records)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    prompt, output = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    reporting = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens or 0 for r in reporting) if reporting else None
    reported_prompt = sum(r.prompt_tokens for r in reporting)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = r.error.split(":", 1)[0][:80]
            errors[key] = errors.get(key, 0) + 1
    good = sum(1 for r in ok if meets_slo(r, slo)) if slo else None
    return Summary(
        requests=len(records), succeeded=len(ok), failed=len(records) - len(ok), duration_s=duration,
        request_throughput=per_s(len(ok)), input_token_throughput=per_s(prompt),
        output_token_throughput=per_s(output), total_token_throughput=per_s(prompt + output),
        prompt_tokens=prompt, output_tokens=output, cached_tokens=cached,
        prefix_hit_rate=(cached / reported_prompt if cached is not None and reported_prompt else None),
        ttft_ms=stat([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=stat([g for r in ok for g in r.itl]),
        tpot_ms=stat([t for r in ok if (t := r.tpot) is not None]),
        e2e_ms=stat([r.e2e for r in ok]),
        slo_ms=dict(slo),
        slo_attainment=(good / len(records) if good is not None and records else None),
        goodput=(per_s(good) if good is not None else None),
        output_length_mismatches=sum(1 for r in ok if r.usage_reported and r.output_tokens != r.expected_output_tokens),
        errors=errors,
    )


_NICE_BUCKETS_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def bucket_for(duration_s: float, buckets: int = 40) -> float:
    """A round bucket width giving about `buckets` buckets over the run."""
    return next((b for b in _NICE_BUCKETS_S if b * buckets >= duration_s), _NICE_BUCKETS_S[-1])


def timeline(records: Sequence[RequestRecord], bucket_s: float | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bucket edges from the start (s), finished requests/s, output tokens/s per bucket), from the
    chunk arrival times (a request's output tokens spread evenly over its content chunks)."""
    ok = [r for r in records if r.ok and r.ttft is not None]
    if not ok:
        return np.zeros(1), np.zeros(0), np.zeros(0)
    t0 = min(r.start for r in records)
    span = max(r.end for r in records) - t0
    bucket_s = bucket_s or bucket_for(span)
    n = max(1, int(np.ceil(span / bucket_s)))
    done, tokens = np.zeros(n), np.zeros(n)
    for r in ok:
        done[min(n - 1, int((r.end - t0) / bucket_s))] += 1
        times = r.start + (r.ttft or 0.0) + np.concatenate([[0.0], np.cumsum(r.itl)])
        idx = np.minimum(n - 1, ((times - t0) / bucket_s).astype(int))
        np.add.at(tokens, idx, r.output_tokens / len(times))
    return np.arange(n + 1) * bucket_s, done / bucket_s, tokens / bucket_s

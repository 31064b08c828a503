"""Turning two scrapes into an `Observation`, and the `Observer` that scrapes each interval.

Workers are found in discovery (their `metrics` label is the /metrics address, their role picks the
pool, `max_num_seqs` their capacity); the planner never talks to engine internals. With a Prometheus
URL the same series are read from the server instead of each /metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from kvrelay.planner.observation import Observation, Pool, PoolObservation
from kvrelay.planner.scrape import Scrape, query_prometheus, scrape_url
from kvrelay.runtime.discovery import Discovery, list_instances

log = logging.getLogger(__name__)

FRONTEND_SERIES = ("kvrelay_frontend_request_seconds_count", "kvrelay_frontend_inflight_requests", "kvrelay_frontend_prompt_tokens_total",
                   "kvrelay_frontend_cached_prompt_tokens_total", "kvrelay_frontend_completion_tokens_total",
                   "kvrelay_frontend_ttft_seconds_bucket", "kvrelay_frontend_itl_seconds_bucket")
WORKER_SERIES = ("kvrelay_worker_running", "kvrelay_worker_waiting", "kvrelay_worker_used_blocks",
                 "kvrelay_worker_total_blocks", "kvrelay_worker_prompt_tokens_total",
                 "kvrelay_worker_generated_tokens_total")
QUANTILE = 0.9


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    pool: Pool
    metrics_address: str
    max_num_seqs: int


def role_pool(role: str) -> Pool | None:
    return {"prefill": Pool.PREFILL, "decode": Pool.DECODE, "agg": Pool.DECODE}.get(role)


async def registered_counts(discovery: Discovery, namespace: str) -> dict[Pool, int]:
    """Workers per pool registered in discovery now."""
    counts = {p: 0 for p in Pool}
    for inst in await list_instances(discovery, namespace):
        pool = role_pool(inst.role)
        if pool is not None:
            counts[pool] += 1
    return counts


def histogram_quantile(q: float, prev: list[tuple[float, float]], cur: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over the window's bucket increments (linear within a bucket);
    None when the window observed nothing."""
    before = dict(prev)
    deltas = [(le, max(0.0, c - before.get(le, 0.0))) for le, c in cur]
    if not deltas or deltas[-1][1] <= 0:
        return None
    rank = q * deltas[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in deltas:
        if count >= rank:
            if le == float("inf"):
                return lower_le  # beyond the last finite bucket: its bound is the best estimate
            span = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span > 0 else 1.0)
        lower_le, lower_count = le, count
    return lower_le


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def observe(prev: Scrape, cur: Scrape, workers: list[WorkerInfo]) -> Observation:
    dt = max(1e-9, cur.at - prev.at)

    def delta(name: str) -> float:
        return max(0.0, cur.total(name) - prev.total(name))

    finished = delta("kvrelay_frontend_request_seconds_count")
    inflight = "kvrelay_frontend_inflight_requests"
    arrived = (finished + cur.total(inflight) - prev.total(inflight)) if inflight in cur.series else None
    prompt = delta("kvrelay_frontend_prompt_tokens_total")
    pools: dict[Pool, PoolObservation] = {}
    gauges = {n: cur.by(f"kvrelay_worker_{n}", "worker") for n in ("running", "waiting", "used_blocks",
                                                                   "total_blocks")}
    counters = {n: (prev.by(f"kvrelay_worker_{n}_total", "worker"), cur.by(f"kvrelay_worker_{n}_total", "worker"))
                for n in ("prompt_tokens", "generated_tokens")}
    for pool in Pool:
        members = [w for w in workers if w.pool is pool]
        ids = [w.worker_id for w in members]

        def gsum(name: str, ids=ids) -> float:
            return sum(gauges[name].get(i, 0.0) for i in ids)

        def rate(name: str, ids=ids) -> float:
            before, now = counters[name]
            # a worker new in this window (or restarted: counter went down) contributes nothing yet
            return sum(max(0.0, now.get(i, 0.0) - before.get(i, now.get(i, 0.0))) for i in ids) / dt

        total_blocks = gsum("total_blocks")
        pools[pool] = PoolObservation(
            workers=len(members), running=gsum("running"), waiting=gsum("waiting"),
            kv_usage=gsum("used_blocks") / total_blocks if total_blocks > 0 else 0.0,
            capacity_seqs=sum(w.max_num_seqs for w in members),
            prompt_tokens_rate=rate("prompt_tokens"), generated_tokens_rate=rate("generated_tokens"))
    return Observation(
        interval_s=dt, request_rate=finished / dt, arrival_rate=None if arrived is None else max(0.0, arrived) / dt,
        isl=_ratio(prompt, finished),
        osl=_ratio(delta("kvrelay_frontend_completion_tokens_total"), finished),
        ttft_p90=histogram_quantile(QUANTILE, prev.buckets("kvrelay_frontend_ttft_seconds"),
                                    cur.buckets("kvrelay_frontend_ttft_seconds")),
        itl_p90=histogram_quantile(QUANTILE, prev.buckets("kvrelay_frontend_itl_seconds"),
                                   cur.buckets("kvrelay_frontend_itl_seconds")),
        hit_rate=_ratio(delta("kvrelay_frontend_cached_prompt_tokens_total"), prompt), pools=pools)


class Observer:
    """Scrapes every interval; `next()` returns the window since the previous call (None the first time
    or when the frontend could not be read: the planner then holds)."""

    def __init__(self, discovery: Discovery, namespace: str, frontend_urls: list[str],
                 prometheus_url: str = "", timeout: float = 5.0, frontend_api_key: str = ""):
        self.discovery, self.namespace = discovery, namespace
        self.frontend_api_key = frontend_api_key  # frontends started with --api-key guard /metrics with it
        self.frontend_urls, self.prometheus_url = frontend_urls, prometheus_url
        self.client = httpx.AsyncClient(timeout=timeout)
        self._prev: Scrape | None = None
        self.registered: dict[Pool, int] = {}  # workers per pool in discovery at the last `next()`

    async def workers(self) -> list[WorkerInfo]:
        out = []
        for inst in await list_instances(self.discovery, self.namespace):
            pool = role_pool(inst.role)
            if pool is None:
                continue
            out.append(WorkerInfo(inst.instance_id, pool, inst.labels.get("metrics", ""),
                                  int(inst.labels.get("max_num_seqs", "0") or 0)))
        return out

    async def scrape(self, workers: list[WorkerInfo]) -> Scrape | None:
        if self.prometheus_url:
            try:
                return await query_prometheus(self.client, self.prometheus_url,
                                              [*FRONTEND_SERIES, *WORKER_SERIES])
            except (httpx.HTTPError, ValueError, KeyError) as e:
                log.warning("planner: prometheus query failed: %s", e)
                return None
        scrape = Scrape()
        frontends_ok = [await scrape_url(self.client, f"{u.rstrip('/')}/metrics", scrape, self.frontend_api_key)
                        for u in self.frontend_urls]
        if self.frontend_urls and not any(frontends_ok):
            log.warning("planner: no frontend /metrics answered (%s)", ", ".join(self.frontend_urls))
            return None
        for w in workers:
            if w.metrics_address:
                # the deployment's API key guards the workers' /metrics too (kvrelay serve --api-key)
                await scrape_url(self.client, f"http://{w.metrics_address}/metrics", scrape, self.frontend_api_key)
        return scrape

    async def next(self) -> Observation | None:
        workers = await self.workers()
        self.registered = {p: sum(1 for w in workers if w.pool is p) for p in Pool}
        cur = await self.scrape(workers)
        if cur is None:
            return None
        prev, self._prev = self._prev, cur
        return None if prev is None else observe(prev, cur, workers)

    async def close(self) -> None:
        await self.client.aclose()

"""Observations from a real `kvrelay serve` (mocker workers): scraped from /metrics directly, and read
back from a real Prometheus server scraping the same endpoints; both agree with what the client sent."""

from __future__ import annotations

import asyncio
import subprocess
import time

import httpx
import pytest

from kvrelay.planner.observation import Pool
from kvrelay.planner.observe import Observer, histogram_quantile
from kvrelay.runtime.discovery import list_instances
from kvrelay.runtime.discovery.file import FileDiscovery
from tests.e2e.serve import Serve
from tests.servers import free_port, wait_for_port

REQUESTS, MAX_TOKENS = 12, 8


def test_histogram_quantile_over_the_window():
    prev = [(0.1, 10.0), (0.5, 10.0), (1.0, 10.0), (float("inf"), 10.0)]
    cur = [(0.1, 10.0), (0.5, 15.0), (1.0, 20.0), (float("inf"), 20.0)]  # 10 new: 5 in (0.1,0.5], 5 in (0.5,1]
    assert histogram_quantile(0.9, prev, cur) == pytest.approx(0.9)
    assert histogram_quantile(0.9, cur, cur) is None  # nothing observed in the window: unknown, not NaN
    assert histogram_quantile(0.5, [], [(1.0, 0.0), (float("inf"), 4.0)]) == 1.0  # beyond the last bound


async def _send(url: str) -> list[dict]:
    async with httpx.AsyncClient(timeout=30) as client:
        rs = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
            "model": "kvrelay-tiny", "prompt": f"request number {i} " * (i + 1), "max_tokens": MAX_TOKENS,
            "ignore_eos": True}) for i in range(REQUESTS)))
    assert all(r.status_code == 200 for r in rs)
    return [r.json()["usage"] for r in rs]


def _check(obs, usages) -> None:
    assert obs is not None
    assert obs.request_rate * obs.interval_s == pytest.approx(REQUESTS)
    assert obs.isl == pytest.approx(sum(u["prompt_tokens"] for u in usages) / REQUESTS)
    assert obs.osl == pytest.approx(MAX_TOKENS)
    assert obs.ttft_p90 is not None and 0 < obs.ttft_p90 < 5
    assert obs.itl_p90 is not None
    decode = obs.pool(Pool.DECODE)
    assert decode.workers == 2 and decode.capacity_seqs == 2 * 64
    assert obs.pool(Pool.PREFILL).workers == 0


@pytest.fixture
def serve(tmp_path):
    s = Serve(tmp_path, "--engine", "mocker", workers=2).start()
    yield s
    s.stop()


async def test_observer_scrapes_frontend_and_workers(serve):
    disc = FileDiscovery(serve.discovery_dir, ttl=10)
    await disc.start()
    observer = Observer(disc, "default", [serve.base_url])
    try:
        assert await observer.next() is None  # the first scrape only sets the baseline
        usages = await _send(serve.base_url)
        obs = await observer.next()
        _check(obs, usages)
        assert obs.pool(Pool.DECODE).prompt_tokens_rate * obs.interval_s >= sum(u["prompt_tokens"] for u in usages)
        idle = await observer.next()  # nothing happened since: an idle window, averages unknown
        assert idle.request_rate == 0 and idle.isl is None and idle.ttft_p90 is None and idle.idle
    finally:
        await observer.close()
        await disc.close()


async def test_observer_sends_the_api_key_of_a_guarded_frontend(tmp_path):
    """A frontend started with --api-key guards /metrics: without the key the planner sees nothing (and
    holds); with it the planner observes as usual."""
    srv = Serve(tmp_path, "--engine", "mocker", "--api-key", "s3cret", workers=1).start()
    disc = FileDiscovery(srv.discovery_dir, ttl=10)
    await disc.start()
    blind = Observer(disc, "default", [srv.base_url])
    keyed = Observer(disc, "default", [srv.base_url], frontend_api_key="s3cret")
    try:
        assert await blind.scrape(await blind.workers()) is None
        assert await keyed.next() is None  # baseline
        assert (await keyed.next()) is not None
    finally:
        await blind.close()
        await keyed.close()
        await disc.close()
        srv.stop()


async def test_observer_reads_the_same_series_from_prometheus(serve, tmp_path):
    disc = FileDiscovery(serve.discovery_dir, ttl=10)
    await disc.start()
    targets = [f"127.0.0.1:{serve.port}"] + [i.labels["metrics"] for i in await list_instances(disc, "default")]
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 500ms, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: kvrelay, static_configs: [{{targets: {targets}}}]}}]\n".replace("'", "\""))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prom.log", "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    observer = Observer(disc, "default", [], prometheus_url=url)
    try:
        wait_for_port(port, timeout=30)

        async def scraped_all() -> bool:
            async with httpx.AsyncClient() as c:
                r = (await c.get(f"{url}/api/v1/query", params={"query": "up"})).json()
            return len([x for x in r["data"]["result"] if x["value"][1] == "1"]) == len(targets)

        deadline = time.monotonic() + 30
        while not await scraped_all():
            assert time.monotonic() < deadline, (tmp_path / "prom.log").read_text()[-2000:]
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # a scrape of the worker series as well
        assert await observer.next() is None
        usages = await _send(serve.base_url)
        await asyncio.sleep(2.0)  # at least one scrape after the last request
        _check(await observer.next(), usages)
    finally:
        prom.terminate()
        prom.wait(10)
        await observer.close()
        await disc.close()

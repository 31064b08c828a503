"""Dashboards and rules against a real Prometheus scraping a running `kvrelay serve` under a short load:
aggregated (G2/G3/G4 tiers) and disaggregated with the planner. Every panel query returns data through
the HTTP API; every metric a dashboard or rule names is exported by some component; promtool passes."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest
import yaml

from kvrelay.runtime.discovery import list_instances
from kvrelay.runtime.discovery.file import FileDiscovery
from tests.deploy import dashboards
from tests.deploy.local_run import moto_s3
from tests.deploy.prom import REPO, Prometheus, local_config, promtool
from tests.e2e.serve import Serve
from tests.servers import free_port

FRONTEND_AND_WORKERS = ("kvrelay-frontend.json", "kvrelay-workers.json")


def test_promtool_checks_config_and_rules(tmp_path):
    r = subprocess.run([promtool(), "check", "rules", str(dashboards.RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    cfg["rule_files"] = [str(dashboards.RULES.parent / "*.yml")]  # compose's mounts, here
    for job in cfg["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(REPO / "deploy/compose/api-key")
    (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([promtool(), "check", "config", str(tmp_path / "p.yml")], capture_output=True, text=True)
    assert r.returncode == 0 and "1 rule files found" in r.stdout, r.stdout + r.stderr


def test_a_dashboard_naming_an_unexported_metric_is_caught():
    exported = dashboards.exported_names("# TYPE kvrelay_worker_running gauge\n"
                                         "# TYPE kvrelay_frontend_ttft_seconds histogram\n")
    assert dashboards.unknown_names(["sum(kvrelay_worker_running)"], exported) == set()
    assert dashboards.unknown_names(["rate(kvrelay_frontend_ttft_seconds_bucket[1m]) / kvrelay_worker_runing"],
                                    exported) == {"kvrelay_worker_runing"}


def _load(base_url: str, model: str) -> None:
    """~16 requests, 4 at a time: shared prefixes (prefix hits), fresh prompts (lower-tier lookups),
    streamed (ITL) and not."""
    def one(i: int) -> None:
        body = {"model": model, "max_tokens": 12, "temperature": 0, "stream": i % 2 == 0,
                "messages": [{"role": "user", "content": f"shared system prefix {' '.join(['ctx'] * 50)} q{i % 4}"
                              if i < 8 else f"fresh {i} " + " ".join(f"w{i}x{j}" for j in range(50))}]}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200, r.read()
            r.read()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(16)))


def _targets(serve: Serve, extra: list[str]) -> list[str]:
    async def workers() -> list[str]:
        disc = FileDiscovery(serve.discovery_dir, ttl=10)
        await disc.start()
        try:
            return [i.labels["metrics"] for i in await list_instances(disc, "default")]
        finally:
            await disc.close()

    return [f"127.0.0.1:{serve.port}", *asyncio.run(workers()), *extra]


def _empty_panels(prom: Prometheus, files: list[str]) -> list[str]:
    empty = []
    for path in dashboards.DASHBOARDS:
        if path.name not in files:
            continue
        for title, expr in dashboards.panels(path):
            rows = prom.query(expr)
            if not rows or all(math.isnan(float(r["value"][1])) for r in rows):
                empty.append(f"{path.name}: {title}: {expr}")
    return empty


def _run(tmp_path, args: list[str], files: list[str], workers: int | None, planner_port: int | None = None):
    s3 = moto_s3(tmp_path)
    s3.start()
    serve = prom = None
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3.port}", region_name="us-east-1",
                     aws_access_key_id="t", aws_secret_access_key="t").create_bucket(Bucket="kvrelay-kv")
        env = {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}
        # a small G1 (about 64 tiny-model blocks): the load evicts into G2-G4 and the second round
        # finds its prompts there (tier hits, onboards); "always": loopback tiers lose to the tiny
        # model's recompute in the cost model
        serve = Serve(tmp_path, *args, "--kv-cache-bytes", "2MiB", "--kv-onboard", "always", "--kv-object-store", f"s3://kvrelay-kv?endpoint=http://127.0.0.1:{s3.port}",
                      workers=workers, env=env).start(timeout=90)
        extra = [f"127.0.0.1:{planner_port}"] if planner_port else []
        targets = _targets(serve, extra)
        prom = Prometheus(tmp_path, local_config([{"job_name": "kvrelay", "static_configs": [{"targets": targets}]}]))
        prom.wait_up(len(targets))
        model = httpx.get(f"{serve.base_url}/v1/models", timeout=5).json()["data"][0]["id"]
        _load(serve.base_url, model)
        time.sleep(2.5)  # two scrapes after the load
        for _ in range(6):  # more rounds (until every panel has data): cached prefixes, evicted blocks found in
            # lower tiers; on a loaded machine the first rounds may not reach every tier within the scrape window
            _load(serve.base_url, model)
            time.sleep(2.5)
            empty = _empty_panels(prom, files)
            if not empty:
                break
        assert empty == []
        tiers = {r["metric"]["tier"] for r in prom.query("kvrelay_kv_tier_enabled == 1")}
        assert tiers == {"G2", "G3", "G4"}
        groups = httpx.get(f"{prom.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert rules and [r["name"] for r in rules if r["health"] != "ok"] == []  # the rules evaluate
        exported = set()
        for t in targets:
            exported |= dashboards.exported_names(httpx.get(f"http://{t}/metrics", timeout=5).text)
        return exported
    finally:
        if prom is not None:
            prom.stop()
        if serve is not None:
            serve.stop()
        s3.stop()


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return set()


def test_aggregated_serve_fills_frontend_and_worker_panels(tmp_path, exported):
    exported |= _run(tmp_path, [], list(FRONTEND_AND_WORKERS), workers=2)


def test_disaggregated_serve_with_planner_fills_every_panel(tmp_path, exported):
    port = free_port()
    # dry run with min decode 2 over 1 decode worker: the planner decides (a decision series) but never acts
    args = ["--prefill-workers", "1", "--decode-workers", "1", "--kv-transfer", "tcp", "--disagg-min-tokens", "32",
            "--planner", "load", "--dry-run", "--min-decode", "2", "--min-prefill", "1", "--planner-interval", "1",
            "--planner-port", str(port)]
    exported |= _run(tmp_path, args, [p.name for p in dashboards.DASHBOARDS], workers=None, planner_port=port)


def test_every_metric_named_by_dashboards_and_rules_is_exported(exported):
    if not exported:
        pytest.skip("needs the two serve runs above (run the module)")
    exprs = [e for p in dashboards.DASHBOARDS for _, e in dashboards.panels(p)] + dashboards.rule_exprs()
    assert dashboards.unknown_names(exprs, exported) == set()

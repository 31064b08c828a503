"""A real Prometheus server (Debian `prometheus`) for the deploy tests, and its HTTP query API."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed: apt-get install -y prometheus (see .ci/run)")
    return path


class Prometheus:
    def __init__(self, workdir: Path, config: dict, port: int | None = None):
        if shutil.which("prometheus") is None:
            pytest.fail("prometheus not installed: apt-get install -y prometheus (see .ci/run)")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        subprocess.run([promtool(), "check", "config", str(self.config_path)], check=True, capture_output=True)
        self.log_path = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"))  # noqa: SIM115 - owned by the child
        wait_for_port(self.port, timeout=30)

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", (expr, r)
        return r["data"]["result"]

    def wait_up(self, n: int, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            up = [x for x in self.query("up") if x["value"][1] == "1"]
            if len(up) >= n:
                return
            assert time.monotonic() < deadline, (self.query("up"), self.log_path.read_text()[-2000:])
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def local_config(scrape_configs: list[dict], interval: str = "1s") -> dict:
    """A test Prometheus: fast scrapes, the deploy rules loaded (so they are evaluated, not just parsed)."""
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(RULES / "*.yml")], "scrape_configs": scrape_configs}

"""Issue 14: `/ready` is 200 only when a request would be routed now. A load balancer sends traffic at
the first 200; in the disaggregated shape that used to come as soon as the prefill worker registered,
and the request then got 503 `no_worker`."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tests.e2e.serve import Serve

MODEL = "kvrelay-tiny"
LAUNCHES = 10


def first_ready(srv: Serve, timeout: float = 90.0) -> dict:
    """Start `srv` and return the body of its first 200 from /ready, polling as a load balancer would."""
    srv.proc = subprocess.Popen(srv.argv, stdout=srv.log, stderr=subprocess.STDOUT, env=srv.env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert srv.proc.poll() is None, srv.read_log()
        try:
            r = httpx.get(f"{srv.base_url}/ready", timeout=1)
            if r.status_code == 200:
                return r.json()
            assert r.status_code == 503 and r.json()["status"] == "not ready"
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise TimeoutError(srv.read_log())


@pytest.mark.timeout(400)
def test_first_ready_of_a_disaggregated_launch_serves(tmp_path):
    failures = []
    for i in range(LAUNCHES):
        run = tmp_path / str(i)
        run.mkdir()
        srv = Serve(run, "--engine", "mocker", "--prefill-workers", "1", "--decode-workers", "1",
                    "--disagg-min-tokens", "8", workers=None)
        try:
            body = first_ready(srv)
            assert body["models"] == [MODEL] and body["workers"] == 2, body
            r = httpx.post(f"{srv.base_url}/v1/completions", timeout=60,
                           json={"model": MODEL, "prompt": "The first request after ready " * 3, "max_tokens": 4})
            if r.status_code != 200:
                failures.append((i, r.status_code, r.text[:200]))
        finally:
            assert srv.stop() == 0
    assert failures == []

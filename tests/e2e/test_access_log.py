"""The operator's view of a running server (issue 30): one access log line per request (model, tokens,
TTFT, total time; never the prompt), probes kept out of INFO, `--no-access-log`, 405 for a wrong
method, httpx's per-request lines off, and a Ctrl-C drain that says how to stop at once."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kvrelay.perf.serve_process import free_port, wait_until_up
from tests.e2e.serve import Serve

SECRET = "zebra-marmalade-7731"  # prompt text that must never reach the log


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("access"), workers=1).start()
    yield srv
    srv.stop()


def access_lines(srv: Serve, needle: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in srv.read_log().splitlines() if "kvrelay.access:" in ln and needle in ln]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_one_line_per_request_with_tokens_and_times_never_the_prompt(served):
    r = httpx.post(f"{served.base_url}/v1/completions", timeout=60,
                   json={"model": "kvrelay-tiny", "prompt": SECRET, "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    (line,) = access_lines(served, "POST /v1/completions 200")
    m = re.search(r"model=kvrelay-tiny prompt_tokens=(\d+) completion_tokens=5 ttft_ms=([\d.]+) total_ms=([\d.]+)",
                  line)
    assert m and int(m[1]) == prompt_tokens and 0 < float(m[2]) <= float(m[3]), line
    with httpx.stream("POST", f"{served.base_url}/v1/chat/completions", timeout=60,
                      json={"model": "kvrelay-tiny", "stream": True, "max_tokens": 3, "ignore_eos": True,
                            "messages": [{"role": "user", "content": SECRET}]}) as s:
        assert s.status_code == 200 and "[DONE]" in "".join(s.iter_text())
    (line,) = access_lines(served, "POST /v1/chat/completions 200")
    assert "completion_tokens=3" in line and "ttft_ms=-" not in line, line
    assert SECRET not in served.read_log()


def test_a_wrong_method_is_405_with_allow_and_logged(served):
    r = httpx.get(f"{served.base_url}/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.post(f"{served.base_url}/v1/models").status_code == 405
    assert access_lines(served, "GET /v1/chat/completions 405")
    assert httpx.get(f"{served.base_url}/v1/no-such-route").status_code == 404


def test_probes_stay_out_of_the_info_log(served):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(served.base_url + path).status_code == 200
    assert httpx.get(f"{served.base_url}/v1/models").status_code == 200
    assert access_lines(served, "GET /v1/models 200")
    assert not [ln for ln in served.read_log().splitlines() if re.search(r"GET /(health|ready|metrics) ", ln)]


def test_ctrl_c_drain_says_how_to_stop_now(served):
    assert served.stop(signal.SIGINT) == 0
    assert "press Ctrl-C again to stop now" in Path(served.log.name).read_text()


@pytest.mark.parametrize("flag", ["--access-log", "--no-access-log"])
def test_no_access_log_turns_it_off(tmp_path, flag):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", "frontend", "--events", "inproc",
                             "--http-port", str(port), "--discovery-dir", str(tmp_path), flag],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/health", 30, lambda: "", "frontend")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
    assert ("GET /v1/models 200" in err) == (flag == "--access-log"), err


def test_httpx_request_lines_are_off_after_setup_logging():
    from kvrelay.runtime.log import setup_logging

    setup_logging("INFO")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)

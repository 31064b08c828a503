"""A `kvrelay serve` child process on a free port (benchmarks and end-to-end tests share it)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from kvrelay.runtime.free_port import free_port


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float, log: Callable[[], str], what: str,
                  poll_s: float = 0.1) -> None:
    """Polls `url` until it answers 200; the process exiting first or `timeout` passing raises with
    the tail of its log (what a failed start needs to be understood)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{what} exited early: {log()}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not ready in {timeout}s: {log()}")


class Serve:
    def __init__(self, tmp: Path, *args: str, workers: int | None = 2, env: dict | None = None,
                 model: str = "tiny", http_workers: int | None = 1):
        """`workers=None`: no `--workers` flag (for `--prefill-workers/--decode-workers`). `model` is
        used unless `args` name one (`--model`); tests default to the fast tiny model. The run's
        internal token is chosen here (`internal_token`) so that tests can call the workers directly.
        `http_workers`: HTTP processes (1 unless a test or benchmark asks for more: one process's
        /metrics and child list are exact at once; None = serve's default, the cores available)."""
        self.port = free_port()
        self.discovery_dir = str(tmp / "discovery")
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "kvrelay.cli.main", "serve", "--http-port", str(self.port),
                     *(["--workers", str(workers)] if workers is not None else []), *args]
        if "--model" not in args:
            self.argv += ["--model", model]
        if http_workers is not None and "--http-workers" not in args:
            self.argv += ["--http-workers", str(http_workers)]
        if "--discovery" not in args:
            self.argv += ["--discovery-dir", self.discovery_dir]
        self.log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.env = {**os.environ, "KVRELAY_INTERNAL_TOKEN": secrets.token_urlsafe(16), **(env or {})}
        self.internal_token = self.env["KVRELAY_INTERNAL_TOKEN"]
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self, timeout: float = 60.0) -> Serve:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        wait_until_up(self.proc, f"{self.base_url}/ready", timeout, self.read_log, "serve")
        return self

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def children(self) -> list[int]:
        assert self.proc is not None, "not started"
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def http_children(self) -> list[int]:
        """The HTTP processes besides serve's own (`--http-workers N`: N-1 of them)."""
        return [p for p in self.children()
                if b"--http-fd" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

"""NVIDIA Dynamo's frontend + mocker as processes, for side-by-side benchmarks (never a dependency).

Dynamo is installed in its own environment (`--dynamo-python`, e.g. a venv with `pip install --no-deps
ai-dynamo ai-dynamo-runtime` plus aiohttp, kubernetes, redis, zstandard); this only starts it:
`python -m dynamo.frontend` and `python -m dynamo.mocker --speedup-ratio 1e9` (like ours: effectively no
simulated time; its `0` measured ~100 req/s here, i.e. it still simulated decode steps), on file discovery
(`DYN_FILE_KV` in a private directory), the TCP request plane and ZMQ events.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from kvrelay.runtime.free_port import free_port


class DynamoServe:
    def __init__(self, python: str, workdir: Path, model_dir: str, model_name: str, router_mode: str | None = "kv",
                 speedup: str = "1e9"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model_name = model_name
        env = {**os.environ, "DYN_FILE_KV": str(workdir / "dynamo-kv"), "TMPDIR": str(workdir)}
        common = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
        self._logs = [open(workdir / f"dynamo-{n}.log", "wb") for n in ("frontend", "mocker")]  # noqa: SIM115
        self.procs = [
            subprocess.Popen([python, "-m", "dynamo.frontend", "--http-port", str(self.port),
                              *(["--router-mode", router_mode] if router_mode else []), *common],
                             stdout=self._logs[0], stderr=subprocess.STDOUT, env=env, cwd=workdir),
            subprocess.Popen([python, "-m", "dynamo.mocker", "--model-path", model_dir, "--model-name", model_name,
                              "--speedup-ratio", speedup, *common], stdout=self._logs[1], stderr=subprocess.STDOUT,
                             env=env, cwd=workdir),
        ]
        self.workdir = workdir

    def start(self, timeout: float = 120.0) -> DynamoServe:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                r = httpx.post(f"{self.base_url}/v1/completions", timeout=5, json={
                    "model": self.model_name, "prompt": [100, 101, 102], "max_tokens": 1})
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        logs = "\n".join((self.workdir / f"dynamo-{n}.log").read_text()[-2000:] for n in ("frontend", "mocker"))
        raise RuntimeError(f"Dynamo did not start:\n{logs}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()

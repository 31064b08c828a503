"""vLLM's own OpenAI server as a child process (the reference for the vllm lane and perf/vllm_bench.py):
`python -m vllm.entrypoints.openai.api_server` from the running interpreter (the vLLM virtualenv)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvrelay.perf.serve_process import free_port, wait_until_up


class VllmServer:
    def __init__(self, log_dir: Path, model: str, served_name: str, *extra: str, cpus: str = "",
                 start_s: float = 600.0):
        """`cpus`: VLLM_CPU_OMP_THREADS_BIND for the server (the cores a kvrelay worker would get)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(log_dir) / f"vllm-server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **({"VLLM_CPU_OMP_THREADS_BIND": cpus} if cpus else {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--served-model-name", served_name, "--port", str(self.port), "--host", "127.0.0.1",
             "--enable-prefix-caching", "--enable-prompt-tokens-details", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_up(self.proc, f"{self.base_url}/health", start_s, self.read_log, "vLLM's server", poll_s=0.5)
        except (AssertionError, TimeoutError):
            self.stop()
            raise

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

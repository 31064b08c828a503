"""Run a deployment manifest's kvrelay containers as local processes (no container runtime here).

A container's command, arguments and environment are kept as written; only what a container network
would resolve is mapped onto this machine: service/host names -> 127.0.0.1, each container port ->
a free loopback port of its own (two containers may both listen on 9100), `0.0.0.0` -> 127.0.0.1
(tests bind loopback only).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.servers import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[2]
# Flags whose value is a port the process itself listens on.
LISTEN_PORT_FLAGS = ("--port", "--http-port", "--metrics-port", "--planner-port")


@dataclass
class HostMap:
    """(host, container port) -> loopback port. `host` is a service name (compose) or DNS name (k8s)."""

    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, host: str, port: int, local: int | None = None) -> int:
        return self.ports.setdefault((host, port), local or free_port())

    def hosts(self) -> set[str]:
        return {h for h, _ in self.ports}

    def text(self, value: str, own: str | None = None) -> str:
        """`host:port` anywhere in `value` (URLs, endpoint lists) -> 127.0.0.1:<mapped>."""
        def sub(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            if host in ("127.0.0.1", "localhost", "0.0.0.0") and own is not None:
                host = own
            local = self.ports.get((host, port))
            return f"127.0.0.1:{local}" if local is not None else m.group(0)

        return re.sub(r"([A-Za-z0-9_.-]+):(\d+)", sub, value)

    def host(self, value: str) -> str:
        """A bare listen/advertise address: a known host name or 0.0.0.0 -> 127.0.0.1."""
        return "127.0.0.1" if value in self.hosts() or value == "0.0.0.0" else value

    def env(self, env: dict[str, str]) -> dict[str, str]:
        return {k: self.host(v) if k.endswith("_HOST") else self.text(v) for k, v in env.items()}

    def argv(self, args: list[str], own: str) -> list[str]:
        """Both flag spellings: `--port 7000` (compose) and `--port=7000` (the chart)."""
        split = []
        for a in args:
            flag, eq, value = a.partition("=")
            split += [flag, value] if eq and flag.startswith("--") else [a]
        out = []
        for i, a in enumerate(split):
            if i > 0 and split[i - 1] in LISTEN_PORT_FLAGS and a.isdigit() and (own, int(a)) in self.ports:
                out.append(str(self.ports[(own, int(a))]))
            elif i > 0 and split[i - 1].endswith("-host"):
                out.append(self.host(a))
            else:
                out.append(self.text(a, own))
        return out


@dataclass
class Container:
    name: str  # the service (compose) or Deployment/container (k8s) it came from
    args: list[str]  # what follows the image's entrypoint `kvrelay`
    env: dict[str, str]


class LocalProcesses:
    """Started containers; `stop()` SIGTERMs each (their drain path) and reaps it."""

    def __init__(self, workdir: Path):
        self.workdir, self.procs = workdir, {}

    def start(self, c: Container, extra_env: dict[str, str] | None = None) -> None:
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
               "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)),
               # the image's KVRELAY_CACHE_DIR holds models and G3; locally the user cache (models are
               # built once per machine) and a G3 directory of this test
               "KVRELAY_KV_DISK_DIR": str(self.workdir / f"kv-{c.name}"), **c.env, **(extra_env or {})}
        log = open(self.workdir / f"{c.name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[c.name] = subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", *c.args], env=env,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text()[-3000:]

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            assert p.poll() is None, f"{name} exited {p.returncode}:\n{self.log(name)}"

    def stop(self) -> dict[str, int]:
        codes = {}
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                codes[name] = p.wait()
        return codes


def wait_http(url: str, procs: LocalProcesses | None = None, timeout: float = 60.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check_alive()
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == status:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.2)
    raise AssertionError(f"{url} not {status} after {timeout}s: {last}")


def nats_jetstream(workdir: Path) -> ServerProcess:
    from tests.servers import _require

    port = free_port()
    argv = [_require("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir / "js")]
    return ServerProcess("nats-server", argv, port, workdir / "nats.log")


def moto_s3(workdir: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return ServerProcess("moto", argv, port, workdir / "moto.log")


def chat(base_url: str, model: str, content: str, api_key: str = "", max_tokens: int = 8) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(f"{base_url}/v1/chat/completions", headers=headers, timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()

"""`--http-workers N` (issue 19): N HTTP processes of one frontend serving one port, for
`kvrelay frontend` and `kvrelay serve`.

The owning process binds the listening socket (SO_REUSEADDR only: never SO_REUSEPORT, which would let a
second kvrelay, or anything else, bind the same busy port and take half its connections), serves on it itself and
starts N-1 `kvrelay frontend --http-fd FD` children that inherit it. All accept from that one
socket's queue, so a process that dies loses only the connections it had accepted: a connection
still waiting in the queue is accepted by a survivor (with one SO_REUSEPORT socket per process the
kernel would reset the ones queued on the dead process's socket). A child that crashes is restarted
by the fleet that owns it (runtime/fleet.py). Each process has its own router; they share state through the event plane: every
process builds the KV index from the workers' KV events, publishes its in-flight load to the others
(frontend/peer_load.py) and answers /metrics for all of them (frontend/peer_metrics.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

from kvrelay.cli.child_env import child_env
from kvrelay.runtime.auth import TOKEN_ENV
from kvrelay.runtime.config import ConfigError, env_name, flag_name
from kvrelay.runtime.fleet import Fleet, ProcessPlan

SYNC_WAIT_S = 30.0  # `kvrelay serve`: how long the owner waits to see every worker before starting the others
MAX_AUTO = 8  # past this, one machine's frontend is better split into replicas (and workers need the cores)
ENV = "KVRELAY_HTTP_WORKERS"
GROUP_ENV = "KVRELAY_HTTP_GROUP"  # set by the owner for its children: the id their /metrics is merged under
GROUP_SIZE_ENV = "KVRELAY_HTTP_GROUP_SIZE"  # ... and how many HTTP processes the group has


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-workers", default=None, metavar="N",
                   help=f"HTTP processes serving the port, each with its own router sharing load and KV "
                        f"index through the event plane (env {ENV}; default: {default_rule()})")
    p.add_argument("--http-fd", type=int, default=None, help=argparse.SUPPRESS)  # a child: serve this socket


def default_rule() -> str:
    return (f"the cores available to this process less one per local worker and one for everything else, "
            f"at least 1, at most {MAX_AUTO}")


def default_count(local_workers: int) -> int:
    """The HTTP processes a machine's cores leave room for (issue 33): each local worker's engine loop and the
    rest of the machine (its load balancer, a load generator, the OS) get a core first. Measured on 2 cores
    with one mocker worker and aiperf beside it: 2 HTTP processes served 0.73-0.81x the requests of one
    (perf/RESULTS.md, "kvrelay's frontend vs Dynamo as a user compares them")."""
    return max(1, min(available_cores() - local_workers - 1, MAX_AUTO))


def count(args: argparse.Namespace, events: str, local_workers: int = 0) -> int:
    """The number of HTTP processes: the flag, else the env var, else `default_count` (1 with `--events
    inproc`, which cannot reach another process)."""
    if getattr(args, "http_fd", None) is not None:
        return 1  # a child never starts more
    raw, source = args.http_workers, "--http-workers"
    if raw is None and ENV in os.environ:
        raw, source = os.environ[ENV], f"--http-workers (from {ENV})"
    if raw is None:
        return 1 if events == "inproc" else default_count(local_workers)
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"{source}: expected int, got {raw!r}") from None
    if n < 1:
        raise ConfigError(f"{source}: must be >= 1, got {n}")
    if n > 1 and events == "inproc":
        raise ConfigError(f"{source}: {n} HTTP processes share load and KV index over the event plane; "
                          "--events inproc reaches no other process (use zmq or nats)")
    return n


def available_cores() -> int:
    """CPUs this process may run on, bounded by its cgroup's CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def listen(host: str, port: int) -> socket.socket:
    """The one listening socket of this frontend, inheritable by its extra HTTP processes. Bound before
    any heavy work (model, workers), so a busy port is a one-line error at once.

    Invariant: one listener per port. SO_REUSEADDR only lets a restarted server bind while old
    connections sit in TIME_WAIT; SO_REUSEPORT is never set (with it a second server binds the same port
    and the kernel splits the connections between two unrelated servers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--http-port: port {port} on {host} is already in use (another kvrelay "
                              "or server?); stop it or choose another port with --port") from None
        raise ConfigError(f"--http-port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def inherited(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)


def group_id(args: argparse.Namespace, n: int) -> tuple[str, int]:
    """The id this process's HTTP group merges /metrics under ("" for a lone process), and how many HTTP
    processes the group has (a scrape waits for every other one's counts)."""
    if getattr(args, "http_fd", None) is not None:
        return os.environ.get(GROUP_ENV, ""), int(os.environ.get(GROUP_SIZE_ENV, "2"))
    return (uuid.uuid4().hex[:12] if n > 1 else ""), n


SECRETS = ("api_key",)  # passed in the environment: a command line is visible to every local user


def secret_env(*configs) -> dict[str, str]:
    return {env_name(f.name): getattr(cfg, f.name) for cfg in configs for f in dataclasses.fields(cfg)
            if f.name in SECRETS and getattr(cfg, f.name)}


def config_flags(*configs) -> list[str]:
    """Flags that rebuild these config dataclasses in a child (secrets excepted: `secret_env`)."""
    argv: list[str] = []
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in SECRETS:
                continue
            if isinstance(value, bool):
                argv.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
            elif value not in ("", None):
                argv.append(f"{flag_name(f.name)}={value}")  # one token: a value may start with '-'
    return argv


class HttpWorkers:
    """The N-1 HTTP processes besides the owner's own, supervised (a crashed one is restarted)."""

    def __init__(self, n: int, sock: socket.socket, group: tuple[str, int], token: str, configs: tuple,
                 log_level: str | None):
        argv = [sys.executable, "-m", "kvrelay.cli.main", "frontend", "--http-fd", str(sock.fileno()),
                *config_flags(*configs), *(["--log-level", log_level] if log_level else [])]
        env = {**child_env(1), **secret_env(*configs), GROUP_ENV: group[0],
               GROUP_SIZE_ENV: str(group[1]), TOKEN_ENV: token}
        self.n = n
        plan = ProcessPlan("http", tuple(argv), env, pass_fds=(sock.fileno(),), new_session=True)
        self.fleet: Fleet[str] = Fleet(lambda kind, i: dataclasses.replace(plan, name=f"http-{i + 1}"))

    async def start(self) -> None:
        if self.n > 1:
            await self.fleet.start({"http": self.n - 1})

    def pids(self) -> list[int]:
        return [p.pid for p in self.fleet.live()]

    def signal_all(self, sig: int = signal.SIGTERM) -> None:
        """Pass a signal on (a second SIGTERM ends their drains at once, as it ends the owner's)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def stop(self, drain_timeout: float) -> None:
        """SIGTERM: each child drains as `kvrelay frontend` does, given the drain timeout plus slack."""
        await self.fleet.close(grace=drain_timeout + 10.0)


def on_signal(server, extra: HttpWorkers | None, stop) -> None:
    """SIGINT/SIGTERM in the owning process: the first starts the drain (the owner then stops the
    children, which drain too); a second ends every drain at once, the children's included."""
    if stop.is_set() and extra is not None:
        extra.signal_all()
    server.on_stop_signal(stop)

"""Startup checks that take seconds, run before the model loads or a G3 slot opens (issue 30: etcd down
was a 66-line traceback after the model had loaded; a busy worker port did not name the port; `--device
cuda` without a GPU was two tracebacks and a 120 s wait). Each failure is a ConfigError: one line naming
the flag to change, exit 2.

They are checks, not guarantees: a server may go down (or a port be taken) right after; the planes'
own errors and reconnects handle that later.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from urllib.parse import urlsplit

from kvrelay.runtime.config import ConfigError
from kvrelay.runtime.discovery import DiscoveryConfig
from kvrelay.runtime.events import EventsConfig

CONNECT_TIMEOUT_S = 2.0  # per endpoint: a loopback or LAN server answers in milliseconds


def _host_port(endpoint: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _reachable(endpoints: list[str], default_port: int) -> tuple[bool, str]:
    """Whether one endpoint accepts a TCP connection; else the last reason why not."""
    why = "no endpoint given"
    for endpoint in endpoints:
        host, port = _host_port(endpoint, default_port)
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                return True, ""
        except OSError as e:
            why = f"{host}:{port}: {e.strerror or e}"
    return False, why


def check_planes(disc: DiscoveryConfig, ev: EventsConfig) -> None:
    """etcd and NATS, when configured, accept connections now."""
    if disc.discovery == "etcd":
        ok, why = _reachable([e.strip() for e in disc.etcd_endpoints.split(",") if e.strip()], 2379)
        if not ok:
            raise ConfigError(f"--etcd-endpoints: etcd is not reachable ({why}); start etcd there, point "
                              "--etcd-endpoints at it, or use --discovery file on one machine")
    if ev.events == "nats":
        ok, why = _reachable([u.strip() for u in ev.nats_url.split(",") if u.strip()], 4222)
        if not ok:
            raise ConfigError(f"--nats-url: NATS is not reachable ({why}); start nats-server there, point "
                              "--nats-url at it, or use --events zmq on one machine")


def check_port_free(host: str, port: int, flag: str) -> None:
    """A fixed port (not 0) can be bound now."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"{flag}: port {port} on {host} is already in use; stop what holds it or "
                                  f"choose another port with {flag} (0 = any free port)") from None
            raise ConfigError(f"{flag}: cannot listen on {host}:{port}: {e.strerror or e}") from None


def check_device(device: str) -> None:
    """The torch device exists here (imports torch: about a second, still before the model loads)."""
    if device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (no NVIDIA GPU or "
                              "driver, or a CPU-only torch build); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available on this machine; use --device cpu")

"""Choosing the transport: `make_transfer_engine("auto" | "nixl" | "tcp", name)`.

- "tcp": the TCP fallback, always available.
- "nixl": NIXL with the given backends (default UCX). If NIXL cannot be imported or its agent or a
  backend cannot be created, a warning is logged and the TCP engine is returned: a worker on a machine
  without a working NIXL still serves, slower, instead of failing to start.
- "auto": the same as "nixl" (the default for workers).
The engine kinds do not interoperate: a peer's `add_peer` rejects metadata of the other kind with
ValueError, and the caller prefills locally instead (docs/ARCHITECTURE.md "Disaggregation").

Binding (docs/ARCHITECTURE.md "Trust boundary"): the TCP engine listens on `host` and requires `token`. NIXL has
no authentication of its own, so its UCX listeners are confined to the network device that holds
`host` (`UCX_NET_DEVICES`, unless the operator set it): with host 127.0.0.1 only loopback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from kvrelay.transfer.base import DEFAULT_TIMEOUT_S, TransferEngine
from kvrelay.transfer.net_devices import device_of
from kvrelay.transfer.nixl_engine import NixlTransferEngine
from kvrelay.transfer.tcp_engine import TcpTransferEngine

log = logging.getLogger(__name__)

KINDS = ("auto", "nixl", "tcp")


def make_transfer_engine(kind: str, name: str, *, backends: Sequence[str] = ("UCX",), host: str = "127.0.0.1",
                         port: int = 0, advertise_host: str | None = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S, token: str = "") -> TransferEngine:
    """Build (not start) an engine; `await engine.start()` after registering its pools."""
    if kind not in KINDS:
        raise ValueError(f"transfer engine kind must be one of {KINDS}, got {kind!r}")
    if kind != "tcp":
        device = device_of(host)
        if device is not None and "UCX_NET_DEVICES" not in os.environ:  # read by UCX when the agent starts
            os.environ["UCX_NET_DEVICES"] = device
        try:
            return NixlTransferEngine(name, backends, timeout_s=timeout_s)
        except ImportError as e:
            log.warning("NIXL is not installed (%s); KV transfers use the TCP fallback", e)
        except Exception as e:
            log.warning("NIXL agent %r with backends %s failed to start (%s: %s); KV transfers use the "
                        "TCP fallback", name, list(backends), type(e).__name__, e)
    return TcpTransferEngine(name, host, port, advertise_host, timeout_s=timeout_s, token=token)

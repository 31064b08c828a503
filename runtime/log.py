"""Logging setup: one call per process, structured enough to grep, quiet enough to read."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname).1s %(process)d %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once. Level comes from the argument, else KVRELAY_LOG_LEVEL, else INFO."""
    level = (level or os.environ.get("KVRELAY_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if getattr(root, "_kvrelay_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root._kvrelay_configured = True  # type: ignore[attr-defined]  # a marker: configure once per process
    # Libraries that log every reconnect attempt at INFO drown ours.
    # httpx logs every request at INFO (the planner's /metrics polls: three lines every 5 s).
    for noisy in ("nats", "asyncio", "grpc", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

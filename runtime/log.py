"""Logging setup: one call per process, structured enough to grep, quiet enough to read."""

from __future__ import annotations

import logging
import os
import sys
import time

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


class Throttled:
    """At most one line per `interval_s` seconds per key, for events an outsider or a failing disk can
    repeat thousands of times a second (wrong tokens, checksum failures): the first is logged at once,
    the rest counted and reported with the next line that gets through. Owned by the component that
    logs (no global state)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0):
        self.logger, self.interval_s = logger, interval_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged within the interval; True if it was logged."""
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._next[key] = now + self.interval_s
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += f" ({skipped} more since the last such line)"
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

"""One access log line per HTTP request (issue 30), as ASGI middleware around the whole frontend:

    POST /v1/chat/completions 200 model=kvrelay-tiny prompt_tokens=31 completion_tokens=16 ttft_ms=42.1 total_ms=180.3

Method, path (never the query string), status, and for the generate endpoints the model, prompt and
completion tokens and the time to the first token (from arrival, as the TTFT metric). Never the prompt
or the output text. Logger `kvrelay.access` at INFO; the probes an orchestrator or Prometheus sends
every few seconds (/health, /ready, /metrics) at DEBUG. Off with `--no-access-log`.

The generate handler leaves the request's `Prepared` (frontend/pipeline.py) in the ASGI scope under
`SCOPE_KEY`; a request that never got that far (a 4xx before the model resolved) logs `-` there. A
client that left before any response logs status `-`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kvrelay.access")
SCOPE_KEY = "kvrelay.prepared"
PROBES = frozenset({"/health", "/ready", "/metrics"})


class AccessLog:
    def __init__(self, app: Callable, logger: logging.Logger = log):
        self.app, self.log = app, logger

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status: list[int] = []

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            level = logging.DEBUG if scope["path"] in PROBES else logging.INFO
            if self.log.isEnabledFor(level):
                self.log.log(level, "%s", line(scope, status[0] if status else None, start, time.monotonic()))


def line(scope: dict, status: int | None, start: float, end: float) -> str:
    parts = [scope["method"], scope["path"], str(status) if status is not None else "-"]
    prepared: Any = scope.get(SCOPE_KEY)
    if prepared is not None:
        first = prepared.first_token_at
        parts += [f"model={prepared.model}", f"prompt_tokens={prepared.usage.prompt_tokens}",
                  f"completion_tokens={prepared.usage.completion_tokens}",
                  f"ttft_ms={(first - prepared.arrival) * 1e3:.1f}" if first is not None else "ttft_ms=-"]
    parts.append(f"total_ms={(end - start) * 1e3:.1f}")
    return " ".join(parts)

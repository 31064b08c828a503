"""The errors an engine raises for a request it refuses; the message is safe to show a client.

A worker's RPC server reports a handler's exception by class name (`RemoteError.kind`), so these
class names are the contract: `workers/api/endpoints.py ErrorKind` spells them for callers.
"""

from __future__ import annotations

from kvrelay.workers.api.messages import RequestError


class EngineError(RequestError):
    """A request the engine refuses (invalid for this model or worker): HTTP 400."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the client may retry later (HTTP 503)."""

"""Errors a request-plane client can see. Each names what failed, so callers can decide to retry
(connection errors: the worker is gone, migrate) or not (remote errors: the request itself failed)."""

from __future__ import annotations

from kvrelay.runtime.str_enum import StrEnum


class FailKind(StrEnum):
    """The request plane's own failure kinds; any other `Fail.kind` is the handler's exception class name."""

    ENDPOINT_NOT_FOUND = "EndpointNotFound"
    INVALID_REQUEST = "InvalidRequest"  # the request did not decode as the endpoint's type
    CANCELLED = "Cancelled"
    UNAUTHORIZED = "Unauthorized"  # the port requires the internal token and the connection gave none


class RpcError(RuntimeError):
    """Base of every request-plane error."""


class RpcConnectionError(RpcError):
    """The connection to the worker failed or was lost mid-stream; the request may be retried elsewhere."""


class RemoteError(RpcError):
    """The handler raised; `kind` is the exception's class name on the server."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.remote_message = message


class EndpointNotFound(RemoteError):
    pass


class RpcCancelled(RpcError):
    """The server cancelled the stream (shutdown, or the handler raised RpcCancelled)."""


class FrameTooLarge(RpcError):
    """A frame exceeds the maximum frame size; it was not sent."""

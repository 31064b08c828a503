"""Request plane: streaming RPC over TCP with length-prefixed msgpack frames and cancellation."""

from kvrelay.runtime.rpc.client import RpcClient, RpcStream
from kvrelay.runtime.rpc.errors import (
    EndpointNotFound,
    FrameTooLarge,
    RemoteError,
    RpcCancelled,
    RpcConnectionError,
    RpcError,
)
from kvrelay.runtime.rpc.server import RpcServer

__all__ = [
    "EndpointNotFound", "FrameTooLarge", "RemoteError", "RpcCancelled", "RpcClient", "RpcConnectionError",
    "RpcError", "RpcServer", "RpcStream",
]

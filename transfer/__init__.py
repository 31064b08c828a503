"""Moving KV blocks between processes and machines: NIXL (UCX) and a TCP fallback. See README.md."""

from kvrelay.transfer.base import DEFAULT_TIMEOUT_S, TransferEngine, TransferError, TransferStats
from kvrelay.transfer.factory import make_transfer_engine
from kvrelay.transfer.metadata import Notification, PoolDesc, TransferMetadata, decode_metadata
from kvrelay.transfer.nixl_api import load_nixl_api
from kvrelay.transfer.nixl_engine import NixlTransferEngine
from kvrelay.transfer.tcp_engine import TcpTransferEngine

__all__ = [
    "DEFAULT_TIMEOUT_S", "NixlTransferEngine", "Notification", "PoolDesc", "TcpTransferEngine", "TransferEngine",
    "TransferError", "TransferMetadata", "TransferStats", "decode_metadata", "load_nixl_api",
    "make_transfer_engine",
]

"""The transfer-engine interface every transport implements (NIXL over UCX, the TCP fallback).

Life cycle of an engine in a worker:

    engine = make_transfer_engine("auto", instance_id)        # kvrelay.transfer.factory
    engine.register_pool("g1", kv_cache, layout.block_bytes)   # once per pool, never per request
    await engine.start()                                       # TCP: starts its block server
    KvHandle(..., transfer_metadata=engine.metadata())         # over token-authenticated RPC only
    ...
    engine.add_peer(prefill_id, handle.transfer_metadata)      # idempotent for the same metadata
    await engine.read(prefill_id, "g1", remote_ids, "g1", local_ids, notify=b"pulled:<req>")
    ...
    await engine.close()

Semantics shared by every engine:
- `read` pulls `remote_block_ids[k]` of the peer's `remote_pool` into `local_block_ids[k]` of
  `local_pool`; `write` pushes the other way. Both return once every byte is in place at the
  destination, and coalesce runs that are consecutive on both sides into one descriptor / range.
- Argument errors (unknown pool, ids out of range, duplicate destination ids, length mismatch,
  block-size mismatch) raise ValueError before anything moves. Transport failures (peer gone,
  peer unknown, timeout) raise TransferError; a cancelled read/write first makes sure the transport
  no longer touches the destination blocks, then re-raises CancelledError.
- `notify`: after the bytes are in place the peer receives `Notification(self.name, notify)`; read
  `wait_notification` on the peer's engine. This is how a prefill worker learns a pull completed.
- Registrations happen per pool and transfer handles are always released, so `stats()` after any
  number of transfers shows the same `registered_regions` and `active_handles == 0` (LMCache #1339).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import msgspec
import torch

from kvrelay.transfer.metadata import Notification

DEFAULT_TIMEOUT_S = 30.0


class TransferError(RuntimeError):
    """A transfer failed or timed out, or the peer is unknown or gone. Retry elsewhere or recompute."""


class TransferStats(msgspec.Struct, kw_only=True):
    kind: str
    bytes_read: int = 0  # bytes pulled into local pools by `read`
    bytes_written: int = 0  # bytes pushed into peers' pools by `write`
    reads: int = 0
    writes: int = 0
    descriptors: int = 0  # coalesced runs posted, over all transfers
    failures: int = 0  # reads/writes that raised TransferError
    active_handles: int = 0  # transfer handles / calls in flight (incl. ones that could not be released yet)
    registered_regions: int = 0  # memory registrations (one per pool)
    prepped_dlists: int = 0  # nixl: prepared descriptor lists (one per local pool and per peer pool)
    peers: int = 0
    notifications_sent: int = 0
    notifications_received: int = 0
    notifications_pending: int = 0  # received, not yet claimed by `wait_notification`


@runtime_checkable
class TransferEngine(Protocol):
    kind: str  # "nixl" | "tcp"
    name: str  # the name peers see as the sender of notifications

    def register_pool(self, name: str, tensor: torch.Tensor, block_bytes: int) -> None:
        """Register a block-contiguous pool once; the tensor must outlive the engine (or `close`)."""
        ...

    async def start(self) -> None:
        """Make the engine reachable (TCP: bind its server). Idempotent; before `metadata()`."""
        ...

    def metadata(self) -> bytes:
        """`TransferMetadata` msgpack for peers: agent metadata and every registered pool."""
        ...

    def add_peer(self, peer_id: str, metadata: bytes) -> None:
        """Connect to a peer by its `metadata()`. Same id + same metadata is a no-op; new metadata replaces."""
        ...

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer (no-op if unknown); later transfers to it raise TransferError."""
        ...

    async def read(self, peer_id: str, remote_pool: str, remote_block_ids: Sequence[int], local_pool: str,
                   local_block_ids: Sequence[int], notify: bytes | None = None,
                   timeout: float | None = None) -> None:
        ...

    async def write(self, peer_id: str, local_pool: str, local_block_ids: Sequence[int], remote_pool: str,
                    remote_block_ids: Sequence[int], notify: bytes | None = None,
                    timeout: float | None = None) -> None:
        ...

    async def notify(self, peer_id: str, message: bytes) -> None:
        """Send a notification not bound to a transfer."""
        ...

    async def wait_notification(self, message: bytes | None = None,
                                timeout: float | None = None) -> Notification:
        """Wait for a notification with exactly `message` (any if None); TimeoutError after `timeout`."""
        ...

    def stats(self) -> TransferStats:
        ...

    async def close(self) -> None:
        """Release handles and registrations, forget peers, stop serving. Idempotent."""
        ...

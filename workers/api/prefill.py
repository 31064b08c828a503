"""The prefill -> decode handoff as the worker contract states it (docs/ARCHITECTURE.md "Disaggregation"): what a
prefill engine returns (`PrefillResult`), how a decode engine gets a handle's blocks (`KvPuller`), and the
engine-internal finish reason of a prefill whose blocks stay held (`PREFILLED`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from kvrelay.workers.api.messages import EngineOutput, KvHandle, PeerLeaseReply, PeerLeaseRequest

PREFILLED = "prefilled"  # engine-internal finish reason of a prefill whose blocks stay held


class PrefillResult(msgspec.Struct):
    output: EngineOutput  # the first token; finish_reason set only if it ended the request
    block_ids: list[int]  # the held prompt blocks, in order; empty when nothing is held
    # An engine that moves KV itself (`owns_kv_transfer`, vLLM's NixlConnector): what its decode side
    # needs to read the blocks, carried in the handle instead of the worker's transfer metadata.
    transfer_params: bytes = b""
    pool: str = "g1"  # the handle's pool name (KvHandle.pool)


class KvPuller(Protocol):
    """How a decode engine gets a handle's blocks; the worker provides it (transfer engine, or a
    simulated link for the mocker)."""

    async def pull(self, handle: KvHandle, local_block_ids: list[int], start: int) -> bool:
        """Copy `handle.block_ids[start:]` into `local_block_ids` (same length; may be empty), then let
        the prefill worker free its lease. True once every byte is in place; False means recompute.
        Raises only CancelledError, and only after the transport stopped writing the blocks."""
        ...


# How a worker asks a peer to lease blocks for a pull (the cluster KV pool): (the peer's request-plane
# address, the request) -> its reply; the worker provides it (`WorkerClient.lease`, token-authenticated).
LeaseAsker = Callable[[str, PeerLeaseRequest], Awaitable[PeerLeaseReply]]

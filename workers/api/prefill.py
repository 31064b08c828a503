"""The prefill -> decode handoff as the worker contract states it (docs/ARCHITECTURE.md "Disaggregation"): what a
prefill engine returns (`PrefillResult`), how a decode engine gets a handle's blocks (`KvPuller`), and the
engine-internal finish reason of a prefill whose blocks stay held (`PREFILLED`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PeerLink:
    """What a worker gives its engine to pull prefixes peers hold (the cluster KV pool): how to ask a peer
    for a lease (`ask`), how to give one back that nobody will pull (`release(address, lease id)`, e.g.
    the request was cancelled while its ask was out), and the pull budget: at most `max_pulls` asks and
    pulls in flight and `max_bytes` bytes of blocks they may bring (an ask over either is not made: the
    prompt is computed)."""

    ask: LeaseAsker
    release: Callable[[str, str], Awaitable[None]]
    max_pulls: int
    max_bytes: int

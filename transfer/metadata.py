"""What a peer needs to move blocks to or from this engine: the wire form of `TransferEngine.metadata()`.

Carried in the disaggregation handle over token-authenticated RPC only, never published in discovery:
it lets its holder read and write the engine's pools (README.md "Trust"). msgpack via
`kvrelay.runtime.wire`; never pickle.
"""

from __future__ import annotations

import msgspec

from kvrelay.runtime.wire import decode, encode


class PoolDesc(msgspec.Struct, frozen=True, kw_only=True):
    """One registered pool: block `i` is the byte range `[base_addr + i*block_bytes, +block_bytes)`."""

    name: str
    base_addr: int
    num_blocks: int
    block_bytes: int
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int  # CUDA device index for VRAM, 0 for DRAM

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes


class TransferMetadata(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # "nixl" | "tcp": a peer must run the same kind to talk to this engine
    engine: str  # the engine's name (NIXL agent name; notifications name their sender by it)
    pools: list[PoolDesc]
    agent_metadata: bytes = b""  # nixl: nixl_agent.get_agent_metadata(), after every pool is registered
    address: str = ""  # tcp: "host:port" of the engine's block server

    def pool(self, name: str) -> PoolDesc:
        for p in self.pools:
            if p.name == name:
                return p
        raise ValueError(f"peer {self.engine!r} has no pool {name!r} (pools: {[p.name for p in self.pools]})")


class Notification(msgspec.Struct, frozen=True):
    sender: str  # the initiating engine's name
    message: bytes


def encode_metadata(md: TransferMetadata) -> bytes:
    return encode(md)


def decode_metadata(data: bytes) -> TransferMetadata:
    try:
        return decode(data, TransferMetadata)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"invalid transfer metadata: {e}") from None

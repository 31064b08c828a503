"""The TCP fallback's request-plane messages, and byte access to a registered pool.

Endpoints served by every `TcpTransferEngine` (on a `kvrelay.runtime.rpc.RpcServer`):
- `kv_read`  `ReadRequest` -> a stream of `Chunk`s: the runs' bytes in order, each chunk <= CHUNK_BYTES
  and within one run (the request plane's frames are bounded by its max frame size, 64 MiB).
- `kv_write` `WriteRequest` -> one `Ack`: `data` lands at byte `offset` of the pool.
- `kv_notify` `NotifyRequest` -> one `Ack`: delivered to the engine's notification box.
"""

from __future__ import annotations

import msgspec
import numpy as np
import torch

from kvrelay.transfer.metadata import PoolDesc

CHUNK_BYTES = 4 * 1024 * 1024


class ReadRequest(msgspec.Struct, array_like=True):
    pool: str
    runs: list[tuple[int, int]]  # (first block, block count)


class Chunk(msgspec.Struct, array_like=True):
    # Encoded from a memoryview of the pool (one copy, into the frame); decoded as a view of the
    # received frame (no copy) that the reader copies straight into its pool.
    data: memoryview


class WriteRequest(msgspec.Struct, array_like=True):
    pool: str
    offset: int  # byte offset into the pool
    data: memoryview


class NotifyRequest(msgspec.Struct, array_like=True):
    sender: str
    message: bytes


class Ack(msgspec.Struct, array_like=True):
    pass


class PoolBytes:
    """Byte-addressed access to a registered pool. CPU pools are a zero-copy uint8 view; CUDA pools
    (TCP on a GPU machine without NIXL) stage each chunk through host memory."""

    def __init__(self, desc: PoolDesc, tensor: torch.Tensor):
        self.desc, self.tensor = desc, tensor
        self._flat = tensor.reshape(-1).view(torch.uint8)
        self._host: np.ndarray | None = self._flat.numpy() if tensor.device.type == "cpu" else None

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.desc.nbytes:
            raise ValueError(f"byte range [{offset}, {offset + length}) outside pool {self.desc.name!r} "
                             f"of {self.desc.nbytes} bytes")

    def check_runs(self, runs: list[tuple[int, int]]) -> None:
        for start, count in runs:
            if start < 0 or count <= 0 or start + count > self.desc.num_blocks:
                raise ValueError(f"blocks [{start}, {start + count}) outside pool {self.desc.name!r} "
                                 f"of {self.desc.num_blocks} blocks")

    def view(self, lo: int, hi: int) -> memoryview:
        if self._host is not None:
            return self._host[lo:hi].data
        return self._flat[lo:hi].cpu().numpy().data

    def put(self, offset: int, data: memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        if self._host is not None:
            self._host[offset:offset + src.size] = src
        else:
            self._flat[offset:offset + src.size].copy_(torch.from_numpy(src.copy()))

    def chunks(self, runs: list[tuple[int, int]]):
        """The runs' bytes in order, as views of at most CHUNK_BYTES that never straddle two runs."""
        bb = self.desc.block_bytes
        for start, count in runs:
            hi = (start + count) * bb
            for lo in range(start * bb, hi, CHUNK_BYTES):
                yield self.view(lo, min(lo + CHUNK_BYTES, hi))

"""The codec interface: one block's bytes <-> a self-describing frame (frame.py) of at most `max_bytes`.

A codec is built for one `BlockShape` (shape.py). `encode` takes the block as a flat uint8 CPU tensor
of `shape.block_bytes` and returns the whole frame (header + payload), or None when the codec cannot
represent this block (a lossy codec and a non-finite value): the tier then does not store it.
`decode` fills `out` (flat uint8 CPU, `shape.block_bytes`) from a frame and returns False for anything
it cannot decode (other codec, version, shape, a truncated payload): a miss, never an exception.
Both are vectorised torch/zstd over the whole block and release the GIL in their heavy parts, so a
store runs them on worker threads.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .shape import BlockShape


class Codec(Protocol):
    name: str
    codec_id: int
    version: int
    lossy: bool
    shape: BlockShape

    @property
    def max_bytes(self) -> int:
        """The largest frame `encode` returns (header included): what a fixed slot must hold."""
        ...

    @property
    def fixed_size(self) -> bool:
        """True when every frame is exactly `max_bytes` (a fixed-slot tier then loses nothing)."""
        ...

    def encode(self, block: torch.Tensor) -> bytes | None: ...

    def decode(self, frame: memoryview, out: torch.Tensor) -> bool: ...

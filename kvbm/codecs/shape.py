"""What a codec needs to know about a block's bytes: element dtype and a [groups, tokens, channels] view.

The native engine's block is `[num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]`
(docs/ARCHITECTURE.md "KV layout"), i.e. `groups = num_layers * 2` (keys and values of each layer
apart), `tokens = block_size`, `channels = num_kv_heads * head_dim`: one channel is one head-dim lane
of one head, the unit the lossy codecs quantize over the block's tokens. The `tag` (xxh32 of the
shape) goes into every encoded block's header, so bytes written for another shape or dtype (same
model fingerprint, other `--dtype`) are a miss, never misread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from kvrelay.workers.api.messages import KvLayout

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


@dataclass(frozen=True)
class BlockShape:
    dtype: str  # a key of DTYPES; "uint8" = bytes of unknown structure (lossless only)
    groups: int
    tokens: int
    channels: int
    layout_known: bool = True  # False: words of `dtype` in an unknown order (lossless only, plane split)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def numel(self) -> int:
        return self.groups * self.tokens * self.channels

    @property
    def block_bytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def tag(self) -> int:
        words = "" if self.layout_known else "/words"
        return xxhash.xxh32_intdigest(f"{self.dtype}/{self.groups}/{self.tokens}/{self.channels}{words}".encode())

    @property
    def structured(self) -> bool:
        """True when the channel view is real (lossy codecs need it), not a bytes-only stand-in."""
        return self.dtype != "uint8" and self.layout_known

    @classmethod
    def of_layout(cls, layout: KvLayout) -> BlockShape:
        return cls(layout.dtype, layout.num_layers * 2, layout.block_size, layout.num_kv_heads * layout.head_dim)

    @classmethod
    def words(cls, dtype: str, block_bytes: int) -> BlockShape:
        """Elements of a known dtype in an order the codecs cannot rely on (vLLM's per-layer pages, whose
        order depends on its attention backend): lossless splits the words into byte planes (the
        exponent plane is what compresses); the lossy codecs, which need the channel view, refuse it."""
        itemsize = DTYPES[dtype].itemsize
        if block_bytes % itemsize:
            return cls.opaque(block_bytes)
        return cls(dtype, 1, 1, block_bytes // itemsize, layout_known=False)

    @classmethod
    def opaque(cls, block_bytes: int) -> BlockShape:
        """Bytes with no known structure (an engine that gave no layout): lossless codecs still apply."""
        return cls("uint8", 1, 1, block_bytes)

"""A codec's compression ratio and decode speed, measured once when its tier opens (for the cost model).

The cost model (kvbm/cost_model.py) times every onboard batch, decode included, so once a tier has
served a load its rate is the real effective one. Before that it decides from priors, which describe
the tier's raw I/O; `calibrate` measures what the codec changes: the tier reads `ratio` x fewer bytes,
then spends `decode_bytes_per_s` (raw bytes out per second, one thread as a tier worker decodes) on
them. A KV-like block (normal values in the shape's dtype; opaque bytes: float16 normals) stands in for
real KV: ratio and speed depend on the values' statistics, and real KV is close to normal per channel.
A few milliseconds per tier at startup (the best of `repeats` decodes of one block).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import Codec


@dataclass(frozen=True)
class CodecRate:
    ratio: float  # raw block bytes / stored frame bytes
    decode_bytes_per_s: float  # raw bytes decoded per second


def sample_block(codec: Codec, seed: int = 0) -> torch.Tensor:
    sh = codec.shape
    g = torch.Generator().manual_seed(seed)
    if not sh.structured:  # opaque bytes: float16 normals, as many as fit
        vals = torch.randn(sh.block_bytes // 2, generator=g).half().view(torch.uint8)
        return torch.cat([vals, torch.zeros(sh.block_bytes - vals.numel(), dtype=torch.uint8)])
    return torch.randn(sh.numel, generator=g).to(sh.torch_dtype).view(torch.uint8)


def calibrate(codec: Codec, repeats: int = 3) -> CodecRate | None:
    """None when the sample does not encode (a codec that refuses it)."""
    block = sample_block(codec)
    frame = codec.encode(block)
    if frame is None:
        return None
    view, out, best = memoryview(frame), torch.empty_like(block), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if not codec.decode(view, out):
            return None
        best = min(best, time.perf_counter() - t0)
    return CodecRate(block.numel() / len(frame), block.numel() / max(best, 1e-9))

"""`fp16`: float32 KV rounded to float16, then the lossless codec's byte planes + zstd (lossy, opt-in).

For a float32 engine (SmolLM2 on CPU) this halves the block before entropy coding. The error is float16's
rounding, relative to each value (|x - x'| <= |x| * 2^-11), which is ~25x smaller than int8's per-channel
step on KV-like data: the candidate that keeps greedy continuations (perf/RESULTS.md "KV compression").
Range: each (group, channel) over the block's tokens gets a power-of-two scale 2^e (e in -64..63, one
int8 per channel) that puts its absmax in [2^14, 2^15), so nothing overflows float16 (max 65504) and small
channels keep their precision; multiplying by a power of two is exact, so the scale adds no error.
A non-finite value: not encoded (the tier skips the block). Only float32 shapes: for a 16-bit engine
dtype this would save nothing (the registry refuses it, and the tier is left out with a warning).
Layout: header | scale exponents int8 [groups * channels] | mode byte | zstd(byte planes of the float16s)
(mode 0: the planes raw, when zstd does not shrink them).
"""

from __future__ import annotations

import numpy as np
import torch

from .frame import HEADER_BYTES, as_tensor, open_frame, seal
from .shape import BlockShape
from .zstd_body import pack, unpack

LEVEL = 1
_E_MIN, _E_MAX = -64, 63


class Fp16Codec:
    name, codec_id, version, lossy = "fp16", 3, 1, True

    def __init__(self, shape: BlockShape):
        if shape.dtype != "float32" or not shape.structured:
            raise ValueError(f"fp16 needs float32 KV in the engine's layout (this engine's: {shape.dtype}, "
                             f"layout {'known' if shape.layout_known else 'unknown'})")
        self.shape = shape
        self._exp_bytes = shape.groups * shape.channels

    @property
    def max_bytes(self) -> int:
        return HEADER_BYTES + self._exp_bytes + 1 + self.shape.numel * 2

    @property
    def fixed_size(self) -> bool:
        return False

    def encode(self, block: torch.Tensor) -> bytes | None:
        sh = self.shape
        x = block.view(torch.float32).view(sh.groups, sh.tokens, sh.channels)
        absmax = x.abs().amax(dim=1)  # [groups, channels]
        if not bool(torch.isfinite(absmax).all()) or float(absmax.max()) >= 2.0**77:  # past the largest scale
            return None
        # absmax * 2^-e in [2^14, 2^15): e = floor(log2(absmax)) - 14; frexp gives absmax = m * 2^k, m in [0.5, 1)
        _, k = torch.frexp(absmax)
        e = (k.to(torch.int32) - 15).clamp_(_E_MIN, _E_MAX)
        h = torch.ldexp(x, -e.unsqueeze(1).float()).to(torch.float16)  # exact scaling, one rounding
        planes = h.view(-1).view(torch.uint8).view(-1, 2).t().contiguous()
        exps = e.to(torch.int8).view(torch.uint8).numpy().tobytes()
        return seal(self.codec_id, self.version, sh.tag, exps + pack(planes.numpy().data, LEVEL))

    def decode(self, frame: memoryview, out: torch.Tensor) -> bool:
        sh = self.shape
        payload = open_frame(frame, self.codec_id, self.version, sh.tag)
        if payload is None or (got := unpack(payload[self._exp_bytes:], sh.numel * 2)) is None:
            return False
        e = as_tensor(payload[:self._exp_bytes]).view(torch.int8).view(sh.groups, 1, sh.channels)
        raw = got[1]
        h = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(2, -1).T.copy()).view(torch.float16)
        x = torch.ldexp(h.view(sh.groups, sh.tokens, sh.channels).float(), e.float())
        out.copy_(x.view(-1).view(torch.uint8))
        return True

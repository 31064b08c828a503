"""`int8`: lossy per-block, per-channel quantisation of keys and values (off unless configured).

The block is viewed as [groups = layers x (K, V), tokens, channels = heads x head_dim] (shape.py). Each
(group, channel) gets one scale over the block's tokens, s = absmax / 127 (symmetric), stored as
float16 rounded *up* (so |x / s| <= 127 holds and nothing clips) and at least 2^-14 (float16's
smallest normal); values are round(x / s) in int8. Keys have per-channel outliers (a few head-dim
lanes are much larger than the rest), which is why the scale is per channel and not per token.
Error bound, per element: |x - x'| <= s / 2 (+ the engine dtype's rounding of x'), tested in
tests/kvbm/test_codecs.py. Size: 1 byte per element + 2 bytes per (group, channel), i.e. with 16-token
blocks 1.125 bytes per element (float32 engine: 3.56x smaller, bfloat16/float16: 1.78x). A block with
a non-finite value or |x| > 8e6 (beyond a float16 scale) is not encoded (the tier skips it).
The same quantiser with fewer levels, entropy-coded, is `int7z`/`int6z` (quant_zstd.py).
"""

from __future__ import annotations

import torch

from .frame import HEADER_BYTES, as_tensor, open_frame, seal
from .shape import BlockShape

_MIN_SCALE = 2.0**-14
_ROUND_UP = 1.0 + 2.0**-9  # float16 round-to-nearest loses < 2^-11 relative: this keeps s16 >= s


class Int8Codec:
    name, codec_id, version, lossy = "int8", 2, 1, True

    def __init__(self, shape: BlockShape, levels: int = 127):
        """`levels`: values are round(x / s) in [-levels, levels], s = absmax / levels (quant_zstd.py
        uses fewer levels and entropy-codes them)."""
        if not shape.structured:
            raise ValueError(f"{self.name} needs the engine's KV layout (dtype, layers, heads, head_dim)")
        if not 1 <= levels <= 127:
            raise ValueError("levels must be in [1, 127]")
        self.shape, self.levels = shape, levels
        self._scale_bytes = shape.groups * shape.channels * 2
        self._max_abs = 8e6 * levels / 127  # 127 * 65504 (float16's largest scale) with margin, per level

    @property
    def max_bytes(self) -> int:
        return HEADER_BYTES + self._scale_bytes + self.shape.numel

    @property
    def fixed_size(self) -> bool:
        return True

    def quantize(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scales float16 [groups, channels], values int8 [groups, tokens, channels]), or None."""
        sh = self.shape
        x = block.view(sh.torch_dtype).view(sh.groups, sh.tokens, sh.channels).float()
        absmax = x.abs().amax(dim=1)
        top = absmax.max()
        if not bool(torch.isfinite(top)) or float(top) > self._max_abs:  # NaN/inf fail the first test
            return None
        lv = self.levels
        s16 = (absmax / lv * _ROUND_UP).clamp(min=_MIN_SCALE).half()
        q = torch.round(x / s16.float().unsqueeze(1)).clamp_(-lv, lv).to(torch.int8)
        return s16, q

    def encode(self, block: torch.Tensor) -> bytes | None:
        got = self.quantize(block)
        if got is None:
            return None
        s16, q = got
        payload = s16.view(torch.uint8).numpy().tobytes() + q.view(torch.uint8).numpy().tobytes()
        return seal(self.codec_id, self.version, self.shape.tag, payload)

    def decode(self, frame: memoryview, out: torch.Tensor) -> bool:
        payload = open_frame(frame, self.codec_id, self.version, self.shape.tag)
        if payload is None or len(payload) != self._scale_bytes + self.shape.numel:
            return False
        raw = as_tensor(payload)
        self.dequantize(raw[:self._scale_bytes], raw[self._scale_bytes:], out)
        return True

    def dequantize(self, scales: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
        """`out` (the block's bytes) from the float16 scales' and the int8 values' bytes (uint8 tensors)."""
        sh = self.shape
        s = scales.view(torch.float16).float().view(sh.groups, 1, sh.channels)
        q = values.view(torch.int8).view(sh.groups, sh.tokens, sh.channels)
        out.copy_((q.float() * s).to(sh.torch_dtype).view(-1).view(torch.uint8))

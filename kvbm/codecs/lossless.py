"""`lossless`: byte planes of the float words, then zstd. Bit-identical round trip, any dtype.

A float's bytes are not alike: the one holding sign and exponent takes few values across a block (KV
magnitudes are similar), the low mantissa bytes are close to noise. Interleaved, a general compressor
sees noise everywhere; split into planes (all byte-0s, then all byte-1s, ...) the exponent plane is a
long run of low-entropy bytes. zstd over the planes, not lz4: what shrinks the exponent plane is an
entropy coder (zstd's Huffman/FSE stages), which lz4 does not have (it only finds repeats, and
mantissa planes have none); zstd level 1 decodes at memory-copy-like speeds and releases the GIL.
A block zstd does not shrink is stored as its raw bytes (mode byte 0), so a frame is never larger
than header + 1 + block_bytes.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from .frame import HEADER_BYTES, as_tensor, open_frame, seal
from .shape import BlockShape
from .zstd_body import RAW, unpack

LEVEL = 1


class LosslessCodec:
    name, codec_id, version, lossy = "lossless", 1, 1, False

    def __init__(self, shape: BlockShape):
        self.shape = shape

    @property
    def max_bytes(self) -> int:
        return HEADER_BYTES + 1 + self.shape.block_bytes

    @property
    def fixed_size(self) -> bool:
        return False

    def _planes(self, block: torch.Tensor) -> torch.Tensor:
        k = self.shape.itemsize
        return block.view(-1, k).t().contiguous() if k > 1 else block

    def encode(self, block: torch.Tensor) -> bytes | None:
        # A fresh context per call: zstandard contexts are not thread-safe, and making one costs ~µs.
        packed = zstandard.ZstdCompressor(level=LEVEL).compress(self._planes(block).numpy().data)
        if len(packed) >= block.numel():
            return seal(self.codec_id, self.version, self.shape.tag, b"\x00" + block.numpy().tobytes())
        return seal(self.codec_id, self.version, self.shape.tag, b"\x01" + packed)

    def decode(self, frame: memoryview, out: torch.Tensor) -> bool:
        payload = open_frame(frame, self.codec_id, self.version, self.shape.tag)
        n, k = self.shape.block_bytes, self.shape.itemsize
        if payload is None or (got := unpack(payload, n)) is None:
            return False
        mode, raw = got
        if mode == RAW:  # the block's own bytes, not planes (encode above)
            out.copy_(as_tensor(memoryview(raw)))
            return True
        planes = np.frombuffer(raw, np.uint8).reshape(k, -1)
        out.view(-1, k).numpy()[:] = planes.T  # numpy reads the (read-only) bytes; one strided copy
        return True

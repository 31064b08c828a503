"""The body the zstd-based codecs end their payload with: a mode byte, then the data zstd-compressed
(mode 1), or the data as it is when zstd does not shrink it (mode 0), so a body is never more than one
byte longer than its data. `unpack` turns anything else (an unknown mode, data that is no zstd frame, a
length other than expected) into None: a miss, never an exception.
"""

from __future__ import annotations

import zstandard

RAW, ZSTD = 0, 1


def pack(data: bytes | memoryview, level: int) -> bytes:
    """The body for `data` (any contiguous bytes-like: zstd reads it in place)."""
    # A fresh context per call: zstandard contexts are not thread-safe, and making one costs ~µs.
    packed = zstandard.ZstdCompressor(level=level).compress(data)
    return b"\x01" + packed if len(packed) < memoryview(data).nbytes else b"\x00" + bytes(data)


def unpack(body: memoryview, n: int) -> tuple[int, bytes | memoryview] | None:
    """(mode, the `n` bytes of data) of a body, or None if it does not hold exactly `n` bytes."""
    if len(body) < 1:
        return None
    mode, rest = body[0], body[1:]
    data: bytes | memoryview
    if mode == RAW:
        data = rest
    elif mode == ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(rest, max_output_size=n)
        except zstandard.ZstdError:
            return None
    else:
        return None
    return (mode, data) if len(data) == n else None

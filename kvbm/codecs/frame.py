"""The header every encoded block carries: which codec wrote it, at which version, for which shape.

    magic "KVC1" | codec id u8 | codec version u8 | reserved u16 | shape tag u32 | payload bytes u32

16 bytes, little-endian, then the payload. It is stored with the block (inside the G3 slot, inside the
G4 object's payload), so the tier's own checksum (xxh3 in the G3 index, xxh3 in the G4 object header)
covers it: a corrupted block is a checksum miss before it is ever parsed. `open_frame` turns anything
else that does not match (another codec or version, another shape, a length that does not fit, bytes
that are no frame at all) into None: a miss, and the block is recomputed.
"""

from __future__ import annotations

import struct

import torch

_HDR = struct.Struct("<4sBBHII")
MAGIC = b"KVC1"
HEADER_BYTES = _HDR.size


def seal(codec_id: int, version: int, shape_tag: int, payload: bytes | memoryview) -> bytes:
    return _HDR.pack(MAGIC, codec_id, version, 0, shape_tag, len(payload)) + bytes(payload)


def open_frame(buf: memoryview, codec_id: int, version: int, shape_tag: int) -> memoryview | None:
    """The payload if `buf` starts with a frame of exactly this codec, version and shape, else None."""
    if len(buf) < HEADER_BYTES:
        return None
    magic, cid, ver, _, tag, n = _HDR.unpack_from(buf)
    if (magic, cid, ver, tag) != (MAGIC, codec_id, version, shape_tag) or HEADER_BYTES + n > len(buf):
        return None
    return buf[HEADER_BYTES:HEADER_BYTES + n]


def frame_bytes(buf: memoryview) -> int:
    """Length of the frame at the start of `buf` (header + payload); 0 if it is none."""
    if len(buf) < HEADER_BYTES or bytes(buf[:4]) != MAGIC:
        return 0
    return HEADER_BYTES + _HDR.unpack_from(buf)[5]


def as_tensor(buf: memoryview) -> torch.Tensor:
    """A uint8 tensor over `buf` (no copy when it is writable; torch refuses read-only buffers)."""
    return torch.frombuffer(bytearray(buf) if buf.readonly else buf, dtype=torch.uint8)

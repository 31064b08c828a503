"""G4's object format: key `kvrelay/<model fingerprint>/<seq_hash as 16 hex>`, body = a 32-byte header
(magic "KVR4", version, flags, block_bytes, seq_hash, xxh3_64 of the payload) + the block's bytes.

`verify` accepts an object only if its length, header and checksum all match the block asked for: a
truncated, padded, mis-keyed (another block's object under this key) or corrupted object is rejected.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import xxhash

_HDR = struct.Struct("<4sHHQQQ")  # magic, version, flags, block_bytes, seq_hash, xxh3_64(payload)
MAGIC, VERSION, HEADER_BYTES = b"KVR4", 1, _HDR.size


def object_key(fingerprint: str, seq_hash: int) -> str:
    return f"kvrelay/{fingerprint}/{seq_hash:016x}"


def encode(seq_hash: int, src: torch.Tensor) -> bytearray:
    """Header + the bytes of `src` (flat uint8, any device): the one copy a put makes."""
    body = bytearray(HEADER_BYTES + src.numel())
    torch.from_numpy(np.frombuffer(body, np.uint8, offset=HEADER_BYTES)).copy_(src)
    csum = xxhash.xxh3_64_intdigest(memoryview(body)[HEADER_BYTES:])
    _HDR.pack_into(body, 0, MAGIC, VERSION, 0, src.numel(), seq_hash, csum)
    return body


def verify(body: memoryview, seq_hash: int, block_bytes: int) -> memoryview | None:
    """The payload if `body` is exactly block `seq_hash`'s object, else None (a miss)."""
    if len(body) != HEADER_BYTES + block_bytes:
        return None
    magic, version, _, bb, h, csum = _HDR.unpack_from(body)
    if (magic, version, bb, h) != (MAGIC, VERSION, block_bytes, seq_hash):
        return None
    payload = body[HEADER_BYTES:]
    return payload if xxhash.xxh3_64_intdigest(payload) == csum else None

"""G4's object format: key `kvrelay/<model fingerprint>/<seq_hash as 16 hex>`, body = a 32-byte header
(magic "KVR4", version, flags, block_bytes, seq_hash, xxh3_64 of the payload) + the block's bytes.
An encoded block (kvbm/codecs) is the same object with a shorter payload (its frame), `block_bytes`
naming the payload's length, under the key with its codec's tag.

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


def object_key(fingerprint: str, seq_hash: int, tag: str = "") -> str:
    """`tag`: the codec of an encoded block (`<hash>.lossless`): each codec has its own objects, so a
    worker configured otherwise never reads, overwrites or deletes them as corrupt."""
    return f"kvrelay/{fingerprint}/{seq_hash:016x}" + (f".{tag}" if tag else "")


def encode(seq_hash: int, src: torch.Tensor) -> bytearray:
    """Header + the bytes of `src` (flat uint8, any device): the one copy a put makes."""
    body = bytearray(HEADER_BYTES + src.numel())
    torch.from_numpy(np.frombuffer(body, np.uint8, offset=HEADER_BYTES)).copy_(src)
    csum = xxhash.xxh3_64_intdigest(memoryview(body)[HEADER_BYTES:])
    _HDR.pack_into(body, 0, MAGIC, VERSION, 0, src.numel(), seq_hash, csum)
    return body


def verify(body: memoryview, seq_hash: int, block_bytes: int, variable: bool = False) -> memoryview | None:
    """The payload if `body` is exactly block `seq_hash`'s object, else None (a miss). `variable`:
    payloads of 1..block_bytes bytes (encoded blocks, kvbm/codecs), the header naming the length."""
    if len(body) < HEADER_BYTES or (not variable and len(body) != HEADER_BYTES + block_bytes):
        return None
    magic, version, _, bb, h, csum = _HDR.unpack_from(body)
    if (magic, version, h) != (MAGIC, VERSION, seq_hash) or len(body) != HEADER_BYTES + bb:
        return None
    if bb != block_bytes and not (variable and 0 < bb <= block_bytes):
        return None
    payload = body[HEADER_BYTES:]
    return payload if xxhash.xxh3_64_intdigest(payload) == csum else None

"""Block identity (docs/ARCHITECTURE.md "Block identity"): the one implementation used by the engine's prefix
cache, the router's index, every KVBM tier, the events and the object-store keys.

    seq_hash[-1] = xxh3_64(model fingerprint ‖ salt)
    seq_hash[i]  = xxh3_64(seq_hash[i-1] as 8 bytes LE ‖ block i's tokens as u32 LE ‖ extra)

`extra` carries the LoRA name (empty for the base model); the salt isolates tenants (`cache_salt`).
Only full blocks are hashed: a hash therefore names a whole prefix, not just one block's tokens.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import xxhash

_U32 = "I"
assert array(_U32).itemsize == 4, "kvrelay needs a platform whose C unsigned int is 32 bits"
_SWAP = sys.byteorder != "little"


def _u32le(tokens: Sequence[int]) -> bytes:
    arr = array(_U32, tokens)
    if _SWAP:
        arr.byteswap()
    return arr.tobytes()


def root_hash(model_fingerprint: str | bytes, salt: str | bytes = b"") -> int:
    """seq_hash[-1]: the parent of a sequence's first block."""
    fp = model_fingerprint.encode() if isinstance(model_fingerprint, str) else model_fingerprint
    s = salt.encode() if isinstance(salt, str) else salt
    return xxhash.xxh3_64_intdigest(fp + s)


def block_hash(parent: int, tokens: Sequence[int], extra: bytes = b"") -> int:
    return xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + _u32le(tokens) + extra)


def block_hashes(tokens: Sequence[int], block_size: int, parent: int, extra: bytes = b"") -> list[int]:
    """Chained hashes of every full block of `tokens`, starting from `parent` (a root or a block hash)."""
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start:start + block_size], extra)
        out.append(parent)
    return out


class BlockHasher:
    """Incremental hashing for a growing sequence: `extend` returns hashes of newly completed blocks.

    Invariant: after any sequence of `extend` calls, `hashes == block_hashes(all_tokens, ...)`.
    """

    def __init__(self, block_size: int, root: int, extra: bytes = b""):
        self.block_size, self.root, self.extra = block_size, root, extra
        self.hashes: list[int] = []
        self._partial: list[int] = []

    def extend(self, tokens: Sequence[int]) -> list[int]:
        self._partial.extend(tokens)
        new = block_hashes(self._partial, self.block_size, self.hashes[-1] if self.hashes else self.root,
                           self.extra)
        if new:
            del self._partial[: len(new) * self.block_size]
            self.hashes.extend(new)
        return new

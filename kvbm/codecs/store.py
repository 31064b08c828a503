"""A tier that stores blocks through a codec: `CodecStore(inner, codec)` is a `TierStore` of raw blocks
(what `TieredKv` moves to and from G1) over an inner store of encoded frames (kvbm/codecs/frame.py).

- put: each block is encoded on a worker thread; the frames go to the inner store, which checksums and
  bounds them as it does any block. A fixed-size codec (int8) fills fixed slots of `codec.max_bytes`
  (G3 `DiskStore`: a slot is ~1/3.6 of a float32 block). A variable-size codec (lossless) hands each
  frame over at its own length (`variable=True`): G3 `DiskStore(variable=True)` writes only the frame's
  pages into a sparse file and charges its capacity by them (kvbm/tiers/disk_extents.py), G4
  `ObjectStore(variable=True)` stores an object as long as the frame. A block the codec cannot encode
  is not stored (rejected).
- get: the inner store verifies its checksum into a staging row (a corrupted frame is a checksum miss
  there); the frame is then decoded into the caller's tensor on a worker thread. A frame this codec
  cannot decode (another codec id or version, another shape) is a miss: counted in `misses` (not
  `hits`), dropped from the inner store, and the block is recomputed. Decode time is inside `get`, so
  the cost model's measured tier bandwidth (TieredKv.onboard times each get) includes it.
- Accounting: `stats` is the inner store's, so `used_bytes`/`footprint_bytes`/`capacity_bytes` are in
  stored (encoded) bytes; `block_bytes` here is the raw block size G1 sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch

from kvrelay.kvbm.tiers.base import TierStats, TierStore, check_batch

from .base import Codec


def slot_bytes(codec: Codec, fixed_slots: bool) -> int:
    """The largest frame the inner store holds. G3 caps a variable-size codec at the raw block size: a
    slot never grows past the raw block's pages (a 4 KiB-aligned block would otherwise take one more
    page for the header), and the rare frame that does not fit (a block zstd cannot shrink by its
    header) is not stored."""
    if fixed_slots and not codec.fixed_size:
        return min(codec.max_bytes, codec.shape.block_bytes)
    return codec.max_bytes


class CodecStore:
    def __init__(self, inner: TierStore, codec: Codec, *, variable: bool):
        """inner: holds frames of up to `inner.block_bytes` (`slot_bytes(codec)`); variable: it takes each
        frame at its own length (G4) instead of a padded row (G3). A longer frame is not stored."""
        self.inner, self.codec, self.variable = inner, codec, variable
        self.tier = inner.tier
        self.block_bytes = codec.shape.block_bytes
        self._unencodable = 0  # puts not stored: the codec refused (non-finite values), or too long a frame
        self._undecodable = 0  # inner hits whose frame did not decode: misses

    @property
    def stats(self) -> TierStats:
        s = self.inner.stats
        s.rejected_puts += self._unencodable
        s.hits -= self._undecodable
        s.misses += self._undecodable
        return s

    @property
    def enabled(self) -> bool:
        return self.inner.enabled

    def hashes(self) -> list[int]:
        return self.inner.hashes()

    async def contains(self, hashes: Sequence[int]) -> list[bool]:
        return await self.inner.contains(hashes)

    async def remove(self, hashes: Sequence[int]) -> int:
        return await self.inner.remove(hashes)

    async def close(self) -> None:
        await self.inner.close()

    # -- put --------------------------------------------------------------------------------------------
    async def put(self, hashes: Sequence[int], srcs: Sequence[torch.Tensor]) -> list[bool]:
        u8s = check_batch(hashes, srcs, self.block_bytes)
        if not u8s:
            return []
        frames = [f if f is not None and len(f) <= self.inner.block_bytes else None
                  for f in await asyncio.to_thread(self._encode_all, u8s)]
        keep = [i for i, f in enumerate(frames) if f is not None]
        self._unencodable += len(frames) - len(keep)
        out = [False] * len(u8s)
        if not keep:
            return out
        if self.variable:
            rows = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in frames if f is not None]
        else:
            staging = torch.zeros((len(keep), self.inner.block_bytes), dtype=torch.uint8)
            for row, i in enumerate(keep):
                frame = frames[i]
                assert frame is not None
                staging[row, :len(frame)] = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
            rows = list(staging)
        stored = await self.inner.put([hashes[i] for i in keep], rows)
        for i, ok in zip(keep, stored, strict=True):
            out[i] = ok
        return out

    def _encode_all(self, u8s: list[torch.Tensor]) -> list[bytes | None]:
        return [self.codec.encode(t if t.device.type == "cpu" else t.cpu()) for t in u8s]

    # -- get --------------------------------------------------------------------------------------------
    async def get(self, hashes: Sequence[int], dsts: Sequence[torch.Tensor]) -> list[bool]:
        u8s = check_batch(hashes, dsts, self.block_bytes)
        if not u8s:
            return []
        staging = torch.empty((len(u8s), self.inner.block_bytes), dtype=torch.uint8)
        got = await self.inner.get(hashes, list(staging))
        hit = [i for i, ok in enumerate(got) if ok]
        decoded = await asyncio.to_thread(self._decode_all, staging, u8s, hit) if hit else []
        out = [False] * len(u8s)
        bad = []
        for i, ok in zip(hit, decoded, strict=True):
            out[i] = ok
            if not ok:
                bad.append(hashes[i])
        if bad:
            self._undecodable += len(bad)
            await self.inner.remove(bad)  # useless to this worker: free the room for blocks it can read
        return out

    def _decode_all(self, staging: torch.Tensor, dsts: list[torch.Tensor], hit: list[int]) -> list[bool]:
        oks = []
        for i in hit:
            dst = dsts[i]
            tmp = dst if dst.device.type == "cpu" else torch.empty(self.block_bytes, dtype=torch.uint8)
            try:
                ok = self.codec.decode(staging[i].numpy().data, tmp)
            except (ValueError, RuntimeError):  # a frame that passed its checks yet fails: still a miss
                ok = False
            if ok and tmp is not dst:
                dst.copy_(tmp)
            oks.append(ok)
        return oks

"""G4: an S3-compatible object store shared by all workers (docs/ARCHITECTURE.md "Tiers").

One object per block (format in object_format.py: key `kvrelay/<model fingerprint>/<seq_hash as 16
hex>`, a 32-byte header with an xxh3_64 of the payload, then the bytes). A missing, truncated,
mis-keyed or corrupted object is a miss (corrupt ones count as checksum failures and are
deleted, so they cannot block a rewrite). Client: obstore (Rust object_store; any obstore store works,
so the embedded "G4 at a local path" is `obstore.store.LocalStore`). At most `max_concurrency` requests
are in flight per store; each has a timeout. Any transport error disables the tier with one warning;
after `retry_after_s` one call probes again and a success re-enables it.

Capacity, honestly: G4 is shared, so no worker can bound the bucket. `capacity_bytes` bounds the
objects *this worker wrote and has not deleted* (headers included, in-flight writes and unconfirmed
deletes counted), evicting them LRU (or by the `tinylfu` policy) with DeleteObjects. Puts are
conditional (If-None-Match: *): a block another worker already wrote is a dedup hit, neither counted
nor ever deleted by us. Reads serve any worker's objects. The owned set lives in memory, so objects of
a crashed worker stay until a bucket lifecycle rule (expiration) removes them: configure one.
`hashes()` and the on_event stream describe the owned set. `contains` is local for owned blocks and a
HEAD request for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from time import perf_counter
from typing import Any, Literal

import numpy as np
import obstore
import torch
from obstore.exceptions import AlreadyExistsError, NotFoundError

from kvrelay.runtime.log import Throttled

from .base import RETRY_AFTER_S, EventCallback, Health, TierStats, as_u8, check_batch, emit, log
from .object_format import HEADER_BYTES, MAGIC, encode, object_key, verify
from .policy import make_policy
from .s3 import s3_store

_MISSING = (NotFoundError, FileNotFoundError)
__all__ = ["HEADER_BYTES", "MAGIC", "ObjectStore", "object_key", "s3_store"]


class ObjectStore:
    tier = "G4"

    def __init__(self, store: Any, fingerprint: str, block_bytes: int, capacity_bytes: int, *,
                 policy: str = "lru", max_concurrency: int = 16, timeout_s: float = 10.0,
                 retry_after_s: float | None = RETRY_AFTER_S, conditional_put: bool = True,
                 on_event: EventCallback | None = None, variable: bool = False, key_tag: str = ""):
        """variable: blocks are encoded frames (kvbm/codecs) of 1..block_bytes bytes, each object as long
        as its frame and accounted by its real size; key_tag: the codec's name, in every key."""
        self.object_bytes = HEADER_BYTES + block_bytes  # the largest object
        self.max_blocks = capacity_bytes // self.object_bytes
        if block_bytes < 1 or self.max_blocks < 1:
            raise ValueError(f"G4: capacity {capacity_bytes} B holds no object of {self.object_bytes} B")
        self.store, self.fingerprint, self.block_bytes = store, fingerprint, block_bytes
        self.timeout_s, self.conditional_put, self.on_event = timeout_s, conditional_put, on_event
        self.variable, self.key_tag, self.capacity_bytes = variable, key_tag, capacity_bytes
        self._owned = make_policy(policy, self.max_blocks)  # committed objects we wrote, eviction order
        self._sizes: dict[int, int] = {}  # owned hash -> its object's bytes (header included)
        self._pending: dict[int, int] = {}  # our puts in flight (room reserved) -> object bytes
        self._deleting: dict[int, int] = {}  # evicted/removed, delete not yet confirmed (still counted)
        self._held = 0  # bytes of _sizes + _pending + _deleting: the footprint
        self._sem = asyncio.Semaphore(max_concurrency)
        self._stats = TierStats(tier=self.tier, capacity_bytes=capacity_bytes)
        self._health = Health(self.tier, retry_after_s)
        self._corrupt_log = Throttled(log)
        # Invariant: _held <= capacity_bytes once a put's evictions are drained (the deletes it starts
        # are confirmed before its objects are written).

    @property
    def enabled(self) -> bool:
        return self._health.enabled

    @property
    def stats(self) -> TierStats:
        s = self._stats.copy()
        s.blocks = len(self._owned)
        s.used_bytes = sum(self._sizes.values()) - s.blocks * HEADER_BYTES  # stored (encoded) bytes
        s.footprint_bytes = self._held
        s.enabled = self._health.enabled
        return s

    def hashes(self) -> list[int]:
        return list(self._owned)

    def key(self, seq_hash: int) -> str:
        return object_key(self.fingerprint, seq_hash, self.key_tag)

    def _check(self, hashes: Sequence[int], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.variable:
            return check_batch(hashes, tensors, self.block_bytes)
        if len(hashes) != len(tensors):
            raise ValueError(f"{len(hashes)} hashes but {len(tensors)} tensors")
        u8s = [as_u8(t, t.numel() * t.element_size()) for t in tensors]
        if any(not 0 < u.numel() <= self.block_bytes for u in u8s):
            raise ValueError(f"G4 objects hold 1..{self.block_bytes} bytes")
        return u8s

    def _commit(self, h: int) -> None:
        self._sizes[h] = self._pending.pop(h)
        self._owned.insert(h)

    def _drop(self, h: int) -> None:
        """An owned object leaves the owned set: its bytes stay counted until its delete is confirmed."""
        self._owned.remove(h)
        self._deleting[h] = self._deleting.get(h, 0) + self._sizes.pop(h)

    async def close(self) -> None:
        """Afterwards every call is a miss or a dropped put (objects stay: G4 outlives workers)."""
        self._health.retry_after_s, self._health.enabled = None, False

    # -- put ------------------------------------------------------------------------------------------
    async def put(self, hashes: Sequence[int], srcs: Sequence[torch.Tensor]) -> list[bool]:
        u8s = self._check(hashes, srcs)
        out, st = [False] * len(u8s), self._stats
        if not self._health.allow():
            st.rejected_puts += len(u8s)
            return out
        todo, evicted, freed = [], [], 0  # freed: bytes this put evicts (deleted before it writes)
        for i, (h, src) in enumerate(zip(hashes, u8s, strict=True)):
            self._owned.record(h)
            if h in self._owned or h in self._pending:
                self._owned.touch(h)
                st.dedup_puts += 1
                out[i] = True
                continue
            size = HEADER_BYTES + src.numel()
            while self._held - freed + size > self.capacity_bytes:
                victim = self._owned.victim()
                if victim is None or not self._owned.admit(h, victim):
                    break
                freed += self._sizes[victim]
                self._drop(victim)
                evicted.append(victim)
            if self._held - freed + size > self.capacity_bytes:
                st.rejected_puts += 1
                continue
            self._pending[h] = size
            self._held += size
            todo.append((i, h, src))
        st.evictions += len(evicted)
        emit(self.on_event, "removed", evicted)
        if todo or self._deleting:
            await asyncio.shield(asyncio.ensure_future(self._put_io(todo, out)))
        return out

    async def _put_io(self, todo: list[tuple[int, int, torch.Tensor]], out: list[bool]) -> None:
        st, t0 = self._stats, perf_counter()
        if self._deleting and not await self._drain_deletes():  # room first, then new objects
            results: list[Any] = [None] * len(todo)
        else:
            results = await asyncio.gather(*(self._put_one(h, src) for _, h, src in todo))
        stored, error = [], None
        written = 0
        for (i, h, src), r in zip(todo, results, strict=True):
            if r == "stored":
                self._commit(h)
                stored.append(h)
                written += src.numel()
                out[i] = True
                continue
            self._held -= self._pending.pop(h)
            if r == "exists":  # another worker wrote it: in G4, not ours
                st.dedup_puts += 1
                out[i] = True
            else:
                st.rejected_puts += 1
                error = error or r
        st.puts += len(stored)
        st.bytes_written += written
        st.write_seconds += perf_counter() - t0
        self._outcome(error, any(r in ("stored", "exists") for r in results))
        emit(self.on_event, "stored", stored)

    async def _put_one(self, h: int, src: torch.Tensor) -> Any:
        async with self._sem:  # the staging copy too: at most max_concurrency bodies in memory
            body = encode(h, src)
            mode: Literal["create", "overwrite"] = "create" if self.conditional_put else "overwrite"
            try:
                await asyncio.wait_for(obstore.put_async(self.store, self.key(h), body, mode=mode,
                                                         use_multipart=False), self.timeout_s)
            except AlreadyExistsError:
                return "exists"
            except Exception as exc:  # transport, timeout, permission: the tier is unusable now
                return exc
            return "stored"

    async def _drain_deletes(self) -> bool:
        hashes = list(self._deleting)
        try:
            async with self._sem:
                await asyncio.wait_for(obstore.delete_async(self.store, [self.key(h) for h in hashes]),
                                       self.timeout_s)
        except Exception as exc:
            self._outcome(exc, False)
            return False
        for h in hashes:
            self._held -= self._deleting.pop(h, 0)  # a concurrent drain may have confirmed it first
        return True

    # -- get / contains / remove ----------------------------------------------------------------------
    async def get(self, hashes: Sequence[int], dsts: Sequence[torch.Tensor]) -> list[bool]:
        u8s = check_batch(hashes, dsts, self.block_bytes)  # room for the largest object
        st = self._stats
        if not self._health.allow():
            st.misses += len(u8s)
            return [False] * len(u8s)
        t0 = perf_counter()
        results = await asyncio.shield(asyncio.gather(*(self._get_one(h, d) for h, d in zip(hashes, u8s, strict=True))))
        st.read_seconds += perf_counter() - t0
        gone, error = [], None
        for h, r in zip(hashes, results, strict=True):
            if isinstance(r, int) and not isinstance(r, bool):  # a hit: the payload's bytes
                st.hits += 1
                st.bytes_read += r
                self._owned.touch(h)
                continue
            st.misses += 1
            if r == "corrupt":
                st.checksum_failures += 1
            elif r != "missing":
                error = error or r
                continue
            if h in self._owned:  # ours, but gone or corrupt: no longer in the tier
                self._owned.remove(h)
                self._held -= self._sizes.pop(h)
                gone.append(h)
        st.removals += len(gone)
        corrupt = sum(r == "corrupt" for r in results)
        if corrupt:
            self._corrupt_log.warning("checksum", "KV tier G4: %d object(s) failed their checksum (deleted, "
                                      "recomputed; %d in all)", corrupt, st.checksum_failures)
        self._outcome(error, any(isinstance(r, int) or r in ("missing", "corrupt") for r in results))
        emit(self.on_event, "removed", gone)
        return [isinstance(r, int) and not isinstance(r, bool) for r in results]

    async def _get_one(self, h: int, dst: torch.Tensor) -> Any:
        self._owned.record(h)
        key = self.key(h)
        async with self._sem:
            try:
                buf = await asyncio.wait_for(self._fetch(key), self.timeout_s)
            except _MISSING:
                return "missing"
            except Exception as exc:
                return exc
            payload = verify(memoryview(buf), h, self.block_bytes, self.variable)
            if payload is None:
                try:  # a corrupt object would block every conditional rewrite: drop it
                    await asyncio.wait_for(obstore.delete_async(self.store, key), self.timeout_s)
                except Exception:
                    pass
                return "corrupt"
        src, n = np.frombuffer(payload, np.uint8), len(payload)
        if dst.device.type == "cpu":
            dst.numpy()[:n] = src
        else:
            dst[:n].copy_(torch.from_numpy(src.copy()))
        return n  # a hit, this many bytes (a variable object fills dst's head)

    async def _fetch(self, key: str) -> Any:
        result = await obstore.get_async(self.store, key)
        return await result.bytes_async()

    async def contains(self, hashes: Sequence[int]) -> list[bool]:
        if not self._health.allow():
            return [False] * len(hashes)
        answered = 0

        async def head(h: int) -> Any:
            nonlocal answered
            if h in self._owned:
                return True
            async with self._sem:
                try:
                    await asyncio.wait_for(obstore.head_async(self.store, self.key(h)), self.timeout_s)
                except _MISSING:
                    answered += 1
                    return False
                except Exception as exc:
                    return exc
                answered += 1
                return True

        results = await asyncio.gather(*(head(h) for h in hashes))
        errors = [r for r in results if isinstance(r, BaseException)]
        self._outcome(errors[0] if errors else None, answered > 0)
        return [r is True for r in results]

    async def remove(self, hashes: Sequence[int]) -> int:
        """Delete objects this worker wrote (others' objects are left alone)."""
        mine = [h for h in dict.fromkeys(hashes) if h in self._owned]
        for h in mine:
            self._drop(h)
        self._stats.removals += len(mine)
        emit(self.on_event, "removed", mine)
        if mine and self._health.allow():
            await asyncio.shield(asyncio.ensure_future(self._drain_deletes()))
        return len(mine)

    def _outcome(self, error: Any, any_ok: bool) -> None:
        if error is not None:
            self._stats.errors += 1
            self._health.fail(f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        elif any_ok:
            self._health.succeed()

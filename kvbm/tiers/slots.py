"""Fixed-slot stores (G2 host memory, G3 disk): the put/get/remove orchestration over a SlotTable.

A subclass supplies the bytes side only: `_write(items)` and `_read(items)` move blocks between caller
tensors and slots (run on an I/O thread, or inline for small batches), `_forget(slots)` records that
slots' blocks were dropped, `_footprint()` reports the bytes it occupies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import TypeVar

import torch

from kvrelay.runtime.log import Throttled

from .base import RETRY_AFTER_S, EventCallback, Health, TierStats, check_batch, emit, log
from .policy import make_policy
from .slot_table import Item, SlotTable, coalesce

__all__ = ["Item", "SlotStore", "SlotTable", "coalesce"]
T = TypeVar("T")


class SlotStore:
    tier = "G?"

    def __init__(self, block_bytes: int, num_slots: int, capacity_bytes: int, *, policy: str,
                 on_event: EventCallback | None, inline_bytes: int, io_threads: int,
                 retry_after_s: float | None = RETRY_AFTER_S):
        if block_bytes < 1 or num_slots < 1:
            raise ValueError(f"{self.tier}: capacity {capacity_bytes} B holds no block of {block_bytes} B")
        self.block_bytes, self.num_slots = block_bytes, num_slots
        self._slots = SlotTable(num_slots, make_policy(policy, num_slots))
        self._stats = TierStats(tier=self.tier, capacity_bytes=capacity_bytes)
        self._health = Health(self.tier, retry_after_s)
        self._corrupt_log = Throttled(log)  # a failing disk can fail thousands of checksums a second
        self.on_event = on_event
        self._inline_bytes = inline_bytes
        self._executor = ThreadPoolExecutor(io_threads, thread_name_prefix=f"kvrelay-{self.tier}")

    # -- subclass hooks -------------------------------------------------------------------------------
    # _write/_read get items sorted by slot, at most `chunk_blocks` of them; chunks of one batch may
    # run concurrently on the I/O threads. _write_durable runs once after all chunks were written.
    # cooperative: large batches of CPU tensors run on the event loop in chunks (yielding between
    # them) instead of on an I/O thread; for memory copies, where a thread hop costs more than it saves.
    chunk_blocks = 1 << 62
    cooperative = False

    def _write(self, items: list[Item]) -> None:
        raise NotImplementedError

    def _write_durable(self, items: list[Item]) -> None:
        pass

    def _read(self, items: list[Item]) -> list[bool]:
        raise NotImplementedError

    def _forget(self, slots: list[int]) -> None:
        pass

    def _footprint(self) -> int:
        raise NotImplementedError

    # Variable-size blocks (G3 with a codec, disk.py): puts may be shorter than block_bytes and take
    # room by their length. The defaults are the fixed-size store's: one block_bytes block per slot.
    def _check(self, hashes: Sequence[int], srcs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return check_batch(hashes, srcs, self.block_bytes)

    def _admit(self, h: int, slot: int, src: torch.Tensor) -> tuple[list[int], bool]:
        """Room for `src` in `slot` beyond the slot itself: (hashes evicted for it, whether it fits)."""
        return [], True

    def _settled(self, batch: list[tuple[int, int, int, torch.Tensor]], ok: bool) -> None:
        """A put's I/O is over (ok: its blocks are committed; else aborted)."""

    def _stored_bytes(self, slot: int) -> int:
        return self.block_bytes

    def _used_bytes(self) -> int:
        return len(self._slots.map) * self.block_bytes

    # -- the TierStore interface ----------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._health.enabled

    @property
    def stats(self) -> TierStats:
        s = self._stats.copy()
        s.blocks = len(self._slots.map)
        s.used_bytes = self._used_bytes()
        s.footprint_bytes = self._footprint()
        s.enabled = self._health.enabled
        return s

    def hashes(self) -> list[int]:
        return list(self._slots.map)

    async def contains(self, hashes: Sequence[int]) -> list[bool]:
        on = self._health.enabled
        return [on and h in self._slots.map for h in hashes]

    async def put(self, hashes: Sequence[int], srcs: Sequence[torch.Tensor]) -> list[bool]:
        u8s = self._check(hashes, srcs)
        out, st, slots = [False] * len(u8s), self._stats, self._slots
        if not self._health.allow():
            st.rejected_puts += len(u8s)
            return out
        batch, evicted = [], []
        for i, (h, src) in enumerate(zip(hashes, u8s, strict=True)):
            slots.policy.record(h)
            if slots.has(h):  # dedup: committed, or being written by a concurrent put
                slots.policy.touch(h)
                st.dedup_puts += 1
                out[i] = True
                continue
            got = slots.reserve(h)
            if got is None:
                st.rejected_puts += 1
                continue
            if got[1] is not None:
                evicted.append(got[1])
            room, fits = self._admit(h, got[0], src)
            evicted += room
            if not fits:  # its bytes do not fit (variable-size store): the slot goes back
                slots.abort(h)
                st.rejected_puts += 1
                continue
            batch.append((i, h, got[0], src))
        st.evictions += len(evicted)
        emit(self.on_event, "removed", evicted)
        if batch:
            batch.sort(key=lambda b: b[2])  # by slot: neighbouring slots coalesce into one I/O
            await self._io_phase(self._put_io(batch, out), len(batch))
        return out

    async def get(self, hashes: Sequence[int], dsts: Sequence[torch.Tensor]) -> list[bool]:
        u8s = check_batch(hashes, dsts, self.block_bytes)
        out, st = [False] * len(u8s), self._stats
        if not self._health.allow():
            st.misses += len(u8s)
            return out
        batch = []
        for i, (h, dst) in enumerate(zip(hashes, u8s, strict=True)):
            self._slots.policy.record(h)
            slot = self._slots.lookup(h)
            if slot is None:
                st.misses += 1
            else:
                batch.append((i, h, slot, dst))
        if batch:
            batch.sort(key=lambda b: b[2])
            await self._io_phase(self._get_io(batch, out), len(batch))
        return out

    async def remove(self, hashes: Sequence[int]) -> int:
        dropped, freed = [], []
        for h in hashes:
            slot = self._slots.drop(h)
            if slot is not None:
                dropped.append(h)
                freed.append(slot)
        self._forget(freed)
        self._stats.removals += len(dropped)
        emit(self.on_event, "removed", dropped)
        return len(dropped)

    async def close(self) -> None:
        """Waits for I/O in flight; afterwards every call is a miss or a dropped put."""
        self._health.retry_after_s, self._health.enabled = None, False
        await asyncio.to_thread(self._executor.shutdown, True)

    # -- internals ------------------------------------------------------------------------------------
    async def _io_phase(self, coro: Awaitable[None], blocks: int) -> None:
        # Small batches run inline (no suspension point, so nothing to cancel). Large ones run on an I/O
        # thread; the commit/unpin after it must happen even if our caller is cancelled, hence shield.
        if blocks * self.block_bytes <= self._inline_bytes:
            await coro
        else:
            await asyncio.shield(asyncio.ensure_future(coro))

    async def _run(self, fn: Callable[[list[Item]], T], items: list[Item]) -> list[T]:
        """fn over `items` cut into chunks: inline if the batch is small, else concurrently on I/O threads."""
        per = self.chunk_blocks
        chunks = [items[k:k + per] for k in range(0, len(items), per)]
        if len(items) * self.block_bytes <= self._inline_bytes:
            return [fn(c) for c in chunks]
        if self.cooperative and all(it[2].is_cpu for it in items):
            done_inline = []
            for c in chunks:  # on the loop, one chunk at a time, yielding in between
                done_inline.append(fn(c))
                await asyncio.sleep(0)
            return done_inline
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(*(loop.run_in_executor(self._executor, fn, c) for c in chunks),
                                    return_exceptions=True)  # every chunk has finished before we go on
        results: list[T] = []
        for r in done:
            if isinstance(r, BaseException):
                raise r
            results.append(r)
        return results

    async def _put_io(self, batch: list[tuple[int, int, int, torch.Tensor]], out: list[bool]) -> None:
        st, t0 = self._stats, perf_counter()
        items = [(h, slot, src) for _, h, slot, src in batch]
        try:
            await self._run(self._write, items)
            if type(self)._write_durable is SlotStore._write_durable:
                pass  # nothing to make durable (G2): no thread hop
            elif len(items) * self.block_bytes <= self._inline_bytes:
                self._write_durable(items)
            else:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._write_durable, items)
        except Exception as exc:  # OSError, or anything the copy raised: never leak reservations
            for _, h, _, _ in batch:
                self._slots.abort(h)
            st.errors += 1
            st.rejected_puts += len(batch)
            self._health.fail(exc)
            self._settled(batch, False)
            return
        st.write_seconds += perf_counter() - t0
        st.bytes_written += sum(src.numel() for _, _, _, src in batch)
        st.puts += len(batch)
        self._health.succeed()  # a probe after an outage that worked re-enables the tier
        for i, h, _, _ in batch:
            self._slots.commit(h)
            out[i] = True
        self._settled(batch, True)
        emit(self.on_event, "stored", [h for _, h, _, _ in batch])

    async def _get_io(self, batch: list[tuple[int, int, int, torch.Tensor]], out: list[bool]) -> None:
        st, t0, io_error = self._stats, perf_counter(), False
        try:
            oks = [ok for c in await self._run(self._read, [(h, s, d) for _, h, s, d in batch]) for ok in c]
        except Exception as exc:  # OSError, or anything the copy raised: never leak reservations
            oks, io_error = [False] * len(batch), True
            st.errors += 1
            self._health.fail(exc)
        else:
            st.read_seconds += perf_counter() - t0
            self._health.succeed()
        bad, bad_slots = [], []
        for (i, h, slot, _), ok in zip(batch, oks, strict=True):
            if ok:
                out[i] = True
                st.hits += 1
                st.bytes_read += self._stored_bytes(slot)
            else:
                st.misses += 1
                if not io_error:  # the bytes read back do not match their checksum
                    st.checksum_failures += 1
                    if self._slots.map.get(h) == slot:
                        self._slots.drop(h)
                        bad.append(h)
                        bad_slots.append(slot)
            self._slots.unpin(slot)
        self._forget(bad_slots)
        if bad:
            self._corrupt_log.warning("checksum", "KV tier %s: %d block(s) failed their checksum (dropped, "
                                      "recomputed; %d in all)", self.tier, len(bad), st.checksum_failures)
        st.removals += len(bad)
        emit(self.on_event, "removed", bad)

"""G3: local disk (docs/ARCHITECTURE.md "Tiers"): bounded, growing as written, checksummed, restart-safe.

Files in `directory`:
    blocks.dat   slot k at offset k * slot_bytes, slot_bytes = block_bytes rounded up to 4 KiB so every
                 slot is O_DIRECT-aligned. Not preallocated: the file grows as slots are first written
                 (slots are handed out lowest first, so it stays dense) and never past num_slots slots
    index.log    slot -> (seq_hash, xxh3_64 of the bytes, gen): see disk_index.py
    lock         flock'ed while open: two processes never share a directory

Bound: num_slots is chosen so that the data file at its largest plus the index's worst case fit in
capacity_bytes, so the disk footprint never passes the bound (LMCache #1454, #4546); until blocks are
written it takes next to nothing (issue 30: 2 x 4 GiB preallocated at the first `kvrelay serve`). The
footprint reported is what the files take now. A disk that fills up while the file grows is a write
error: the store disables itself with one warning, as for any I/O error.
`remove_if_empty`: a store that holds no block when it closes removes its files and its directory (and
the parent, if that is left empty): a worker that failed to start, or never offloaded, leaves nothing.

I/O: O_DIRECT when the filesystem accepts it (probed on open; `direct_io` says which), else buffered
I/O + fdatasync. Blocks of neighbouring slots coalesce into one pwritev/preadv. O_DIRECT needs 4 KiB
aligned memory: a caller's CPU tensor that is aligned (and block_bytes a multiple of 4 KiB) is used in
place; otherwise the block goes through a per-thread aligned staging buffer (pinned when CUDA is
present), and on reads the bytes reach the caller's tensor only after their checksum matched. In
buffered mode CPU tensors are always used in place. Every read is verified against the checksum in
the index; a mismatch is a miss, counted, and the slot is freed. I/O runs on `io_threads` threads.

Variable-size blocks (`variable=True`, G3 under a codec: kvbm/codecs/store.py): a put is 1..block_bytes
bytes (an encoded frame) and takes only the pages it needs; each index record carries its length
(disk_index.py), so a restart knows every block's size. Where the filesystem can punch holes (probed on
open; ext4, xfs, btrfs, tmpfs can), the data file is sparse and the capacity is charged by the frames'
pages, not by slots: `disk_extents.py` (more slots than full-size blocks would fit, a byte budget,
evictions until a frame fits, punched room given back before a write). Footprint is then the data
file's real allocation (st_blocks) plus the index. Without hole punching it keeps one slot per block,
as a fixed-size store. Checksums cover the frame's own bytes: a corrupted frame is a miss as ever.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import xxhash

from kvrelay.runtime.paths import private_dir

from .base import RETRY_AFTER_S, EventCallback, as_u8
from .disk_extents import MAX_RATIO, PAGE, ExtentBook, pages, punch_hole, punch_supported
from .disk_index import HEADER_BYTES, RECORD_BYTES, DiskIndex, Entry
from .slots import Item, SlotStore, coalesce

log = logging.getLogger("kvrelay.kvbm.tiers")
ALIGN = 4096
_IOV_MAX = max(2, min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024))


class DiskStore(SlotStore):
    tier = "G3"

    def __init__(self, directory: str | os.PathLike[str], block_bytes: int, capacity_bytes: int, *,
                 policy: str = "lru", direct_io: bool = True, on_event: EventCallback | None = None,
                 io_threads: int = 2, stage_bytes: int = 16 << 20, inline_bytes: int = 0,
                 remove_if_empty: bool = False, retry_after_s: float | None = RETRY_AFTER_S,
                 variable: bool = False):
        """Opens (or creates) the store; I/O errors leave it disabled with a warning, never raise.
        `await DiskStore.open(...)` does the same on a thread. variable: blocks are 1..block_bytes long
        (see "Variable-size blocks" above)."""
        slot_bytes = -(-max(1, block_bytes) // ALIGN) * ALIGN
        room = max(0, capacity_bytes - 2 * HEADER_BYTES)
        num_slots = room // (slot_bytes + 3 * RECORD_BYTES)
        sparse = variable and num_slots > 0 and punch_supported(Path(directory))
        budget = 0
        if sparse:  # slots are cheap (index records); the pages of the frames are what is bounded
            num_slots = max(num_slots, min(MAX_RATIO * num_slots, room // (PAGE + 3 * RECORD_BYTES)))
            data = capacity_bytes - DiskIndex.max_bytes(num_slots)
            # The filesystem's extent tree of a sparse file: ~12 B per extent, one or two extents per
            # block of >= 4 KiB (<= 0.6%); 1/128 leaves margin.
            budget = data - data // 128
        self.chunk_blocks = max(1, stage_bytes // slot_bytes)  # one chunk fills one staging buffer
        super().__init__(block_bytes, num_slots, capacity_bytes, policy=policy, on_event=on_event,
                         inline_bytes=inline_bytes, io_threads=io_threads, retry_after_s=retry_after_s)
        assert (budget if sparse else num_slots * slot_bytes) + DiskIndex.max_bytes(num_slots) <= capacity_bytes
        self.directory, self.slot_bytes, self.variable = Path(directory), slot_bytes, variable
        self.direct_io = False
        self.remove_if_empty = remove_if_empty
        self._index = DiskIndex(self.directory, block_bytes, slot_bytes, num_slots, variable=variable)
        self._sums = [0] * num_slots  # checksum of committed slots (written before commit, read after)
        self._lens = [block_bytes] * num_slots  # bytes of each committed block (variable: its frame's)
        self._book = ExtentBook(budget) if sparse else None  # None: one slot per block bounds the disk
        self._prior: dict[int, int] = {}  # slot -> its bytes on disk before a put in flight (tail to punch)
        self._fd = self._lock_fd = -1
        self._tls = threading.local()
        self._pad = bytes(slot_bytes - block_bytes)
        try:
            self._open(direct_io)
        except OSError as exc:
            self._health.retry_after_s = None  # never opened: there is nothing to probe
            self._health.fail(f"cannot open {self.directory}: {exc}")

    @classmethod
    async def open(cls, *args: Any, **kwargs: Any) -> DiskStore:
        return await asyncio.to_thread(cls, *args, **kwargs)

    def _open(self, want_direct: bool) -> None:
        # Private: the blocks are other users' prompts (0600 files in a 0700 directory, also when an
        # older version left them readable).
        private_dir(self.directory.parent)
        private_dir(self.directory)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(self._lock_fd, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EBUSY, "directory in use by another G3 store") from None
        if os.fstat(self._lock_fd).st_ino != os.stat(self.directory / "lock").st_ino:
            raise OSError(errno.EBUSY, "directory being removed by an empty G3 store closing")
        entries, matched = self._index.open()
        path, size = self.directory / "blocks.dat", self.num_slots * self.slot_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            length = os.fstat(fd).st_size
            if not matched or length > size:
                entries, length = {}, 0
                os.ftruncate(fd, 0)
            # A slot the file does not cover cannot hold its block (the file was cut short behind our back).
            entries = {s: e for s, e in entries.items() if s * self.slot_bytes + pages(e.nbytes) <= length}
            self._index.log_free([s for s in self._index.entries if s not in entries])
            self._index.sync()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if want_direct:
            self._try_direct(path)
        self._slots.restore([(e.seq_hash, s) for s, e in sorted(entries.items(), key=lambda kv: kv[1].gen)])
        for s, e in entries.items():
            self._sums[s], self._lens[s] = e.checksum, e.nbytes
        if self._book is not None:
            self._restore_book(entries, length)
        log.info("G3 %s: %d slots of %d B, %d blocks found, %s", self.directory, self.num_slots,
                 self.block_bytes, len(entries), "O_DIRECT" if self.direct_io else "buffered + fdatasync")

    def _try_direct(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            log.info("G3: O_DIRECT not available here (%s); buffered I/O + fdatasync", exc)
            return
        try:
            os.preadv(fd, [aligned_empty(ALIGN).numpy().data], 0)  # EINVAL where unsupported
        except OSError as exc:
            os.close(fd)
            log.info("G3: O_DIRECT not supported by this filesystem (%s); buffered I/O + fdatasync", exc)
            return
        os.close(self._fd)
        self._fd, self.direct_io = fd, hasattr(os, "O_DIRECT")

    def _restore_book(self, entries: dict[int, Entry], length: int) -> None:
        """Charge the blocks found; if the file holds more than they take (a crash between a drop and
        its punch), punch every page no block owns."""
        book = self._book
        assert book is not None
        for s, e in entries.items():
            book.alloc[s] = pages(e.nbytes)
        book.held = sum(book.alloc.values())
        if os.fstat(self._fd).st_blocks * 512 <= book.held + max(1 << 20, book.budget // 64):
            return
        sb = self.slot_bytes
        for s in range(-(-length // sb)):
            punch_hole(self._fd, s * sb + book.alloc.get(s, 0), sb - book.alloc.get(s, 0))

    def _footprint(self) -> int:
        """What the files take now: the data file as far as it has grown (a sparse one: its allocated
        pages), plus the index."""
        if self._fd < 0:
            return 0
        st = os.fstat(self._fd)
        return (st.st_blocks * 512 if self._book is not None else st.st_size) + self._index.file_bytes()

    # -- variable-size blocks (module doc) ------------------------------------------------------------
    def _check(self, hashes: Sequence[int], srcs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.variable:
            return super()._check(hashes, srcs)
        if len(hashes) != len(srcs):
            raise ValueError(f"{len(hashes)} hashes but {len(srcs)} tensors")
        u8s = [as_u8(t, t.numel() * t.element_size()) for t in srcs]
        if any(not 0 < u.numel() <= self.block_bytes for u in u8s):
            raise ValueError(f"G3 blocks hold 1..{self.block_bytes} bytes")
        return u8s

    def _admit(self, h: int, slot: int, src: torch.Tensor) -> tuple[list[int], bool]:
        book = self._book
        if book is None:
            return [], True
        need, before = pages(src.numel()), book.alloc.get(slot, 0)
        extra = max(0, need - before)
        evicted: list[int] = []
        # Room: leftovers of dropped blocks first, then idle blocks in eviction order; their punches run
        # before any write (disk_extents.py).
        for spare in list(book.dirty):
            if extra <= book.room():
                break
            if self._slots.take_free(spare):
                book.queue_reclaim(spare)
        while extra > book.room():
            got = self._slots.evict(h)
            if got is None:
                if before:
                    book.dirty.add(slot)  # the slot goes back with the old bytes it holds
                return evicted, False
            evicted.append(got[0])
            self._index.log_free([got[1]])  # no PUT will supersede its record: a restart must not count it
            book.queue_reclaim(got[1])
        self._prior[slot] = book.grow(slot, need)
        return evicted, True

    def _settled(self, batch: list[tuple[int, int, int, torch.Tensor]], ok: bool) -> None:
        book = self._book
        if book is None:
            return
        for _, _, slot, src in batch:
            self._prior.pop(slot, None)
            if ok:
                book.settle(slot, pages(src.numel()))
            else:
                book.dirty.add(slot)  # partly written, perhaps: punched when room is needed
        for slot in book.credit():
            self._slots.unpin(slot)

    def _stored_bytes(self, slot: int) -> int:
        return self._lens[slot]

    def _used_bytes(self) -> int:
        return sum(self._lens[s] for s in self._slots.map.values())

    def _write_var(self, items: list[Item]) -> None:
        """Each frame into the first pages of its slot, zero-padded to a page; the slot's old pages past
        them punched first, and before anything every slot reclaimed for room (the bound)."""
        sb, stage = self.slot_bytes, self._stage()
        if self._book is not None:
            self._book.drain(self._fd, sb)
        for k, (_, slot, src) in enumerate(items):
            n = src.numel()
            p = pages(n)
            before = self._prior.get(slot, 0)
            if self._book is not None and before > p:
                punch_hole(self._fd, slot * sb + p, before - p)
            region = stage[k * sb:k * sb + p]
            region[:n].copy_(src)
            region[n:].zero_()
            self._sums[slot], self._lens[slot] = xxhash.xxh3_64_intdigest(region[:n].numpy().data), n
            _io_all(os.pwritev, self._fd, [region.numpy().data], slot * sb)

    def _read_var(self, items: list[Item]) -> list[bool]:
        sb, stage, oks = self.slot_bytes, self._stage(), []
        for k, (_, slot, dst) in enumerate(items):
            n = self._lens[slot]
            region = stage[k * sb:k * sb + pages(n)]
            _io_all(os.preadv, self._fd, [region.numpy().data], slot * sb)
            ok = xxhash.xxh3_64_intdigest(region[:n].numpy().data) == self._sums[slot]
            if ok:
                dst[:n].copy_(region[:n])  # only verified bytes reach the caller
            oks.append(ok)
        return oks

    async def close(self) -> None:
        await super().close()
        await asyncio.to_thread(self._close_files)

    def _close_files(self) -> None:
        try:
            self._index.close()  # compacted: the next open replays one record per block
        except OSError as exc:
            log.warning("G3 %s: index not saved on close: %s", self.directory, exc)
        empty = self._fd >= 0 and not self._index.entries
        if empty and self.remove_if_empty:
            self._remove_files()  # under the lock: no other store opens this directory meanwhile
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1

    def _remove_files(self) -> None:
        for name in ("blocks.dat", "index.log", "lock"):
            (self.directory / name).unlink(missing_ok=True)
        for d in (self.directory, self.directory.parent):  # the slot, then its fingerprint directory
            try:
                d.rmdir()
            except OSError:  # not empty (other slots, other files): kept
                return
        log.info("G3 %s: held no block; removed", self.directory)

    # -- bytes (I/O threads) --------------------------------------------------------------------------
    def _stage(self) -> torch.Tensor:
        stage = getattr(self._tls, "stage", None)
        if stage is None:
            stage = self._tls.stage = aligned_empty(self.chunk_blocks * self.slot_bytes)
        return stage

    def _in_place(self, t: torch.Tensor) -> memoryview | None:
        """The caller's tensor as a buffer we may hand to the kernel directly, if the I/O mode allows."""
        if t.device.type != "cpu":
            return None
        if self.direct_io and (t.data_ptr() % ALIGN or self.block_bytes % ALIGN):
            return None
        return t.numpy().data

    def _runs(self, idx: list[int], items: list[Item]) -> list[tuple[int, list[int]]]:
        """Item indices (items sorted by slot) cut into runs of neighbouring slots: one pwritev/preadv
        each, as (first slot, indices)."""
        runs: list[tuple[int, list[int]]] = []
        for k in idx:
            slot = items[k][1]
            if runs and slot == items[runs[-1][1][-1]][1] + 1 and 2 * len(runs[-1][1]) < _IOV_MAX:
                runs[-1][1].append(k)
            else:
                runs.append((slot, [k]))
        return runs

    def _stage_in(self, items: list[Item], inbound: bool) -> list[tuple[memoryview, torch.Tensor | None]]:
        """Per item: the buffer the kernel reads/writes (the caller's bytes in place, or a staging slot),
        and the staging region when staged. Outbound (write), staged bytes are copied in here."""
        stage, used, bb, sb = self._stage(), 0, self.block_bytes, self.slot_bytes
        out: list[tuple[memoryview, torch.Tensor | None]] = []
        for group, flat in coalesce(items, bb):
            if self._in_place(group[0][2]) is not None:  # one storage, one alignment for the group
                out += [(t.numpy().data, None) for _, _, t in group]
                continue
            regions = [stage[used + j * sb:used + (j + 1) * sb] for j in range(len(group))]
            if not inbound:
                if sb == bb:
                    stage[used:used + len(group) * sb].copy_(flat)
                else:
                    for region, (_, _, t) in zip(regions, group, strict=True):
                        region[:bb].copy_(t)
            used += len(group) * sb
            out += [(r.numpy().data, r) for r in regions]
        return out

    def _iovecs(self, bufs: list[memoryview], pad: memoryview) -> list[memoryview]:
        """One run's iovecs: staged buffers are whole slots; in-place ones are followed by the padding."""
        return [v for b in bufs for v in ([b] if len(b) == self.slot_bytes or not pad else [b, pad])]

    def _write(self, items: list[Item]) -> None:
        if self.variable:
            return self._write_var(items)
        bufs = self._stage_in(items, inbound=False)
        for (_, slot, _), (mv, _) in zip(items, bufs, strict=True):
            self._sums[slot] = xxhash.xxh3_64_intdigest(mv[:self.block_bytes])
        for first, run in self._runs(list(range(len(items))), items):
            iov = self._iovecs([bufs[k][0] for k in run], memoryview(self._pad))
            _io_all(os.pwritev, self._fd, iov, first * self.slot_bytes)

    def _write_durable(self, items: list[Item]) -> None:
        os.fdatasync(self._fd)  # bytes first, then the records naming them
        for h, slot, _ in items:
            self._index.log_put(slot, h, self._sums[slot], self._lens[slot])
        self._index.sync()

    def _read(self, items: list[Item]) -> list[bool]:
        if self.variable:
            return self._read_var(items)
        bufs = self._stage_in(items, inbound=True)
        scratch = memoryview(bytearray(len(self._pad)))  # padding lands here, never in the caller's bytes
        for first, run in self._runs(list(range(len(items))), items):
            iov = self._iovecs([bufs[k][0] for k in run], scratch)
            _io_all(os.preadv, self._fd, iov, first * self.slot_bytes)
        oks = []
        for (_, slot, dst), (mv, staged) in zip(items, bufs, strict=True):
            ok = xxhash.xxh3_64_intdigest(mv[:self.block_bytes]) == self._sums[slot]
            if ok and staged is not None:
                dst.copy_(staged[:self.block_bytes])  # only verified bytes reach the caller
            oks.append(ok)
        return oks

    def _forget(self, slots: list[int]) -> None:
        self._index.log_free(slots)  # buffered; durable with the next sync (a resurrected block is valid)
        if self._book is not None:
            self._book.dirty.update(slots)  # their pages stay until room is needed (then punched)


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A 4 KiB-aligned uint8 CPU tensor (pinned when CUDA is present). A G1 pool allocated this way
    (with block_bytes a multiple of 4 KiB) lets G3 do O_DIRECT I/O on it in place, without staging."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    off = -raw.data_ptr() % ALIGN
    return raw[off:off + nbytes]


def _io_all(op: Any, fd: int, bufs: list[memoryview], offset: int) -> None:
    """pwritev/preadv until every buffer is done (a short transfer resumes where it stopped)."""
    bufs = [b.cast("B") if b.format != "B" else b for b in bufs]
    while bufs:
        n = op(fd, bufs, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"short {op.__name__} at offset {offset}")
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if n:
            bufs[0] = bufs[0][n:]

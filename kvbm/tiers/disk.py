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
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
import xxhash

from kvrelay.runtime.paths import private_dir

from .base import RETRY_AFTER_S, EventCallback
from .disk_index import HEADER_BYTES, RECORD_BYTES, DiskIndex
from .slots import Item, SlotStore, coalesce

log = logging.getLogger("kvrelay.kvbm.tiers")
ALIGN = 4096
_IOV_MAX = max(2, min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024))


class DiskStore(SlotStore):
    tier = "G3"

    def __init__(self, directory: str | os.PathLike[str], block_bytes: int, capacity_bytes: int, *,
                 policy: str = "lru", direct_io: bool = True, on_event: EventCallback | None = None,
                 io_threads: int = 2, stage_bytes: int = 16 << 20, inline_bytes: int = 0,
                 remove_if_empty: bool = False, retry_after_s: float | None = RETRY_AFTER_S):
        """Opens (or creates) the store; I/O errors leave it disabled with a warning, never raise.
        `await DiskStore.open(...)` does the same on a thread."""
        slot_bytes = -(-max(1, block_bytes) // ALIGN) * ALIGN
        num_slots = max(0, capacity_bytes - 2 * HEADER_BYTES) // (slot_bytes + 3 * RECORD_BYTES)
        self.chunk_blocks = max(1, stage_bytes // slot_bytes)  # one chunk fills one staging buffer
        super().__init__(block_bytes, num_slots, capacity_bytes, policy=policy, on_event=on_event,
                         inline_bytes=inline_bytes, io_threads=io_threads, retry_after_s=retry_after_s)
        assert num_slots * slot_bytes + DiskIndex.max_bytes(num_slots) <= capacity_bytes
        self.directory, self.slot_bytes = Path(directory), slot_bytes
        self.direct_io = False
        self.remove_if_empty = remove_if_empty
        self._index = DiskIndex(self.directory, block_bytes, slot_bytes, num_slots)
        self._sums = [0] * num_slots  # checksum of committed slots (written before commit, read after)
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
            entries = {s: e for s, e in entries.items() if (s + 1) * self.slot_bytes <= length}
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
            self._sums[s] = e.checksum
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

    def _footprint(self) -> int:
        """What the files take now: the data file as far as it has grown, plus the index."""
        return (os.fstat(self._fd).st_size + self._index.file_bytes()) if self._fd >= 0 else 0

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
        bufs = self._stage_in(items, inbound=False)
        for (_, slot, _), (mv, _) in zip(items, bufs, strict=True):
            self._sums[slot] = xxhash.xxh3_64_intdigest(mv[:self.block_bytes])
        for first, run in self._runs(list(range(len(items))), items):
            iov = self._iovecs([bufs[k][0] for k in run], memoryview(self._pad))
            _io_all(os.pwritev, self._fd, iov, first * self.slot_bytes)

    def _write_durable(self, items: list[Item]) -> None:
        os.fdatasync(self._fd)  # bytes first, then the records naming them
        for h, slot, _ in items:
            self._index.log_put(slot, h, self._sums[slot])
        self._index.sync()

    def _read(self, items: list[Item]) -> list[bool]:
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

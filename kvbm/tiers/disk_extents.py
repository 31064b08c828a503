"""G3's variable-size blocks: what each slot of a sparse data file holds, charged against a byte budget.

A codec's frames (kvbm/codecs) vary in length, so a fixed slot per block would save no disk (lossless
frames are ~0.86 of the raw block). A variable-size DiskStore keeps the slot layout (slot k at offset
k * slot_bytes, slot_bytes = the largest frame, page-rounded) but writes only the pages a frame takes
and punches out (fallocate PUNCH_HOLE) the pages it no longer needs, so the data file is sparse and the
disk it takes is the sum of the frames' pages. There are more slots than the budget could hold at full
size (`MAX_RATIO` times as many): slot numbers are cheap, the pages are what is bounded.

`ExtentBook` is the accounting, on the event loop: `alloc[slot]` = bytes the slot may hold on disk now
(a page-rounded frame, or leftovers of dropped blocks not yet punched), `held` = their sum plus what
puts in flight will add, `reclaiming` = the part of it in slots queued to be punched. A block is
admitted only if `held - reclaiming + need <= budget`. That is safe although the punches have not
happened yet: every write first punches every slot queued so far (`drain`, under a lock), so no byte
is written before the room it was promised is given back, and the slots queued after a write began
were live when that write was admitted, i.e. counted against the budget then. Reclaimed slots are
pinned (SlotTable "doomed") while their punch is queued, so no put can be handed a slot that is about
to be punched. (Counting only a put's own reclaims would evict again for every block of a batch.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from pathlib import Path
from typing import Any

PAGE = 4096
MAX_RATIO = 8  # slots per full-size block the budget holds: compression past 8x saves no more room
_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def pages(nbytes: int) -> int:
    """Bytes a frame of nbytes takes on disk: whole pages (O_DIRECT writes whole pages)."""
    return -(-nbytes // PAGE) * PAGE


def _libc_fallocate() -> Any:  # a ctypes function: no useful static type
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate() if hasattr(os, "posix_fallocate") else None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the disk pages of [offset, offset + length) back; the file's size is unchanged, reads of
    the range return zeros. OSError when the filesystem cannot (the caller treats it as an I/O error)."""
    if length <= 0:
        return
    if _fallocate is None or _fallocate(fd, _PUNCH, offset, length) != 0:
        err = ctypes.get_errno() if _fallocate is not None else errno.EOPNOTSUPP
        raise OSError(err, f"punch hole at {offset}+{length}: {os.strerror(err)}")


def punch_supported(directory: Path) -> bool:
    """Whether files in `directory` (created if missing) can have holes punched: a probe file, removed."""
    probe = directory / ".punch-probe"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, bytes(2 * PAGE), 0)
            punch_hole(fd, 0, PAGE)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError:
        return False
    return True


class ExtentBook:
    """Bytes each slot holds on disk and the budget they are charged against (see the module doc)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.alloc: dict[int, int] = {}  # slot -> bytes it may hold on disk now (absent: 0)
        self.held = 0  # sum(alloc) (+ growth of puts in flight, inside alloc already)
        self.reclaiming = 0  # bytes of queued or punched slots not credited yet (inside held)
        self.dirty: set[int] = set()  # free or doomed slots with alloc > 0 (leftovers to punch)
        self._lock = threading.Lock()  # the punch queue is drained on I/O threads
        self._queued: list[int] = []  # reclaimed slots (pinned) whose whole range is to be punched
        self._punched: list[int] = []  # punched on an I/O thread, to be credited on the loop

    def grow(self, slot: int, nbytes: int) -> int:
        """A put will write `nbytes` (page-rounded) into `slot`: charge what it adds. Returns the slot's
        bytes before (its tail beyond the new frame is punched before the write)."""
        before = self.alloc.get(slot, 0)
        self.dirty.discard(slot)
        if nbytes > before:
            self.alloc[slot] = nbytes
            self.held += nbytes - before
        return before

    def settle(self, slot: int, nbytes: int) -> None:
        """The put into `slot` is done: it holds `nbytes` now (its old tail was punched)."""
        now = self.alloc.get(slot, 0)
        self.held -= now - nbytes
        self.alloc[slot] = nbytes

    def queue_reclaim(self, slot: int) -> int:
        """Punch the whole slot before the next write (the slot is pinned meanwhile): the bytes it frees."""
        self.dirty.discard(slot)
        with self._lock:
            self._queued.append(slot)
        freed = self.alloc.get(slot, 0)
        self.reclaiming += freed
        return freed

    def drain(self, fd: int, slot_bytes: int) -> None:
        """I/O thread, before any write: punch every queued slot. Holding the lock while punching makes a
        concurrent writer wait until the room it was promised is really free."""
        with self._lock:
            while self._queued:
                slot = self._queued[-1]
                punch_hole(fd, slot * slot_bytes, slot_bytes)
                self._punched.append(self._queued.pop())

    def credit(self) -> list[int]:
        """Loop: the slots punched since the last call, their bytes uncharged (the caller unpins them)."""
        with self._lock:
            done, self._punched = self._punched, []
        for slot in done:
            freed = self.alloc.pop(slot, 0)
            self.held -= freed
            self.reclaiming -= freed
        return done

    def room(self) -> int:
        """Bytes a new block may take now (see the module doc for why `reclaiming` counts as free)."""
        return self.budget - (self.held - self.reclaiming)

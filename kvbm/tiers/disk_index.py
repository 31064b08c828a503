"""G3's index: which slot holds which seq_hash and the checksum of its bytes, as an append-only log.

`index.log` = a header, then fixed 40-byte records, each guarded by its own xxh3:
    header  magic, version, flags, block_bytes, slot_bytes, num_slots, xxh3(header)
    record  op (PUT | FREE), slot, seq_hash, checksum (xxh3_64 of the block's bytes), gen, nbytes,
            xxh3(record)
`gen` increases with every PUT, so replaying the log in any order of slots rebuilds the LRU order.
`nbytes` is how many bytes of the slot the block takes: block_bytes in a fixed-size store, the encoded
frame's length in a variable-size one (flags = VARIABLE; disk.py "Variable-size blocks"), so a restart
knows each block's length (for its checksum and the capacity it is charged) without reading it.
Version 2 added nbytes and flags: a version-1 log is "another layout" and the store starts empty.

Crash safety (no wrong block, ever):
- A PUT record is appended only after its block's bytes are written and fdatasync'ed; an eviction
  writes no record: the new PUT for the slot supersedes the old one. Whatever a crash leaves, a slot's
  record names a hash and the checksum of the bytes that were meant to be there; the store verifies
  that checksum on every read, so a half-written or stale slot is a miss (and is freed).
- Replay stops at the first record whose own checksum fails (a torn tail). The log is then compacted:
  live entries into index.log.tmp, fsync, rename over index.log, fsync the directory. A crash at any
  point leaves the old log or the new one, both valid.
- A header whose geometry differs from the store's (block size, slots) means the log describes
  another layout: it is discarded and the store starts empty.

Bound: the log is compacted before it would pass 2 * num_slots records, so counting the compaction's
temporary copy it never takes more than `max_bytes(num_slots)` of disk.

Threads: `log_put`/`log_free` only buffer (cheap, under `_buf_lock`, callable from the event loop);
`sync` writes and fsyncs (under `_file_lock`, called from I/O threads). Records reach the file in
the order they were logged.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path
from typing import NamedTuple

import xxhash

log = logging.getLogger("kvrelay.kvbm.tiers")
_MAGIC, _VERSION = b"KVRG3IDX", 2
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, flags, block_bytes, slot_bytes, num_slots
_RECORD = struct.Struct("<IIQQQQ")  # op, slot, seq_hash, checksum, gen, nbytes
_CRC = struct.Struct("<Q")
HEADER_BYTES, RECORD_BYTES = _HEADER.size + _CRC.size, _RECORD.size + _CRC.size
PUT, FREE = 1, 2
VARIABLE = 1  # header flag: blocks are 1..block_bytes long (a codec's frames), not all block_bytes


class Entry(NamedTuple):
    seq_hash: int
    checksum: int
    gen: int
    nbytes: int


def _seal(body: bytes) -> bytes:
    return body + _CRC.pack(xxhash.xxh3_64_intdigest(body))


class DiskIndex:
    def __init__(self, directory: Path, block_bytes: int, slot_bytes: int, num_slots: int, *,
                 variable: bool = False):
        self.path, self._tmp = directory / "index.log", directory / "index.log.tmp"
        self.num_slots, self.block_bytes = num_slots, block_bytes
        flags = VARIABLE if variable else 0
        self._header = _seal(_HEADER.pack(_MAGIC, _VERSION, flags, block_bytes, slot_bytes, num_slots))
        self._buf_lock, self._file_lock = threading.Lock(), threading.Lock()
        self.entries: dict[int, Entry] = {}  # slot -> entry: the state the file plus _pending describe
        self._pending: list[bytes] = []
        self._records = 0  # records in the file
        self._gen = 0
        self._fd = -1

    @staticmethod
    def max_bytes(num_slots: int) -> int:
        """Disk the index may take at any instant: the log (<= 2N records) plus a compaction copy (<= N)."""
        return 2 * HEADER_BYTES + 3 * num_slots * RECORD_BYTES

    def file_bytes(self) -> int:
        return HEADER_BYTES + self._records * RECORD_BYTES if self._fd >= 0 else 0

    def open(self) -> tuple[dict[int, Entry], bool]:
        """Replay and compact the log. Returns (slot -> entry, whether an existing log matched)."""
        self._tmp.unlink(missing_ok=True)  # a compaction interrupted by a crash
        data = self.path.read_bytes() if self.path.exists() else b""
        matched = data[:HEADER_BYTES] == self._header
        entries: dict[int, Entry] = {}
        off, torn = HEADER_BYTES, False
        while matched and off + RECORD_BYTES <= len(data):
            rec = data[off:off + RECORD_BYTES]
            if _CRC.unpack_from(rec, _RECORD.size)[0] != xxhash.xxh3_64_intdigest(rec[:_RECORD.size]):
                torn = True  # torn tail: nothing after it was acknowledged
                break
            op, slot, h, csum, gen, nbytes = _RECORD.unpack_from(rec)
            if slot >= self.num_slots or (op == PUT and not 0 < nbytes <= self.block_bytes):
                torn = True
                break
            off += RECORD_BYTES
            if op == PUT:
                entries[slot] = Entry(h, csum, gen, nbytes)
            else:
                entries.pop(slot, None)
        newest: dict[int, int] = {}  # a hash lives in one slot: the one written last wins
        for slot, e in sorted(entries.items(), key=lambda kv: kv[1].gen):
            if e.seq_hash in newest:
                del entries[newest[e.seq_hash]]
            newest[e.seq_hash] = slot
        self.entries = entries
        self._gen = max((e.gen for e in entries.values()), default=0)
        total = max(0, len(data) - HEADER_BYTES) // RECORD_BYTES
        if data and not matched:
            log.warning("G3 index %s: written for another layout (block or slot size); starting empty", self.path)
        elif torn or (matched and off != len(data)):
            log.warning("G3 index %s: torn at record %d of %d (a crash mid-write?); recovered %d blocks, "
                        "the rest of the log is dropped", self.path, (off - HEADER_BYTES) // RECORD_BYTES, total,
                        len(entries))
        self._compact(dict(entries))
        return dict(entries), matched

    def log_put(self, slot: int, seq_hash: int, checksum: int, nbytes: int) -> None:
        with self._buf_lock:
            self._gen += 1
            self.entries[slot] = Entry(seq_hash, checksum, self._gen, nbytes)
            self._pending.append(_seal(_RECORD.pack(PUT, slot, seq_hash, checksum, self._gen, nbytes)))

    def log_free(self, slots: list[int]) -> None:
        with self._buf_lock:
            for slot in slots:
                if self.entries.pop(slot, None) is not None:
                    self._pending.append(_seal(_RECORD.pack(FREE, slot, 0, 0, 0, 0)))

    def sync(self) -> None:
        """Make every logged record durable (compacting first if the log would pass its bound)."""
        with self._file_lock:
            with self._buf_lock:
                pending, self._pending = self._pending, []
                snapshot = dict(self.entries) if self._records + len(pending) > 2 * self.num_slots else None
            if snapshot is not None:
                self._compact(snapshot)
            elif pending:
                _write_all(self._fd, b"".join(pending))
                os.fdatasync(self._fd)
                self._records += len(pending)

    def close(self) -> None:
        with self._file_lock:
            with self._buf_lock:
                snapshot, self._pending = dict(self.entries), []
            if self._fd >= 0:
                self._compact(snapshot)
                os.close(self._fd)
                self._fd = -1

    def _compact(self, entries: dict[int, Entry]) -> None:
        body = b"".join(_seal(_RECORD.pack(PUT, s, e.seq_hash, e.checksum, e.gen, e.nbytes))
                        for s, e in sorted(entries.items(), key=lambda kv: kv[1].gen))
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # prompt-derived: owner only
        try:
            _write_all(fd, self._header + body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._records = len(entries)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

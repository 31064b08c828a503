"""File discovery (embedded default): processes on one machine share a directory.

Each key is a file `<directory>/<key>` holding the value. Invariants:
- Writes are atomic (temp file in the same directory + `os.replace`), so a reader sees the old or the
  new value, never a torn one. Temp files start with `_TMP_PREFIX` and are never reported as keys.
- The lease is the file's mtime: a heartbeat touches every file this client registered every ttl/3.
  An entry older than `ttl` belongs to a dead (or paused) owner: `list`/`watch` ignore it and delete it,
  best effort. A paused owner's heartbeat re-creates entries that were deleted meanwhile.
- `watch` polls and diffs. Replacement is detected by (inode, size, value), never by mtime, which every
  heartbeat changes.
- Other processes change the directory at any time: a file vanishing between listing and reading is
  skipped, never an error.
File operations are synchronous: entries are a few hundred bytes on a local disk, and doing them inline
keeps `_mine` free of thread races.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from kvrelay.runtime.discovery.base import WatchEvent, check_key
from kvrelay.runtime.paths import private_dir

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_Entry = tuple[int, int, bytes]  # (st_ino, st_size, value)


class FileDiscovery:
    def __init__(self, directory: str, ttl: float, poll_interval: float | None = None):
        self._root = Path(directory)
        self._ttl = ttl
        self._poll = poll_interval if poll_interval is not None else min(ttl / 4, 0.25)
        self._mine: dict[str, bytes] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("FileDiscovery is closed")
        if self._heartbeat is None:
            private_dir(self._root)  # records name workers' addresses: owner only (files are mkstemp's 0600)
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="file-discovery-heartbeat")

    async def register(self, key: str, value: bytes) -> None:
        check_key(key)
        if key.rpartition("/")[2].startswith(_TMP_PREFIX):
            raise ValueError(f"invalid discovery key {key!r}: {_TMP_PREFIX!r} names are reserved")
        await self.start()
        self._write(key, value)
        self._mine[key] = value

    async def deregister(self, key: str) -> None:
        if self._mine.pop(key, None) is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._root / key)

    async def list(self, prefix: str) -> dict[str, bytes]:
        return {key: value for key, (_, _, value) in self._scan(prefix).items()}

    async def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        reported: dict[str, _Entry] = {}
        while True:
            current = self._scan(prefix)
            for key in sorted(reported.keys() - current.keys()):
                del reported[key]
                yield WatchEvent("removed", key)
            for key, entry in sorted(current.items()):
                if reported.get(key) != entry:
                    reported[key] = entry
                    yield WatchEvent("added", key, entry[2])
            await asyncio.sleep(self._poll)

    async def close(self) -> None:
        """Stop the heartbeat and delete our entries; watchers see them `removed` on their next poll."""
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        for key in list(self._mine):
            await self.deregister(key)

    # -- internals ----------------------------------------------------------------------------------

    def _write(self, key: str, value: bytes) -> None:
        path = self._root / key
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(value)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
            # "a/b" and "a/b/c" cannot both be files; the instance key layout never needs both.
            raise ValueError(f"discovery key {key!r} collides with another key's path") from e

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            for key, value in list(self._mine.items()):
                try:
                    os.utime(self._root / key)
                except FileNotFoundError:
                    log.warning("discovery entry %s vanished (expired while paused?); re-creating it", key)
                    try:
                        self._write(key, value)
                    except (OSError, ValueError) as e:
                        log.warning("cannot re-create discovery entry %s: %s", key, e)
                except OSError as e:
                    log.warning("heartbeat of discovery entry %s failed: %s", key, e)

    def _scan(self, prefix: str) -> dict[str, _Entry]:
        """Every live entry whose key starts with `prefix`; deletes stale entries found on the way."""
        base = prefix.rpartition("/")[0]
        if base and any(p in ("", ".", "..") for p in base.split("/")):
            return {}  # no valid key has such a prefix; also keeps the walk inside the root
        now = time.time()
        found: dict[str, _Entry] = {}
        for dirpath, dirnames, filenames in os.walk(self._root / base):
            rel = Path(dirpath).relative_to(self._root).as_posix()
            rel = "" if rel == "." else rel + "/"
            # Only descend where keys could still match the prefix.
            dirnames[:] = [d for d in dirnames if _may_match(f"{rel}{d}/", prefix)]
            for name in filenames:
                key = rel + name
                if name.startswith(_TMP_PREFIX) or not key.startswith(prefix):
                    continue
                entry = self._read(key, now)
                if entry is not None:
                    found[key] = entry
        return found

    def _read(self, key: str, now: float) -> _Entry | None:
        path = self._root / key
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                value = f.read()
        except FileNotFoundError:
            return None  # deleted between listing and reading
        except OSError as e:
            log.debug("skipping unreadable discovery entry %s: %s", path, e)
            return None
        if now - st.st_mtime > self._ttl:
            if key not in self._mine:
                self._remove_stale(path, st.st_ino)
                return None
            # Our own entry looks stale only because this loop was blocked; we are alive, so refresh it.
            with contextlib.suppress(OSError):
                os.utime(path)
        return st.st_ino, st.st_size, value

    def _remove_stale(self, path: Path, ino: int) -> None:
        """Delete a stale entry unless it was replaced or touched since we looked (narrows the race
        with its owner; a live owner's heartbeat re-creates an entry deleted anyway)."""
        try:
            st = os.stat(path)
            if st.st_ino == ino and time.time() - st.st_mtime > self._ttl:
                os.unlink(path)
                log.info("removed stale discovery entry %s", path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cannot remove stale discovery entry %s: %s", path, e)


def _may_match(dir_prefix: str, prefix: str) -> bool:
    """Can a key under the directory `dir_prefix` ('a/b/') start with `prefix`?"""
    return dir_prefix.startswith(prefix) or prefix.startswith(dir_prefix)

"""etcd discovery: keys live under one lease per client, kept alive in the background.

Invariants (on top of base.py):
- The keep-alive task never dies while the client is open: every failure is logged and retried with
  backoff (0.1 s doubling to 1 s). When etcd reports the lease gone (TTL <= 0, e.g. this process was
  paused past the TTL), a new lease is granted and every remembered key is put again.
- `self._mine` is the source of truth for what this client wants registered; etcd is made to match it
  whenever a write failed (`_unsynced`) or the lease was replaced.
- User calls that need etcd (`register`, `deregister`, `list`) raise `DiscoveryUnavailable` when it
  cannot be reached within the per-call timeout; a failed register/deregister is still applied once
  etcd is back. `watch` never raises for a lost connection: it re-lists, emits the difference, and
  resumes from the new revision.
- etcd restores leases with a fresh TTL when it restarts, so a short outage keeps our keys; a long
  pause of this process loses them and the keep-alive puts them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

import aetcd
from aetcd.rtypes import Event, EventKind
from aetcd.utils import prefix_range_end

from kvrelay.runtime.discovery.base import WatchEvent, check_key

log = logging.getLogger(__name__)

_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 1.0
# gRPC's own reconnect backoff grows to 120 s by default; cap it so recovery after an outage is fast.
# A hung server (or a dead peer behind a live TCP connection) leaves a watch stream silent for as long as
# it lasts; keepalive pings every 10 s (etcd's default --grpc-keepalive-min-time is 5 s) break it. The
# ping deadline is http2.ping_timeout_ms: gRPC 1.85 did not apply keepalive_timeout_ms (measured with a
# SIGSTOPped etcd: the pending ping had a 60 s timer; with this option the watch re-lists after ~15 s).
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,
}


class DiscoveryUnavailable(RuntimeError):
    """etcd could not be reached for a user call. Background keep-alive and watches keep retrying."""


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """'host:port[,host:port...]' (an 'http://' prefix is tolerated) -> [(host, port)]."""
    out: list[tuple[str, int]] = []
    for item in endpoints.split(","):
        item = item.strip().removeprefix("http://").rstrip("/")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"invalid etcd endpoint {item!r}: expected host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError(f"no etcd endpoint in {endpoints!r}")
    return out


def _key_range(prefix: str) -> tuple[bytes, bytes]:
    """[start, end) covering every key that starts with `prefix` ('' means every key)."""
    if not prefix:
        return b"\0", b"\0"
    start = prefix.encode()
    return start, prefix_range_end(start)


class EtcdDiscovery:
    def __init__(self, endpoints: str, ttl: float, *, call_timeout: float | None = None,
                 connect_timeout: float = 10.0):
        self._endpoints = parse_endpoints(endpoints)
        self._ttl = ttl
        self._lease_ttl = max(1, math.ceil(ttl))  # etcd leases are whole seconds
        # Short enough that a hung call cannot outlive the lease by much, long enough for a busy server.
        self._call_timeout = call_timeout if call_timeout is not None else min(5.0, max(1.0, ttl / 2))
        self._connect_timeout = connect_timeout
        self._endpoint_index = 0
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None
        self._mine: dict[str, bytes] = {}
        self._pending_deletes: set[str] = set()
        self._unsynced = False
        self._lock = asyncio.Lock()  # orders lease changes and writes
        self._keepalive: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- connection ---------------------------------------------------------------------------------

    def _new_client(self, index: int) -> aetcd.Client:
        host, port = self._endpoints[index % len(self._endpoints)]
        return aetcd.Client(host, port, timeout=self._call_timeout, options=dict(_CHANNEL_OPTIONS))

    def _current(self) -> aetcd.Client:
        if self._closed:
            raise RuntimeError("EtcdDiscovery is closed")
        if self._client is None:
            self._client = self._new_client(self._endpoint_index)
        return self._client

    def _rotate(self) -> None:
        """Move to the next endpoint. The old client is closed later so in-flight calls end cleanly
        (closing a gRPC channel under a pending call surfaces as CancelledError in the caller)."""
        if len(self._endpoints) == 1 or self._client is None:
            return  # gRPC reconnects a single endpoint by itself
        old, self._client = self._client, None
        self._endpoint_index += 1
        task = asyncio.create_task(self._close_later(old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_later(self, client: aetcd.Client) -> None:
        await asyncio.sleep(self._call_timeout + 1.0)
        await _close_quietly(client)

    async def start(self) -> None:
        async with self._lock:
            if self._closed:
                raise RuntimeError("EtcdDiscovery is closed")
            if self._keepalive is not None:
                return
            deadline = time.monotonic() + self._connect_timeout
            backoff = _BACKOFF_MIN
            while True:
                try:
                    self._lease_id = (await self._current().lease(self._lease_ttl)).id
                    break
                except Exception as e:
                    if time.monotonic() + backoff > deadline:
                        raise DiscoveryUnavailable(f"etcd at {self._endpoints} unreachable: {e}") from e
                    self._rotate()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
            self._keepalive = asyncio.create_task(self._keepalive_loop(), name="etcd-keepalive")

    # -- keep-alive ---------------------------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        backoff = _BACKOFF_MIN
        down_since: float | None = None
        while True:
            try:
                await self._refresh()
            except Exception as e:  # CancelledError is not an Exception: close() still stops us
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.warning("etcd keep-alive failed (%s: %s); retrying", type(e).__name__, e)
                else:
                    log.debug("etcd keep-alive still failing: %r", e)
                    if now - down_since > self._ttl:
                        self._rotate()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if down_since is not None:
                log.warning("etcd reachable again after %.1f s; lease %x", time.monotonic() - down_since,
                            self._lease_id or 0)
                down_since = None
            backoff = _BACKOFF_MIN
            await asyncio.sleep(self._ttl / 3)

    async def _refresh(self) -> None:
        async with self._lock:
            client = self._current()
            reply = await client.refresh_lease(self._lease_id) if self._lease_id is not None else None
            if reply is None or reply.TTL <= 0:
                await self._renew_lease(client)
            elif self._unsynced:
                await self._sync(client)

    async def _renew_lease(self, client: aetcd.Client) -> None:
        """The old lease expired (and took our keys with it): grant a new one and put them back."""
        log.warning("etcd lease %x is gone; re-registering %d keys", self._lease_id or 0, len(self._mine))
        self._lease_id = (await client.lease(self._lease_ttl)).id
        self._unsynced = True  # stays set if the re-puts below fail, so the keep-alive retries them
        await self._sync(client)

    async def _sync(self, client: aetcd.Client) -> None:
        """Make etcd match `_mine` (lock held)."""
        for key, value in list(self._mine.items()):
            await client.put(key.encode(), value, lease=self._lease_id)
        for key in list(self._pending_deletes):
            await client.delete(key.encode())
            self._pending_deletes.discard(key)
        self._unsynced = False

    # -- user calls ---------------------------------------------------------------------------------

    async def register(self, key: str, value: bytes) -> None:
        check_key(key)
        await self.start()
        async with self._lock:
            self._mine[key] = value
            self._pending_deletes.discard(key)
            client = self._current()
            try:
                try:
                    await client.put(key.encode(), value, lease=self._lease_id)
                except aetcd.exceptions.ClientError as e:
                    if "lease not found" not in str(e):
                        raise
                    await self._renew_lease(client)  # paused past the TTL; keep-alive has not noticed yet
            except Exception as e:
                self._unsynced = True
                raise DiscoveryUnavailable(f"register {key!r}: {e} (applied once etcd is back)") from e

    async def deregister(self, key: str) -> None:
        async with self._lock:
            if self._mine.pop(key, None) is None:
                return
            try:
                await self._current().delete(key.encode())
            except Exception as e:
                self._pending_deletes.add(key)
                self._unsynced = True
                raise DiscoveryUnavailable(f"deregister {key!r}: {e} (applied once etcd is back)") from e

    async def list(self, prefix: str) -> dict[str, bytes]:
        try:
            found = await self._current().get_range(*_key_range(prefix))
        except Exception as e:
            raise DiscoveryUnavailable(f"list {prefix!r}: {e}") from e
        return {kv.key.decode(): kv.value for kv in found}

    async def watch(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Each watch has its own connection, so re-connecting it never disturbs other calls."""
        start, end = _key_range(prefix)
        reported: dict[str, bytes] = {}
        attempt, backoff = 0, _BACKOFF_MIN
        down_since: float | None = None
        while True:
            client = self._new_client(self._endpoint_index + attempt)
            try:
                try:
                    snapshot = await client.get_range(start, end)
                    stream = await client.watch(start, range_end=end,
                                                start_revision=snapshot.header.revision + 1)
                except Exception as e:
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning("etcd watch on %r cannot connect (%s); retrying", prefix, e)
                    attempt += 1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                if down_since is not None:
                    log.warning("etcd watch on %r resumed after %.1f s", prefix, time.monotonic() - down_since)
                down_since, backoff = None, _BACKOFF_MIN
                # Events after the snapshot are queued by the stream already, so nothing is missed.
                current = {kv.key.decode(): kv.value for kv in snapshot}
                for ev in _diff(reported, current):
                    yield ev
                try:
                    async for raw in stream:
                        applied = _apply(reported, raw)
                        if applied is not None:
                            yield applied
                    reason = "stream closed"
                except Exception as e:
                    reason = f"{type(e).__name__}: {e}"
                down_since = time.monotonic()
                log.warning("etcd watch on %r lost (%s); re-listing", prefix, reason)
            finally:
                await _close_quietly(client)

    async def close(self) -> None:
        """Revoke the lease (etcd deletes our keys at once) and stop every background task."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._keepalive, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lock:  # let an in-flight register/deregister finish on the channel first
            client, self._client = self._client, None
            if client is not None:
                if self._lease_id is not None:
                    try:
                        await asyncio.wait_for(client.revoke_lease(self._lease_id), self._call_timeout)
                    except Exception as e:  # best effort: the lease expires by itself after the TTL
                        log.warning("etcd lease %x not revoked (%s); it expires in %d s",
                                    self._lease_id, e, self._lease_ttl)
                await _close_quietly(client)
            self._mine.clear()
            self._lease_id = None


def _diff(reported: dict[str, bytes], current: dict[str, bytes]) -> list[WatchEvent]:
    """Events turning `reported` into `current`; updates `reported` in place."""
    events = [WatchEvent("removed", k) for k in sorted(reported.keys() - current.keys())]
    events += [WatchEvent("added", k, v) for k, v in sorted(current.items()) if reported.get(k) != v]
    for ev in events:
        if ev.kind == "removed":
            del reported[ev.key]
        else:
            reported[ev.key] = ev.value
    return events


def _apply(reported: dict[str, bytes], raw: Event) -> WatchEvent | None:
    """Translate one etcd event; drop puts that repeat the reported value (a lease restore re-puts
    every key) and deletes of keys never reported, keeping the added/removed pairing of base.py."""
    key, value = raw.kv.key.decode(), raw.kv.value
    if raw.kind == EventKind.PUT:
        if reported.get(key) == value:
            return None
        reported[key] = value
        return WatchEvent("added", key, value)
    if reported.pop(key, None) is None:
        return None
    return WatchEvent("removed", key)


async def _close_quietly(client: aetcd.Client) -> None:
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except Exception as e:
        log.debug("closing etcd client: %r", e)

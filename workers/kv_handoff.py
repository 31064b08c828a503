"""The worker side of the prefill -> decode KV handoff (docs/ARCHITECTURE.md "Disaggregation").

Lending (the cluster KV pool): `lend_blocks` pins blocks a peer asked for under the same leases.
Prefill role: `PrefillLeases` pins each handle's blocks until the decode worker says it is done (the
`RELEASE` notification that rides on the transfer, or the `release` endpoint) or the lease runs out.
Decode role: a `KvPuller` copies a handle's blocks into blocks the engine allocated: `TransferPuller`
over the worker's transfer engine (NIXL, or the TCP fallback), `SimulatedPuller` for the mocker.

Trust (transfer/README.md "Trust"): a handle's transfer metadata reaches a decode worker only through
token-authenticated RPC (it is not in discovery), and the `RELEASE` notification carries an HMAC of the
request id under the internal token: a release from an agent that does not hold the token is refused
(counted, logged), so nobody can free another request's blocks by notification.

Invariants:
- Every handle is freed exactly once on the prefill worker: pulled, released, or expired.
- A lease outlives any pull that can still be writing: the decode side gives a read at most half the
  lease (`pull_timeout`), counted from when it got the handle.
- A failed pull never fails the request: the decode engine recomputes the prompt instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, runtime_checkable

from kvrelay.runtime.log import Throttled
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.handle_release import HandleReleaser
from kvrelay.workers.api.messages import KvHandle, PeerLeaseRequest

log = logging.getLogger(__name__)

RELEASE = b"kvrelay.release:"  # + request id + b"|" + MAC: "the decode side is done with this handle's blocks"


def _mac(token: str, request_id: bytes) -> bytes:
    return hmac.new(token.encode(), RELEASE + request_id, hashlib.sha256).hexdigest()[:32].encode()


def release_note(request_id: str, token: str) -> bytes:
    """The notification that frees a handle's lease, proven with the internal token (no MAC without one)."""
    rid = request_id.encode()
    return RELEASE + rid + b"|" + (_mac(token, rid) if token else b"")


def parse_release(message: bytes, token: str) -> str | None:
    """The request id of a genuine release notification; None for anything else (or a forged MAC)."""
    if not message.startswith(RELEASE):
        return None
    rid, _, mac = message[len(RELEASE):].rpartition(b"|")
    if token and not hmac.compare_digest(mac, _mac(token, rid)):
        return None
    return rid.decode(errors="replace")


def pull_timeout(handle: KvHandle) -> float:
    return max(0.1, handle.lease_s / 2)


class PrefillLeases:
    """Held prefill handles: request id -> expiry timer. `free(request_id)` frees the engine's blocks."""

    def __init__(self, free: Callable[[str], Coroutine[Any, Any, None]], lease_s: float, token: str = ""):
        self._free, self.lease_s, self._token = free, lease_s, token
        self.refused = 0  # notifications that did not prove the internal token
        self._refusal_log = Throttled(log)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self.released = {"pulled": 0, "released": 0, "expired": 0, "cancelled": 0}
        self._given_back: dict[str, float] = {}  # peer lease id -> when its early `release` came (loop time)

    def __len__(self) -> int:
        return len(self._timers)

    def hold(self, request_id: str) -> bool:
        """Start the lease's timer. False if a peer's lease was given back before it was held (its
        `release` overtook the grant: the asker timed out or was cancelled): it is freed at once instead."""
        loop = asyncio.get_running_loop()
        if self._given_back.pop(request_id, None) is not None:
            self.released["released"] += 1
            self.free_now(request_id)
            return False
        self._timers[request_id] = loop.call_later(self.lease_s, self.release, request_id, "expired")
        return True

    def free_now(self, request_id: str) -> None:
        """Free blocks pinned under `request_id` that no timer holds (a grant nobody will take)."""
        task = asyncio.get_running_loop().create_task(self._free(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release(self, request_id: str, why: str) -> bool:
        """Free the handle's blocks now; False if it is not held (already freed, or never was). A peer's
        lease released before it is held is remembered for a lease's time, so its grant frees it."""
        timer = self._timers.pop(request_id, None)
        if timer is None:
            if why == "released" and request_id.startswith("peer:"):
                self._remember_given_back(request_id)
            return False
        timer.cancel()
        self.released[why] += 1
        if why == "expired":
            log.warning("KV handle %s was not pulled within %.1f s; freeing its blocks", request_id, self.lease_s)
        self.free_now(request_id)
        return True

    def _remember_given_back(self, lease_id: str) -> None:
        now = asyncio.get_running_loop().time()
        for rid, at in list(self._given_back.items()):  # oldest first: forget what no grant can follow now
            if now - at < self.lease_s:
                break
            del self._given_back[rid]
        self._given_back[lease_id] = now

    async def consume(self, transfer: Any) -> None:
        """Release handles as the decode side's notifications arrive (run as a task)."""
        while True:
            note = await transfer.wait_notification()
            request_id = parse_release(note.message, self._token)
            if request_id is not None:
                self.release(request_id, "pulled")
            else:
                self.refused += 1
                self._refusal_log.warning(note.sender, "refused a KV notification from agent %r without a valid "
                                          "internal-token proof (%d refused in all)", note.sender, self.refused)

    async def close(self) -> None:
        for rid in list(self._timers):
            self.release(rid, "released")
        await asyncio.gather(*self._tasks, return_exceptions=True)


class TransferPuller(HandleReleaser):
    """Pulls with the worker's transfer engine; the read's own notification frees the lease."""

    def __init__(self, transfer: Any, workers: WorkerClient, pool: str = "g1", token: str = ""):
        super().__init__(workers)
        self.transfer, self.pool, self._token = transfer, pool, token

    async def pull(self, handle: KvHandle, local_block_ids: list[int], start: int) -> bool:
        if local_block_ids:
            try:
                self.transfer.add_peer(handle.prefill_instance, handle.transfer_metadata)
                await self.transfer.read(handle.prefill_instance, handle.pool, handle.block_ids[start:], self.pool,
                                         local_block_ids, notify=release_note(handle.request_id, self._token),
                                         timeout=pull_timeout(handle))
                return True
            except asyncio.CancelledError:
                self.release(handle)
                raise
            except Exception as e:  # TransferError, ValueError (other transport kind, bad ids): recompute
                log.warning("request %s: pulling %d KV blocks from %s failed (%s); recomputing the prompt",
                            handle.request_id, len(local_block_ids), handle.prefill_instance, e)
                self.release(handle)
                return False
        self.release(handle)  # every block was already cached here: nothing to pull
        return True


@runtime_checkable
class SimulatesTransfer(Protocol):
    """An engine whose KV is not real memory (the mocker): a decode worker's link is simulated with it."""

    def simulated_transfer_seconds(self, num_blocks: int) -> float:
        """The modeled time to move `num_blocks` blocks between workers."""
        ...


class SimulatedPuller(HandleReleaser):
    """The mocker's link: sleeps for the modeled transfer time of the blocks, moves nothing."""

    def __init__(self, seconds_for_blocks: Callable[[int], float], workers: WorkerClient):
        super().__init__(workers)
        self.seconds_for_blocks = seconds_for_blocks

    async def pull(self, handle: KvHandle, local_block_ids: list[int], start: int) -> bool:
        try:
            await asyncio.sleep(self.seconds_for_blocks(len(local_block_ids)))
        finally:
            self.release(handle)
        return True


async def lend_blocks(engine: Any, leases: PrefillLeases, request: PeerLeaseRequest, instance: Any,
                      transfer_metadata: bytes) -> KvHandle | None:
    """A peer's `kv_lease` (the cluster KV pool): pin the leading run of the asked blocks this worker holds
    (G1, and after it what G2 holds, loaded into G1: workers/core/lend_from_g2.py; a vLLM worker lends
    from its tiers' staging rows, `Engine.lend_pool`) under the request's lease id, timed like a prefill's
    handle (freed by the pull's notification, `release`, or expiry), and describe them as a handle with
    each block's checksum (where the engine's KV is this process's memory); None when it holds none, or
    the ask is for another model, or the asker gave the lease back before it was granted. `engine`: the
    worker's Engine; `instance`: its discovery Instance; `transfer_metadata`: the worker's transfer
    engine's, unless the engine lends from a pool of its own (vLLM's connector).

    Cancelled (the asker left) while the engine pins: the pinning runs to its end and its blocks are
    freed at once, never left to the lease's expiry."""
    if request.fingerprint != engine.fingerprint or not request.lease_id.startswith("peer:"):
        return None  # another model's hashes; a lease id that is not a peer's could name a request
    pinning = asyncio.ensure_future(engine.lease_blocks(request.lease_id, request.block_hashes))
    try:
        block_ids = await asyncio.shield(pinning)
    except asyncio.CancelledError:
        pinning.add_done_callback(lambda _: leases.free_now(request.lease_id))
        raise
    if not block_ids:
        return None
    try:
        checksums = await engine.block_checksums(block_ids)
    except asyncio.CancelledError:
        leases.free_now(request.lease_id)
        raise
    if not leases.hold(request.lease_id):
        return None  # given back already (the asker timed out or was cancelled): freed by hold
    pool, transfer_metadata = engine.lend_pool() or ("g1", transfer_metadata)
    return KvHandle(request_id=request.lease_id, prefill_instance=instance.instance_id,
                    prefill_address=instance.address, transfer_metadata=transfer_metadata, pool=pool,
                    fingerprint=engine.fingerprint, block_ids=block_ids,
                    num_tokens=len(block_ids) * engine.kv_layout().block_size, first_token=-1,
                    lease_s=leases.lease_s, block_checksums=checksums)

"""The cluster KV pool on a vLLM worker, in kvrelay's worker process (peer_pool.py has the bytes side, in
vLLM's worker process): asking a peer to lease a request's prefix, handing the lease to vLLM, giving it
back, and lending this worker's blocks through vLLM's worker process (peer_lend.py).

Asking is the native peer source's (workers/core/kv_sources/peer.py): the prompt's block hashes,
chained from this engine's fingerprint, the request's cache salt and LoRA, up to the last loadable
block (never the last token's) and at most the blocks the router said the peer holds, sent over the
token-authenticated request plane (`kv_lease`); a peer of another model or salt lends nothing. A lease
that cannot be used (another pool or fingerprint) is given back at once; one that is used rides to
vLLM's tier connector in `kv_transfer_params` with the deadline of its read (half the lease from now).
Anything that fails costs a recompute of the missing blocks, never the request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.handle_release import HandleReleaser
from kvrelay.workers.api.messages import EngineRequest, EngineStats, KvHandle, PeerLeaseRequest
from kvrelay.workers.engines.vllm.peer_lend import LendClient
from kvrelay.workers.engines.vllm.peer_pool import POOL, TOKEN_ENV, peer_params
from kvrelay.workers.kv_handoff import pull_timeout

log = logging.getLogger("kvrelay.vllm.pool")
ASK_TIMEOUT_S = 2.0  # as the native peer source's: a peer slower than this is slower than recomputing


@dataclass(frozen=True)
class PeerLease:
    handle: KvHandle
    params: dict[str, Any]  # vLLM's kv_transfer_params for the request


@dataclass
class _Counts:
    asked: int = 0
    fallbacks: int = 0  # asks that got less than asked (nothing held, another salt, peer gone or slow)


@dataclass
class PeerAsker:
    token: str
    lend_pool: tuple[str, bytes] | None = None  # (pool, transfer metadata) of vLLM's worker, once it lent
    counts: _Counts = field(default_factory=_Counts)
    _lends: LendClient | None = None
    _workers: WorkerClient | None = None
    _releaser: HandleReleaser | None = None
    _fingerprint: str = ""
    _block_size: int = 0

    def before_vllm_starts(self) -> None:
        """vLLM's worker process inherits this process's environment: the pool's transfer engine reads the
        token there (never in vLLM's config, which vLLM logs)."""
        os.environ[TOKEN_ENV] = self.token

    def start(self, socket_dir: str, fingerprint: str, block_size: int) -> None:
        self._fingerprint, self._block_size = fingerprint, block_size
        self._lends = LendClient(socket_dir)
        self._workers = WorkerClient(RpcClient(token=self.token))
        self._releaser = HandleReleaser(self._workers)

    # -- pulling ----------------------------------------------------------------------------------------
    def hashes(self, request: EngineRequest) -> list[int]:
        """The prompt's block hashes the peer may lend: up to the last loadable block, at most the peer's."""
        assert request.kv_peer is not None
        bs = self._block_size
        loadable = min(request.kv_peer.blocks, (len(request.prompt_token_ids) - 1) // bs)
        if loadable <= 0:
            return []
        root = root_hash(self._fingerprint, request.cache_salt)
        return block_hashes(request.prompt_token_ids[:loadable * bs], bs, root, request.lora_name.encode())

    async def ask(self, request: EngineRequest) -> PeerLease | None:
        peer = request.kv_peer
        hashes = self.hashes(request)
        if peer is None or not hashes or self._workers is None:
            return None
        self.counts.asked += 1
        handle = None
        try:
            reply = await asyncio.wait_for(self._workers.lease(peer.address, PeerLeaseRequest(
                lease_id=f"peer:{request.request_id}", fingerprint=self._fingerprint, block_hashes=hashes)),
                ASK_TIMEOUT_S)
            handle = reply.handle
        except Exception as e:  # gone, refused, slow: recompute
            log.info("request %s: peer %s lent no KV (%s); computing the prompt", request.request_id,
                     peer.instance_id, e)
        if handle is not None and (handle.pool != POOL or handle.fingerprint != self._fingerprint):
            self.give_back(PeerLease(handle, {}))  # not a vLLM worker's rows of this model: unusable
            handle = None
        if handle is None or len(handle.block_ids) < len(hashes):
            self.counts.fallbacks += 1
        if handle is None:
            return None
        return PeerLease(handle, peer_params(handle, time.time() + pull_timeout(handle)))

    def give_back(self, lease: PeerLease) -> None:
        """Free the lease on the peer now (a no-op there when the pull's notification already did)."""
        if self._releaser is not None:
            self._releaser.release(lease.handle)

    # -- lending ----------------------------------------------------------------------------------------
    async def lend(self, lease_id: str, hashes: list[int]) -> list[int]:
        if self._lends is None:
            return []
        rows, pool, metadata = await self._lends.lend(lease_id, hashes)
        if rows:
            self.lend_pool = (pool, metadata)
        return rows

    async def free(self, lease_id: str) -> None:
        if self._lends is not None:
            await self._lends.free(lease_id)

    def add_counters(self, stats: EngineStats) -> EngineStats:
        return msgspec.structs.replace(stats, peer_asked=self.counts.asked, peer_fallbacks=self.counts.fallbacks)

    async def close(self) -> None:
        if self._releaser is not None:
            await self._releaser.close()
        if self._workers is not None:
            await self._workers.close()
        if self._lends is not None:
            await self._lends.close()

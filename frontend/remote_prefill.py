"""Conditional disaggregation: whether a request is prefilled on a prefill worker, and doing it
(docs/ARCHITECTURE.md "Disaggregation").

A request goes to a prefill worker when its decode worker has the `decode` role, some prefill worker
of the model is up, and the part of the prompt the decode worker does not already hold (per the KV
index) is at least `min_tokens`. Otherwise the decode worker prefills locally. The prefill worker is
chosen by the kv router (prefix overlap against load); one that fails (connection lost, overloaded) is
left out and the next is tried; when none is left the decode worker prefills locally. A request whose
caller leaves while it prefills is cancelled on the prefill worker, which frees its blocks.

Invariant: every `select` on the prefill router is matched by one `on_finish`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from kvrelay.frontend.errors import WorkerRejected
from kvrelay.frontend.router import BaseRouter, RouteRequest, WorkerState
from kvrelay.frontend.stream_watch import StreamWatch
from kvrelay.frontend.worker_pool import WorkerPool
from kvrelay.runtime.discovery import Instance
from kvrelay.runtime.rpc import RemoteError, RpcCancelled, RpcConnectionError
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.endpoints import ErrorKind, Role
from kvrelay.workers.api.handle_release import HandleReleaser
from kvrelay.workers.api.messages import EngineRequest, KvHandle, PrefillReply

log = logging.getLogger(__name__)

PREFILL_ROLES = (Role.PREFILL,)


class RemotePrefill:
    def __init__(self, pool: WorkerPool, workers: WorkerClient, router: BaseRouter, min_tokens: int,
                 state: Callable[[Instance, float], WorkerState], registry: CollectorRegistry,
                 suspend_s: float, watch: StreamWatch):
        self.pool, self.workers, self.router, self.min_tokens = pool, workers, router, min_tokens
        self.watch = watch  # a frozen prefill worker fails its stream (then: the next one, or local)
        self._state, self._suspend_s = state, suspend_s
        self._releaser = HandleReleaser(workers)
        self.prefills = Counter("kvrelay_frontend_prefills", "prefills by where they ran: local (on the "
                                "decode or aggregated worker) or remote (on a prefill worker)", ["where"],
                                registry=registry)
        self.failovers = Counter("kvrelay_frontend_prefill_failovers",
                                 "prefill attempts moved to another prefill worker (or to local)", registry=registry)
        self.prefills.labels(where="local")
        self.prefills.labels(where="remote")

    def wanted(self, model: str, decode: Instance, route: RouteRequest, overlap_blocks: int) -> bool:
        if decode.role != Role.DECODE or not self.pool.workers(model, roles=PREFILL_ROLES):
            return False
        uncached = route.num_prompt_tokens - overlap_blocks * route.block_size
        return uncached >= self.min_tokens

    async def prefill(self, model: str, route: RouteRequest, request: EngineRequest) -> PrefillReply | None:
        """The first token and a handle from a prefill worker, or None: prefill locally."""
        excluded: set[str] = set()
        while True:
            workers = [w for w in self.pool.workers(model, roles=PREFILL_ROLES) if w.instance_id not in excluded]
            if not workers:
                return None
            now = time.time()
            decision = self.router.select(route, [self._state(w, now) for w in workers])
            inst = self.pool.instances[decision.worker_id]
            try:
                reply = None
                async with self.workers.prefill(inst.address, request) as stream, \
                        self.watch.watching(inst.instance_id, stream):
                    async for item in stream:  # read to the end: leaving early would cancel the lease
                        reply = item
                if reply is None:
                    raise RpcConnectionError(f"{inst.address} ended the prefill without a reply")
                self.prefills.labels(where="remote").inc()
                return reply
            except (RpcConnectionError, RpcCancelled) as e:
                self.pool.suspend(inst.instance_id, self._suspend_s)
                log.warning("request %s: prefill worker %s failed (%s); trying another", request.request_id,
                            inst.instance_id, e)
            except RemoteError as e:
                if e.kind != ErrorKind.ENGINE_OVERLOADED:
                    raise WorkerRejected(e.kind, e.remote_message) from None
            finally:
                self.router.on_finish(route.request_id)  # the router counted it under the route's id
            excluded.add(inst.instance_id)
            self.failovers.inc()

    def release(self, handle: KvHandle) -> None:
        """Free a handle's lease now (its decode attempt ended without pulling)."""
        self._releaser.release(handle)

    async def close(self) -> None:
        await self._releaser.close()

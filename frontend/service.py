"""Request orchestration: pick a worker, stream from it, move the request if the worker dies.

Invariants:
- Every routed attempt is matched by exactly one `router.on_finish` (the router's in-flight
  accounting never drifts), whether the attempt ends normally, fails, or the caller leaves.
- A caller that stops iterating (client disconnect) closes the RPC stream, which cancels the request
  on the worker; nothing keeps running for a request nobody is reading.
- A worker whose connection breaks mid-stream is suspended from routing at once; the request
  continues on another worker from prompt + tokens generated so far, up to `migration_limit` times,
  and the caller sees one uninterrupted stream of outputs.
- A worker that stops answering without closing its connection is a failure too (stream_watch.py):
  its streams fail at once when it leaves discovery, or after `--worker-stall-timeout` without output
  from a worker that also stopped reporting load; the request then migrates as above.
- Disaggregated (prefill workers up): the decode worker is picked by load, the prompt may be
  prefilled remotely (remote_prefill.py) and the first token is streamed before the decode worker
  pulls the KV. A handle whose decode attempt ends without finishing is released at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import xxhash
from prometheus_client import CollectorRegistry, Counter, Gauge

from kvrelay.frontend.config import FrontendConfig
from kvrelay.frontend.errors import NoWorker, WorkerRejected
from kvrelay.frontend.kv_events_consumer import KvEventsConsumer
from kvrelay.frontend.kv_index import KvIndex
from kvrelay.frontend.peer_load import PeerLoad
from kvrelay.frontend.prefill_rate import PrefillRate
from kvrelay.frontend.remote_prefill import PREFILL_ROLES, RemotePrefill
from kvrelay.frontend.router import RouteRequest, WorkerState, decision_histogram, make_router
from kvrelay.frontend.stream_watch import StreamWatch
from kvrelay.frontend.worker_pool import WorkerPool
from kvrelay.kvbm.events import KvSnapshot, LoadMetrics, load_subject
from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.runtime.discovery import Discovery, Instance
from kvrelay.runtime.events import EventPlane
from kvrelay.runtime.metrics import new_registry
from kvrelay.runtime.paths import cache_dir, private_dir
from kvrelay.runtime.rpc import RemoteError, RpcCancelled, RpcClient, RpcConnectionError, RpcStream
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.endpoints import ErrorKind, Role
from kvrelay.workers.api.messages import EngineOutput, EngineRequest, KvPeer, ModelCard

log = logging.getLogger(__name__)

LOAD_STALE_S = 5.0
SUSPEND_S = 30.0  # how long a worker whose connection broke is kept out of routing
SYNC_WAIT_S = 10.0  # how long start() waits for the pool to hold the workers discovery listed
MAX_WAITING_FOR_WORKER = 1024  # requests waiting (--worker-wait) for a worker at once; more fail at once


class WorkerPin:
    """Where the sequences of one request go (choices.py, n > 1): the first routed sets the worker and
    the others follow it, so their prompt blocks are prefix-cache hits there instead of a prefill each.
    A pinned worker that is gone or failed is not forced: routing then picks as usual."""

    def __init__(self) -> None:
        self.worker_id: str | None = None


def _merge_backlog(out: EngineOutput, stream: RpcStream) -> EngineOutput:
    """Fold outputs that already arrived behind `out` into it: when the frontend falls behind the
    engine, it then detokenizes and sends one chunk for the backlog instead of one per step."""
    while out.finish_reason is None:
        nxt = stream.pop_ready()
        if nxt is None:
            break
        logprobs = None if out.logprobs is None or nxt.logprobs is None else out.logprobs + nxt.logprobs
        top = None if out.top_logprobs is None or nxt.top_logprobs is None else out.top_logprobs + nxt.top_logprobs
        out = msgspec.structs.replace(nxt, token_ids=out.token_ids + nxt.token_ids, logprobs=logprobs,
                                      top_logprobs=top,
                                      num_cached_tokens=out.num_cached_tokens)
    return out


class FrontendService:
    def __init__(self, cfg: FrontendConfig, discovery: Discovery, events: EventPlane,
                 registry: CollectorRegistry | None = None, internal_token: str = ""):
        self.cfg = cfg
        self.registry = registry or new_registry()
        self.pool = WorkerPool(discovery, cfg.namespace)
        self.events = events
        self.rpc = RpcClient(token=internal_token)  # the workers' internal token (runtime/auth.py)
        self.workers = WorkerClient(self.rpc)
        # G4 is shared by every worker: holding a block there gives no worker an edge, so it is not indexed.
        lower = ("G2", "G3") if cfg.lower_tier_weight > 0 else ()
        self.index = KvIndex(tiers=("G1", *lower))
        hist = decision_histogram(self.registry)
        kv_opts: dict[str, Any] = {"cost": cfg.router_cost, "overlap_weight": cfg.overlap_weight,
                   "temperature": cfg.router_temperature, "speculative_ttl": cfg.router_speculative_ttl,
                   "balance": cfg.router_balance,
                   "tier_weights": {"G1": 1.0, **{t: cfg.lower_tier_weight for t in lower}}}
        self.router = make_router(cfg.router_mode, index=self.index, histogram=hist,
                                  **({**kv_opts, "prefill_rate": PrefillRate(cfg.router_prefill_rate),
                                      "peer_weight": cfg.router_peer_weight}
                                     if cfg.router_mode == "kv" else {}))
        self.decode_router = make_router("least-loaded", histogram=hist, label="decode")
        self.watch = StreamWatch(cfg.worker_stall_timeout, self._reports_load, self._has_alternative)
        self.pool.on_removed.append(self.watch.worker_left)
        self.remote = RemotePrefill(self.pool, self.workers, make_router(
                                        "kv", index=self.index, histogram=hist, label="prefill",
                                        prefill_rate=PrefillRate(cfg.router_prefill_rate), **kv_opts),
                                    cfg.disagg_min_tokens, self._state, self.registry, SUSPEND_S, self.watch)
        # Other frontends of the deployment (more HTTP processes, replicas): their in-flight load counts too.
        self.frontend_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.peer_load = PeerLoad(events, cfg.namespace, self.frontend_id,
                                  {r.label: r for r in (self.router, self.decode_router, self.remote.router)})
        self.kv_events = KvEventsConsumer(events, cfg.namespace, self.index, self._resync)
        self.pool.on_removed.append(self.kv_events.remove_worker)
        self.pool.on_added.append(lambda inst: self.kv_events.add_worker(inst.instance_id))
        self.cards: dict[str, ModelCard] = {}
        self._card_locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task] = []
        self.waiting_for_worker = 0  # requests in wait_for_workers now (bounded by MAX_WAITING_FOR_WORKER)
        self.migrations = Counter("kvrelay_frontend_migrations", "requests moved to another worker mid-stream",
                                  registry=self.registry)
        self.peer_routes = Counter("kvrelay_kv_peer_routes", "routed requests by whether the chosen worker was "
                                   "told to pull a prefix another worker holds (pull) or not (local)",
                                   ["choice"], registry=self.registry)
        # Read at scrape time: what the router holds, so a leak shows on a dashboard, not in an OOM.
        index_blocks = Gauge("kvrelay_router_index_blocks", "distinct KV blocks in the router's index, by tier",
                             ["tier"], registry=self.registry)
        for tier in ("G1", *lower):
            index_blocks.labels(tier=tier).set_function(functools.partial(self.index.num_hashes, tier))
        Gauge("kvrelay_router_inflight_requests", "requests this frontend's routers count against workers",
              registry=self.registry).set_function(self._own_inflight)

    async def start(self) -> None:
        await self.events.start()
        await self.kv_events.start()
        load_sub = await self.events.subscribe(load_subject(self.cfg.namespace))
        self._tasks.append(asyncio.create_task(self._consume_load(load_sub)))
        await self.peer_load.start()
        await self.pool.start()
        self.watch.start()
        await self.sync_workers(SYNC_WAIT_S)

    async def sync_workers(self, timeout: float) -> bool:
        """Wait until the routers hold every worker discovery lists now (bounded; logged if not): a
        process that answers before its watch caught up says 'no worker' for registered workers."""
        missing = await self.pool.wait_covering(timeout)
        if missing:
            log.warning("routing before discovery's workers are all seen: %d listed worker(s) still "
                        "missing after %.0f s: %s", len(missing), timeout, ", ".join(sorted(missing)))
        return not missing

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.watch.close()
        await self.peer_load.close()
        await self.remote.close()
        await self.kv_events.close()
        await self.pool.close()
        await self.rpc.close()
        await self.events.close()

    def _reports_load(self, worker_id: str) -> bool:
        """Whether the worker published load recently (a live worker does every --load-interval). Only
        evidence while other workers' reports do arrive: with none fresh from anyone, the event plane (or
        this process) is what stalled, and every worker counts as alive."""
        now = time.time()
        if now - max((m.timestamp for m in self.pool.load.values()), default=0.0) > LOAD_STALE_S:
            return True
        load = self.pool.load.get(worker_id)
        return load is not None and now - load.timestamp <= LOAD_STALE_S

    def _has_alternative(self, worker_id: str) -> bool:
        """Whether a request on this worker could go elsewhere now: a prefill worker's always can (local
        prefill), a decode/aggregated worker's only to another routable worker of its model."""
        inst = self.pool.instances.get(worker_id)
        if inst is None or inst.role == Role.PREFILL:
            return True
        return any(w.instance_id != worker_id for w in self.pool.workers(inst.model))

    def _own_inflight(self) -> int:
        """In flight from this frontend (the routers also hold the other frontends' requests)."""
        return sum(len(r.inflight) - self.peer_load.peer_requests(r.label) for r in (self.router, self.decode_router))

    async def _consume_load(self, sub) -> None:
        async for msg in sub:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                self.pool.update_load(msg.decode(LoadMetrics))

    async def _resync(self, worker_id: str) -> KvSnapshot:
        inst = self.pool.instances.get(worker_id)
        if inst is None:
            raise LookupError(f"worker {worker_id} is gone")
        return await self.workers.kv_snapshot(inst.address)

    # -- models -----------------------------------------------------------------------------------------
    def has_workers(self) -> bool:
        return bool(self.pool.instances)

    def models(self) -> list[str]:
        return self.pool.models()

    def unready_models(self) -> dict[str, str]:
        """Served models a request could not be routed for right now, with why. Empty = ready.
        Routing needs an aggregated or decode worker (not suspended); with `require_prefill` the
        deployment is disaggregated by design, so a prefill worker must be up too."""
        missing = {}
        for model in self.pool.models():
            if not self.pool.workers(model):
                missing[model] = "no aggregated or decode worker"
            elif self.cfg.require_prefill and not self.pool.workers(model, roles=PREFILL_ROLES):
                missing[model] = "no prefill worker"
        return missing

    async def model_card(self, model: str) -> ModelCard:
        """The model's card, fetched once from one of its workers (tokenizer files, hashing params)."""
        card = self.cards.get(model)
        if card is not None:
            return card
        lock = self._card_locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model in self.cards:
                return self.cards[model]
            last_error: Exception | None = None
            for inst in self.pool.workers(model, roles=(Role.AGG, Role.DECODE, Role.PREFILL)):
                try:
                    card = await self.workers.model_card(inst.address)
                except (RpcConnectionError, RpcCancelled, RemoteError) as e:
                    last_error = e
                    continue
                self.cards[model] = card
                return card
            raise NoWorker(f"no reachable worker serves model {model!r}") from last_error

    def card_dir(self, card: ModelCard) -> Path:
        """The card's tokenizer files on local disk (tokenizer loaders want a directory). Keyed by the
        fingerprint and a digest of the files: a changed template or tokenizer is a new directory, never
        a stale copy (`kvrelay cache clean` removes old ones)."""
        digest = xxhash.xxh3_64_hexdigest(msgspec.msgpack.encode(sorted(card.files.items())))
        path = cache_dir() / "model-cards" / f"{card.fingerprint[:32]}-{digest}"
        if not (path / ".complete").exists():
            private_dir(path.parent)
            private_dir(path)
            for name, data in card.files.items():
                fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            (path / ".complete").touch(mode=0o600)
        return path

    async def wait_for_model(self, model: str) -> bool:
        return await self.wait_for_workers(lambda: bool(self.pool.workers(model)))

    async def wait_for_workers(self, ready, timeout: float | None = None) -> bool:
        """Wait up to `--worker-wait` (or `timeout`) until `ready()`: a request that arrives, or must
        move, while the only worker of its role restarts is queued here, not failed. Bounded: beyond
        MAX_WAITING_FOR_WORKER waiting requests, False at once."""
        if ready():
            return True
        timeout = self.cfg.worker_wait if timeout is None else timeout
        if timeout <= 0 or self.waiting_for_worker >= MAX_WAITING_FOR_WORKER:
            return False
        self.waiting_for_worker += 1
        try:
            return await self.pool.wait_for(ready, timeout)
        finally:
            self.waiting_for_worker -= 1

    # -- generation -------------------------------------------------------------------------------------
    def _state(self, inst: Instance, now: float) -> WorkerState:
        load = self.pool.load.get(inst.instance_id)
        if load is None or now - load.timestamp > LOAD_STALE_S:
            return WorkerState(worker_id=inst.instance_id)
        return WorkerState(worker_id=inst.instance_id, active_requests=load.running + load.waiting,
                           active_decode_blocks=load.used_blocks, kv_usage=load.kv_usage,
                           waiting_requests=load.waiting, report_age=max(now - load.timestamp, 0.0),
                           prefill_rate=load.prefill_rate)

    async def generate(self, model: str, card: ModelCard, request: EngineRequest,
                       pin: WorkerPin | None = None) -> AsyncIterator[EngineOutput]:
        prompt, sampling = request.prompt_token_ids, request.sampling
        generated: list[int] = []
        excluded: set[str] = set()
        migrations = 0
        root = root_hash(card.fingerprint, request.cache_salt)
        wait_until = time.monotonic() + self.cfg.worker_wait  # one --worker-wait per request, not per attempt
        while True:
            workers = [w for w in self.pool.workers(model) if w.instance_id not in excluded]
            if not workers and await self.wait_for_workers(
                    lambda: any(w.instance_id not in excluded for w in self.pool.workers(model)),
                    max(0.0, wait_until - time.monotonic())):
                continue  # a worker (e.g. the restarted one) is back: route to it
            if not workers:
                raise NoWorker(f"no worker serves model {model!r}" if not excluded
                               else f"every worker of {model!r} failed during the request")
            if pin is not None and pin.worker_id is not None:  # the router still accounts it (one candidate)
                workers = [w for w in workers if w.instance_id == pin.worker_id] or workers
            tokens = prompt + generated
            route = RouteRequest(request_id=request.request_id, num_prompt_tokens=len(tokens),
                                 block_hashes=block_hashes(tokens, card.block_size, root),
                                 block_size=card.block_size)
            now = time.time()
            states = [self._state(w, now) for w in workers]
            disaggregated = bool(self.pool.workers(model, roles=PREFILL_ROLES))
            if disaggregated:  # the decode worker by load; its cached prefix decides local vs remote
                decision = self.decode_router.select(route, states)
                overlap = self.index.overlap(route.block_hashes).get(decision.worker_id, 0)
            else:
                decision = self.router.select(route, states)
                overlap = decision.overlap_blocks
            inst = self.pool.instances[decision.worker_id]
            if pin is not None:
                pin.worker_id = decision.worker_id
            peer = self.pool.instances.get(decision.peer_id) if decision.peer_id else None
            # Each attempt has its own id on the workers: a migrated attempt may reach a prefill worker
            # that still holds the previous attempt's handle (its release is in flight), and a worker
            # refuses an id it already holds. Routers keep counting the request under its own id.
            attempt = msgspec.structs.replace(
                request, request_id=request.request_id if not migrations else f"{request.request_id}-m{migrations}",
                prompt_token_ids=tokens,
                prior_output_tokens=request.prior_output_tokens + len(generated),
                sampling=msgspec.structs.replace(sampling, max_tokens=sampling.max_tokens - len(generated),
                                                 min_tokens=max(sampling.min_tokens - len(generated), 0)),
                kv_peer=KvPeer(instance_id=peer.instance_id, address=peer.address, blocks=decision.peer_blocks)
                if peer is not None and not disaggregated else None)
            self.peer_routes.labels(choice="pull" if attempt.kv_peer is not None else "local").inc()
            handle, finished = None, False
            try:
                reply = None
                if self.remote.wanted(model, inst, route, overlap):
                    reply = await self.remote.prefill(model, route, attempt)
                if reply is None:
                    self.remote.prefills.labels(where="local").inc()
                else:
                    generated += reply.output.token_ids
                    finished = reply.output.finish_reason is not None
                    yield reply.output
                    if finished:
                        return
                    handle = reply.handle
                    attempt = msgspec.structs.replace(attempt, kv_handle=handle)
                sent, first = time.monotonic(), reply is None
                async with self.workers.generate(inst.address, attempt) as stream, \
                        self.watch.watching(inst.instance_id, stream):
                    async for out in stream:
                        if first:  # the prefill is done: the router learns its time, and its queue shrinks
                            first = False
                            self.router.on_first_token(request.request_id, time.monotonic() - sent,
                                                       out.num_cached_tokens)
                        out = _merge_backlog(out, stream)
                        generated += out.token_ids
                        finished = out.finish_reason is not None
                        yield out
                        if finished:
                            return
                raise RpcConnectionError(f"{inst.address} ended the stream without finishing")
            except (RpcConnectionError, RpcCancelled) as e:
                self.pool.suspend(inst.instance_id, SUSPEND_S)
                excluded.add(inst.instance_id)
                migrations += 1
                if migrations > self.cfg.migration_limit:
                    raise
                self.migrations.inc()
                log.warning("request %s: worker %s failed (%s); continuing on another worker after %d tokens",
                            request.request_id, inst.instance_id, e, len(generated))
            except RemoteError as e:
                if e.kind == ErrorKind.ENGINE_OVERLOADED and len(excluded) + 1 < len(self.pool.workers(model)):
                    excluded.add(inst.instance_id)  # busy: try the others before giving up
                    continue
                raise WorkerRejected(e.kind, e.remote_message) from None
            finally:
                self.router.on_finish(request.request_id)
                self.decode_router.on_finish(request.request_id)
                if handle is not None and not finished:
                    self.remote.release(handle)

"""The worker process: one engine served over the request plane, registered in discovery, publishing
KV events and load metrics (docs/ARCHITECTURE.md "Discovery", "Events", "Request plane").

Endpoints: `generate` (EngineRequest -> stream of EngineOutput), `kv_snapshot` (-> KvSnapshot, for
routers that detected an event gap), `stats` (-> EngineStats), `model_card` and `transfer_stats`.
Prefill role adds `prefill` (EngineRequest -> PrefillReply) and `release` (ReleaseRequest -> Empty);
prefill and decode roles own a transfer engine over the engine's G1 pool (workers/kv_handoff.py).

Lifecycle: engine up -> RPC server up -> registered. Shutdown reverses it: deregister first (routers
stop sending), then the server fails in-flight streams with `Cancelled` (frontends migrate them), then
the engine stops. SIGTERM drains first (`drain`): deregistered, the requests in flight (and prefill
handles waiting to be pulled) get up to `--drain-timeout` seconds to finish; the process then exits 0,
which `kvrelay serve`'s fleet reads as "removed on purpose" and does not restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kvrelay.kvbm.events import KvEvent, KvSnapshot, LoadMetrics, kv_events_subject, load_subject
from kvrelay.runtime.config import ConfigError
from kvrelay.runtime.discovery import Discovery, Instance, register_instance
from kvrelay.runtime.events import EventPlane
from kvrelay.runtime.rpc import RpcClient, RpcServer
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.endpoints import Endpoint, Role
from kvrelay.workers.api.messages import (
    Empty,
    EngineOutput,
    EngineRequest,
    EngineStats,
    KvHandle,
    ModelCard,
    PeerLeaseReply,
    PeerLeaseRequest,
    PrefillReply,
    ReleaseRequest,
)
from kvrelay.workers.api.prefill import PeerLink
from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.kv_handoff import (
    PrefillLeases,
    SimulatedPuller,
    SimulatesTransfer,
    TransferPuller,
    lend_blocks,
)
from kvrelay.workers.metrics import MetricsServer
from kvrelay.workers.prefill_meter import PrefillMeter
from kvrelay.workers.protocol import Engine

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # kvrelay.transfer is imported when a role needs it
    from kvrelay.transfer.base import TransferEngine

# How long a draining worker keeps serving after deregistering: file discovery's watchers poll every
# <= 0.25 s and etcd watches deliver in milliseconds, so 1 s covers a routing decision made just before.
_LEAVE_GRACE_S = 1.0


# Every file the frontend's tokenizer reads (frontend/tokenizer.py): templates included, so a checkpoint
# saved by current transformers (chat_template.jinja) has its chat template through the frontend too.
MODEL_CARD_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
                    "chat_template.jinja", "chat_template.json", "special_tokens_map.json")


def build_engine(cfg: WorkerConfig, model_dir: str, token: str = "") -> Engine:
    """token: the internal token, for an engine that moves KV between workers itself (vLLM's pool)."""
    if cfg.engine == "native":
        from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig

        return NativeEngine(NativeEngineConfig(
            model=model_dir, dtype=cfg.dtype, device=cfg.device, limits=cfg.limits(),
            kv_cache_bytes=cfg.kv_cache_bytes,
            tiers=tier_config(cfg),
        ))
    if cfg.engine == "mocker":
        from kvrelay.workers.engines.mocker import MockerEngine

        return MockerEngine(cfg.mocker_config(model_dir), tiers=tier_config(cfg) if cfg.mocker_kv_tiers else None)
    if cfg.engine == "vllm":
        from kvrelay.workers.engines.vllm.build import build_vllm_engine

        return build_vllm_engine(cfg, model_dir, tier_config(cfg), token)
    raise ValueError(f"unknown engine {cfg.engine!r}")


def tier_config(cfg: WorkerConfig):
    """The lower tiers' config; a malformed G4 URL is a ConfigError now, not a warning at start."""
    from kvrelay.kvbm.tier_config import TierConfigError, check_object_store_url

    try:
        check_object_store_url(cfg.kv_object_store)
    except TierConfigError as e:
        raise ConfigError(str(e)) from None
    return cfg.tiers()


def resolve_model(cfg: WorkerConfig) -> tuple[str, str]:
    """(model directory, served name); converts a GGUF model on first use (workers/models/registry.py)."""
    from kvrelay.workers.models.registry import resolve_model as resolve

    model = resolve(cfg.model)
    return str(model.path), cfg.served_model_name or model.served_name


class Worker:
    def __init__(self, cfg: WorkerConfig, discovery: Discovery, events: EventPlane, engine: Engine | None = None,
                 instance_id: str | None = None, internal_token: str = ""):
        """`internal_token`: required of every caller of the RPC and transfer ports, and presented to
        other workers (runtime/auth.py)."""
        self.cfg, self.discovery, self.events = cfg, discovery, events
        self.internal_token = internal_token
        self.model_dir, self.model_name = resolve_model(cfg)
        self.engine = engine or build_engine(cfg, self.model_dir, internal_token)
        self.instance_id = instance_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.server = RpcServer(cfg.host, cfg.port, token=internal_token)
        self.instance: Instance | None = None
        self._tasks: list[asyncio.Task] = []
        self._event_queue: asyncio.Queue[list[KvEvent]] = asyncio.Queue()
        self.transfer: TransferEngine | None = None  # prefill/decode roles with a real KV pool
        self.leases: PrefillLeases | None = None
        self.puller: TransferPuller | SimulatedPuller | None = None
        self.peers = WorkerClient(RpcClient(token=internal_token))  # decode role: `release` calls to prefill workers
        self.metrics: MetricsServer | None = None
        self.active = 0  # generate/prefill calls in flight (drain waits for them)
        self._deregistered = False

    async def start(self) -> Instance:
        await self.engine.start()
        await self.events.start()
        await self.discovery.start()
        self.engine.subscribe_kv_events(self._on_kv_events)
        self.server.add_endpoint(Endpoint.GENERATE, self._generate, EngineRequest)
        self.server.add_endpoint(Endpoint.KV_SNAPSHOT, self._snapshot, Empty)
        self.server.add_endpoint(Endpoint.STATS, self._stats, Empty)
        self.server.add_endpoint(Endpoint.MODEL_CARD, self._model_card, Empty)
        self.server.add_endpoint(Endpoint.TRANSFER_STATS, self._transfer_stats, Empty)
        lends = self._lends_kv()
        if self.cfg.role == Role.PREFILL or lends:  # a prefill's handles and peers' leases: one set of timers
            self.leases = PrefillLeases(self.engine.abort, self.cfg.kv_lease_s, token=self.internal_token)
            self.server.add_endpoint(Endpoint.RELEASE, self._release, ReleaseRequest)
        if self.cfg.role == Role.PREFILL:
            self.server.add_endpoint(Endpoint.PREFILL, self._prefill, EngineRequest)
        if lends:
            self.server.add_endpoint(Endpoint.KV_LEASE, self._kv_lease, PeerLeaseRequest)
        await self._start_transfer()
        await self.server.start()
        layout = self.engine.kv_layout()
        fingerprint = self.engine.fingerprint
        labels = {"fingerprint": fingerprint, "engine": self.cfg.engine, "pid": str(os.getpid()),
                  "max_num_seqs": str(self.cfg.max_num_seqs)}  # the planner's capacity per worker
        if self.cfg.metrics_port >= 0:
            self.metrics = MetricsServer(self.engine, self.instance_id, api_key=self.cfg.metrics_api_key)
            port = self.metrics.start(self.cfg.host, self.cfg.metrics_port)
            labels["metrics"] = f"{self.cfg.advertise_host or self.cfg.host}:{port}"
        self.instance = Instance(
            namespace=self.cfg.namespace, component=self.cfg.component, instance_id=self.instance_id,
            address=f"{self.cfg.advertise_host or self.cfg.host}:{self.server.port}", role=self.cfg.role,
            model=self.model_name, block_size=layout.block_size, kv_capacity_blocks=layout.num_blocks,
            # Not published: NIXL agent metadata lets its holder read and write this worker's KV pool, so it
            # travels only in prefill handles, over token-authenticated RPC (transfer/README.md "Trust").
            transfer_metadata=b"",
            labels=labels,
        )
        self._tasks.append(asyncio.create_task(self._publish_load()))
        self._tasks.append(asyncio.create_task(self._publish_events()))
        await register_instance(self.discovery, self.instance)
        log.info("worker %s serving %s at %s (%d KV blocks)", self.instance_id, self.model_name,
                 self.instance.address, layout.num_blocks)
        return self.instance

    async def _deregister(self) -> None:
        if self.instance is not None and not self._deregistered:
            self._deregistered = True
            try:
                await self.discovery.deregister(self.instance.key)
            except Exception:  # the lease expiring does the same, just later
                log.warning("could not deregister %s", self.instance.key, exc_info=True)

    async def drain(self, timeout: float) -> bool:
        """Leave routing, then wait up to `timeout` s for the requests in flight and the prefill handles
        not yet pulled. True if all finished; `close()` fails what is left (frontends migrate it).

        The worker keeps serving for at least `_LEAVE_GRACE_S` after deregistering, even when idle: a
        router sees the removal only on its next discovery poll or watch event, and a request it routed
        here before that must be served, not refused (the planner benchmark's scale-downs showed
        'connection refused' on prefills and a migrated decode)."""
        await self._deregister()
        loop = asyncio.get_running_loop()
        left_at = loop.time()
        deadline = left_at + timeout
        grace_until = left_at + min(_LEAVE_GRACE_S, timeout)
        log.info("worker %s draining: %d requests in flight, up to %.0f s", self.instance_id, self.active, timeout)
        while self.active or self.engine.stats().held_requests or loop.time() < grace_until:
            if loop.time() >= deadline:
                log.warning("drain timeout: %d requests still in flight", self.active)
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        await self._deregister()
        await self.server.close()
        if self.metrics is not None:
            self.metrics.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.leases is not None:
            await self.leases.close()
        if self.puller is not None:
            await self.puller.close()
        await self.engine.close()
        if self.transfer is not None:
            await self.transfer.close()  # after the engine: no pull is still writing its pool
        await self.peers.close()
        await self.discovery.close()
        await self.events.close()

    def _lends_kv(self) -> bool:
        """Peer pulls (the cluster KV pool) are on: this worker lends its G1 blocks and pulls others'
        (vLLM: its tiers' blocks, through its connector, `lends_through_connector`)."""
        return self.cfg.kv_peer_pull and self.cfg.kv_transfer != "none" and (
            not self.engine.owns_kv_transfer or self.engine.lends_through_connector)

    async def _start_transfer(self) -> None:
        """A transfer engine over the G1 pool (prefill/decode roles, and every role with peer pulls);
        decode gets a puller for handles, every role with peer pulls one for peers' blocks."""
        if (self.cfg.role == Role.AGG and not self._lends_kv()) or self.cfg.kv_transfer == "none" \
                or self.engine.owns_kv_transfer:
            return
        pool = self.engine.kv_pool()
        if pool is not None:
            from kvrelay.transfer import make_transfer_engine

            self.transfer = make_transfer_engine(self.cfg.kv_transfer, self.instance_id, host=self.cfg.host,
                                                 advertise_host=self.cfg.advertise_host or None,
                                                 token=self.internal_token)
            self.transfer.register_pool("g1", pool, self.engine.kv_layout().block_bytes)
            await self.transfer.start()
            log.info("KV transfer: %s", self.transfer.kind)
        if self.transfer is not None:
            self.puller = TransferPuller(self.transfer, self.peers, token=self.internal_token)
        elif isinstance(self.engine, SimulatesTransfer):  # the mocker: a simulated link
            self.puller = SimulatedPuller(self.engine.simulated_transfer_seconds, self.peers)
        if self.cfg.role == Role.DECODE:
            if self.puller is None:
                raise ConfigError(f"--role decode: engine {self.cfg.engine!r} has no KV pool to pull into")
            self.engine.set_kv_puller(self.puller)
        if self._lends_kv() and self.puller is not None:
            self.engine.set_peer_puller(self.puller, PeerLink(
                ask=self.peers.lease, release=self.peers.release, max_pulls=self.cfg.kv_peer_max_pulls,
                max_bytes=self.cfg.kv_peer_max_bytes))
        if self.transfer is not None and self.leases is not None:  # pulls of our blocks end in notifications
            self._tasks.append(asyncio.create_task(self.leases.consume(self.transfer)))

    # -- endpoints --------------------------------------------------------------------------------------
    async def _generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        # Cancellation (client left, frontend aborted) arrives here as CancelledError; closing the
        # engine stream aborts the request in the engine and frees its blocks.
        self.active += 1
        try:
            async for out in self.engine.generate(request):
                yield out
        finally:
            self.active -= 1

    async def _prefill(self, request: EngineRequest) -> AsyncGenerator[PrefillReply, None]:
        """Compute the prompt, hold its blocks under a lease, hand back the first token and a handle."""
        assert self.leases is not None and self.instance is not None
        self.active += 1
        try:
            result = await self.engine.prefill(request)  # cancelled -> the engine frees the blocks
        finally:
            self.active -= 1  # a held handle is waited for through held_requests
        handle = None
        if result.block_ids:
            self.leases.hold(request.request_id)
            handle = KvHandle(
                request_id=request.request_id, prefill_instance=self.instance_id,
                prefill_address=self.instance.address,
                transfer_metadata=result.transfer_params or (self.transfer.metadata() if self.transfer else b""),
                pool=result.pool, fingerprint=self.engine.fingerprint, block_ids=result.block_ids,
                num_tokens=len(request.prompt_token_ids), first_token=result.output.token_ids[0],
                lease_s=self.cfg.kv_lease_s)
        try:
            yield PrefillReply(output=result.output, handle=handle)
        except BaseException:  # the caller left before taking the handle: nobody will pull it
            if handle is not None:
                self.leases.release(request.request_id, "cancelled")
            raise

    async def _kv_lease(self, request: PeerLeaseRequest) -> AsyncGenerator[PeerLeaseReply, None]:
        """A peer's pull of blocks this worker holds: pin the leading run of the asked hashes under a lease
        (freed by the pull's notification, `release`, or expiry) and hand back a handle to them."""
        assert self.leases is not None and self.instance is not None
        handle = await lend_blocks(self.engine, self.leases, request, self.instance,
                                   self.transfer.metadata() if self.transfer else b"")
        try:
            yield PeerLeaseReply(handle=handle)
        except BaseException:  # the asker left before taking the handle: nobody will pull it
            if handle is not None:
                self.leases.release(request.lease_id, "cancelled")
            raise

    async def _release(self, request: ReleaseRequest) -> AsyncGenerator[Empty, None]:
        assert self.leases is not None
        self.leases.release(request.request_id, "released")
        yield Empty()

    async def _transfer_stats(self, _: Empty) -> AsyncGenerator[Any, None]:
        from kvrelay.transfer.base import TransferStats

        own = self.engine.transfer_stats() if self.transfer is None else None  # vLLM's pool moves its own
        yield self.transfer.stats() if self.transfer is not None else own or TransferStats(kind="none")

    async def _snapshot(self, _: Empty) -> AsyncGenerator[KvSnapshot, None]:
        # Events up to snap.last_event_id may still be queued for publication; consumers ignore any
        # event at or below a snapshot's last_event_id, so order between the two does not matter.
        snap = await self.engine.kv_snapshot()
        yield msgspec.structs.replace(snap, worker_id=self.instance_id)

    async def _stats(self, _: Empty) -> AsyncGenerator[EngineStats, None]:
        yield self.engine.stats()

    async def _model_card(self, _: Empty) -> AsyncGenerator[ModelCard, None]:
        files = {}
        for name in MODEL_CARD_FILES:
            path = Path(self.model_dir) / name
            if path.is_file():
                files[name] = path.read_bytes()
        yield ModelCard(name=self.model_name, fingerprint=self.engine.fingerprint,
                        block_size=self.engine.kv_layout().block_size, max_model_len=self.engine.max_model_len,
                        files=files)

    # -- events -----------------------------------------------------------------------------------------
    def _on_kv_events(self, events: list[KvEvent]) -> None:
        self._event_queue.put_nowait(events)

    async def _publish_events(self) -> None:
        """One task publishes, so events leave in event_id order whatever the backend's awaits do."""
        subject = kv_events_subject(self.cfg.namespace)
        while True:
            for ev in await self._event_queue.get():
                try:
                    await self.events.publish(subject, msgspec.structs.replace(ev, worker_id=self.instance_id))
                except Exception:  # routers detect the gap and resync from kv_snapshot
                    log.warning("could not publish KV event %d", ev.event_id, exc_info=True)

    async def _publish_load(self) -> None:
        subject = load_subject(self.cfg.namespace)
        meter = PrefillMeter()
        while True:
            s = self.engine.stats()
            metrics = LoadMetrics(worker_id=self.instance_id, running=s.running, waiting=s.waiting,
                                  used_blocks=s.used_blocks, total_blocks=s.total_blocks, timestamp=time.time(),
                                  prefill_rate=meter.update(s),
                                  tier_onboard_rates={t.tier: t.onboard_bytes / t.onboard_seconds
                                                      for t in s.tiers if t.onboard_seconds > 0})
            try:
                await self.events.publish(subject, metrics)
            except Exception:
                log.warning("could not publish load metrics", exc_info=True)
            await asyncio.sleep(self.cfg.load_interval)


async def run_worker(worker: Worker) -> None:
    """Serve until SIGINT/SIGTERM, drain (a second signal cuts the drain short), shut down in order."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: hurry.set() if stop.is_set() else stop.set())
    try:
        instance = await worker.start()
    except BaseException:
        await _close_after_failed_start(worker)  # its tiers close too: an empty G3 slot is removed
        raise
    print(f"READY {instance.address}", flush=True)  # noqa: T201 - parent processes wait for this line
    await stop.wait()
    drain = asyncio.create_task(worker.drain(worker.cfg.drain_timeout))
    await asyncio.wait({drain, asyncio.create_task(hurry.wait())}, return_when=asyncio.FIRST_COMPLETED)
    drain.cancel()
    await worker.close()


async def _close_after_failed_start(worker: Worker) -> None:
    """Undo what a failed `start` got to, best effort: each part closes even if an earlier one fails."""
    parts = [worker.server.close, worker.engine.close, worker.peers.close, worker.discovery.close, worker.events.close]
    if worker.transfer is not None:
        parts.insert(2, worker.transfer.close)
    for close in parts:
        try:
            await close()
        except Exception:  # noqa: BLE001 - the start's own error is the one to report
            log.debug("close after a failed start", exc_info=True)

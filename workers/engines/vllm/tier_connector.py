"""`KvrelayTierConnector`: kvrelay's G2/G3/G4 tiers behind vLLM's KV connector API (`KVConnectorBase_V1`).

vLLM loads it by name (`kv_connector="KvrelayTierConnector"`, `kv_connector_module_path` = this
module; config.py builds that, alone or as a child of vLLM's `MultiConnector` next to the NixlConnector
of a prefill/decode worker). Why a connector and not an offloading spec: README.md "kvrelay tiers
under vLLM". vLLM builds it twice: a scheduler half in EngineCore and a worker half in the worker
process (on CPU always a process of its own). This class only adapts vLLM's calls; the logic is in
`tier_scheduler.py` (which blocks, kvrelay hashes), `tier_lookup.py` (the scheduler's question to the
worker), `tier_worker.py` (bytes in and out of vLLM's tensors) and `tier_runtime.py` (the tier loop,
the stores, the staging rows: all in the worker process).

Events: the tiers' stored/removed events travel worker -> scheduler in vLLM's worker metadata
(`TierEvents`), then leave through `take_events`, on vLLM's own KV-event stream,
as `BlockStored`/`BlockRemoved` with `ownership="kvrelay"` (their hashes are kvrelay's, not vLLM's)
and the tier in `medium`/`locality` (G2 = CPU, G3 = STORAGE + LOCAL, G4 = STORAGE + REMOTE); the
worker process maps them back (kv_events.py). Stats: cumulative tier counters ride vLLM's
`KVConnectorStats` to the worker process's stat logger (stats.py), then its /metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from vllm.distributed.kv_events import MEDIUM_CPU, MEDIUM_STORAGE, BlockRemoved, BlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvrelay.workers.core.kv_sources.tiers import TierLoad, TierSave
from kvrelay.workers.engines.vllm.peer_pool import PeerRead, peer_from_params
from kvrelay.workers.engines.vllm.stats import TIER_STATS_KEY as STATS_KEY
from kvrelay.workers.engines.vllm.tier_lookup import LookupClient
from kvrelay.workers.engines.vllm.tier_runtime import TierRuntime, TierSettings
from kvrelay.workers.engines.vllm.tier_scheduler import TierScheduler
from kvrelay.workers.engines.vllm.tier_worker import TierWorker

log = logging.getLogger("kvrelay.vllm.tiers")
EXTRA_KEY = "kvrelay"  # our settings inside kv_connector_extra_config
OWNERSHIP = "kvrelay"
TIER_MEDIA = {"G2": (MEDIUM_CPU, "LOCAL"), "G3": (MEDIUM_STORAGE, "LOCAL"), "G4": (MEDIUM_STORAGE, "REMOTE")}
_HIT_SOURCES = {"G2": CacheHitSource.HOST, "G3": CacheHitSource.DISK}


class TierMetadata(KVConnectorMetadata):
    """One step's work for the worker half."""

    def __init__(self, loads: list[TierLoad], saves: list[TierSave], prompt_tokens: int,
                 reads: dict[str, PeerRead] | None = None):
        self.loads, self.saves, self.prompt_tokens = loads, saves, prompt_tokens
        self.reads = reads or {}  # the loads' blocks from peers (the cluster KV pool), by request


class TierEvents(KVConnectorWorkerMetadata):
    """Worker -> scheduler: the tier events since the last step, as (tier, kind, hashes)."""

    def __init__(self, events: list[tuple[str, str, list[int]]]):
        self.events = events

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, TierEvents):
            return TierEvents(self.events + other.events)
        return self


class TierStats(KVConnectorStats):
    """The tiers' cumulative counters: the latest snapshot wins when vLLM aggregates."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other.data:
            self.data = dict(other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for t in self.data.get(STATS_KEY, []):
            out[f"{t['tier']} blocks"] = t["blocks"]
            out[f"{t['tier']} onboarded"] = t["onboard_blocks"]
        return out

    def is_empty(self) -> bool:
        return not self.data


class TierPromMetrics(KVConnectorPromMetrics):
    """vLLM's Prometheus logger wants one per connector (MultiConnector asserts it). kvrelay exports the
    tier metrics itself (the worker's /metrics, `kvrelay_kv_tier_*`), so nothing is recorded here."""

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        return


class KvrelayTierConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        if EXTRA_KEY not in extra:
            raise ValueError("KvrelayTierConnector needs kv_connector_extra_config['kvrelay'] (kvrelay's "
                             "worker sets it; see workers/engines/vllm/README.md)")
        settings = TierSettings.from_extra(extra[EXTRA_KEY])
        if vllm_config.parallel_config.world_size > 1:
            raise ValueError("kvrelay's tiers under vLLM need one worker per engine (tensor/pipeline "
                             "parallel size 1)")
        self._settings = settings
        groups = len(kv_cache_config.kv_cache_groups) if kv_cache_config is not None else 1
        self._off = groups != 1  # hybrid models (sliding window + full, SSM): not supported yet
        if self._off and role == KVConnectorRole.SCHEDULER:
            log.warning("kvrelay tiers under vLLM: this model has %d KV cache groups; only single-group "
                        "models are supported, so the tiers are off", groups)
        self._sched: TierScheduler | None = None
        self._worker: TierWorker | None = None
        self._rt: TierRuntime | None = None
        self._events: list[tuple[str, str, list[int]]] = []  # scheduler half: to publish
        if role == KVConnectorRole.SCHEDULER:
            self._sched = TierScheduler(settings.block_size, settings.fingerprint, LookupClient(settings.key))
        else:
            self._rt = TierRuntime(settings)
            self._worker = TierWorker(self._rt, kv_cache_config.num_blocks)

    # The halves vLLM built this object as (one of them): each call below is only ever made on its own half.
    @property
    def _s(self) -> TierScheduler:
        assert self._sched is not None, "a scheduler-half call on the worker half"
        return self._sched

    @property
    def _w(self) -> TierWorker:
        assert self._worker is not None, "a worker-half call on the scheduler half"
        return self._worker

    @property
    def _r(self) -> TierRuntime:
        assert self._rt is not None, "a worker-half call on the scheduler half"
        return self._rt

    # -- worker half ------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if not self._off:
            step_tokens = self._vllm_config.scheduler_config.max_num_batched_tokens
            self._w.register(kv_caches, step_blocks=-(-step_tokens // self._settings.block_size))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._w.mark_step()  # just before the forward: the prefill clock starts

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        self._w.start_loads(meta.loads, meta.reads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole requests, finished before vLLM schedules them (async loading)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # blocks are saved once every layer is written: wait_for_save

    def wait_for_save(self) -> None:
        meta = self._meta()
        self._w.observe_step(meta.prompt_tokens)
        self._w.save(meta.saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self._w.finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._w.take_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None or not self._w.enabled:
            return None
        return TierStats(data={STATS_KEY: [msgspec.to_builtins(c) for c in self._r.counters()],
                               "save_skipped": self._r.save_skipped, "rows_in_use": self._r.rows_in_use,
                               "onboarded": self._r.onboarded,
                               "peer": self._r.pool.counters() if self._r.pool is not None else {},
                               "peer_transfer": self._r.pool.transfer_stats() if self._r.pool is not None else {}})

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return TierStats(data=data) if data else None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        events = self._r.take_events()
        return TierEvents(events) if events else None

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: Any,
                           per_engine_labelvalues: Any) -> KVConnectorPromMetrics:
        return TierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._rt is not None:
            self._r.close()
        if self._sched is not None:
            self._s.lookups.close()

    def _meta(self) -> TierMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierMetadata)
        return meta

    # -- scheduler half ---------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._off:
            return 0, False
        lora = request.lora_request.lora_name if request.lora_request is not None else ""
        return self._s.matched(request.request_id, request.all_token_ids, request.cache_salt or "", lora,
                               num_computed_tokens, peer_from_params(request.kv_transfer_params))

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else ()
        self._s.allocated(request.request_id, ids, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[Any, int]:
        split: dict[Any, int] = {}
        for tier, tokens in self._s.hit_sources(request.request_id).items():
            src = _HIT_SOURCES.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            split[src] = split.get(src, 0) + tokens
        return split if sum(split.values()) == num_external_tokens else super().get_external_cache_hit_sources(
            request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        manager, scheduled, prompt_tokens = self._kv_cache_manager, [], 0
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        requests = self._s.live
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            req = None if self._off else requests.get(req_id)
            if req is None:
                continue
            n -= len(spec.get(req_id, ()))  # draft tokens may be rejected: never save their blocks
            computed = req.num_computed_tokens
            prompt_tokens += max(0, min(computed + n, req.num_prompt_tokens) - computed)
            scheduled.append((req_id, computed, n, req.all_token_ids,
                              lambda req_id=req_id: manager.get_block_ids(req_id)[0]))
        loads, saves = self._s.step(scheduled)
        return TierMetadata(loads, saves, prompt_tokens, self._s.take_reads())

    def on_new_request(self, request: Any) -> None:
        self._s.live[request.request_id] = request

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._s.finished(request.request_id)
        return False, None

    def update_connector_output(self, connector_output: Any) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, TierEvents):
            self._events.extend(meta.events)

    def take_events(self):
        events, self._events = self._events, []
        for tier, kind, hashes in events:
            medium, locality = TIER_MEDIA[tier]
            if kind == "stored":
                yield BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[],
                                  block_size=self._settings.block_size, lora_id=None, medium=medium,
                                  lora_name=None, locality=locality, ownership=OWNERSHIP)
            else:
                yield BlockRemoved(block_hashes=hashes, medium=medium, locality=locality, ownership=OWNERSHIP)

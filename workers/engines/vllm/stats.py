"""Load and cache counters from vLLM's stat-logger interface (`StatLoggerBase.record`), as kvrelay's
`EngineStats`. vLLM calls `record` on the event loop with each engine-core output batch: the latest
scheduler gauges (running, waiting, KV usage) and this batch's prefix-cache and token counts, which are
summed here into the cumulative counters kvrelay reports.
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvrelay.workers.api.messages import EngineStats, TierCounters

TIER_STATS_KEY = "kvrelay_tiers"  # where tier_connector.py puts its counters in vLLM's connector stats


def tier_snapshot(connector_stats: Any) -> dict[str, Any] | None:
    """kvrelay's tier counters inside vLLM's connector stats: at the top (KvrelayTierConnector alone) or
    one level down (under MultiConnector, keyed by connector name)."""
    if not isinstance(connector_stats, dict):
        return None
    if TIER_STATS_KEY in connector_stats:
        return connector_stats
    for v in connector_stats.values():
        if isinstance(v, dict) and TIER_STATS_KEY in v:
            return v
    return None


class VllmStats:
    def __init__(self) -> None:
        self.running = self.waiting = 0
        self.kv_usage = 0.0
        self.prompt_tokens = self.prefix_hit_tokens = self.generated_tokens = self.preemptions = 0
        self.external_hit_tokens = 0  # prompt tokens loaded by a KV connector (remote prefill)
        self.remote_prefills = self.pull_failures = 0  # decode role: handles used / recomputed instead
        self.tiers: list[TierCounters] = []  # kvrelay's G2/G3/G4 under vLLM: the latest snapshot
        self.save_skipped = self.rows_in_use = self.onboarded = 0
        self.peer: dict[str, int] = {}  # the cluster KV pool's counters in vLLM's worker (peer_pool.py)
        self.peer_transfer: dict[str, Any] = {}  # its transfer engine's TransferStats, as builtins

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self.kv_usage = scheduler_stats.kv_cache_usage
            pc = scheduler_stats.prefix_cache_stats
            self.prompt_tokens += pc.queries
            self.prefix_hit_tokens += pc.hits
            if scheduler_stats.connector_prefix_cache_stats is not None:
                self.external_hit_tokens += scheduler_stats.connector_prefix_cache_stats.hits
            snap = tier_snapshot(getattr(scheduler_stats, "kv_connector_stats", None))
            if snap is not None:
                self.tiers = msgspec.convert(snap[TIER_STATS_KEY], list[TierCounters])
                self.save_skipped, self.rows_in_use = snap.get("save_skipped", 0), snap.get("rows_in_use", 0)
                self.onboarded = snap.get("onboarded", 0)
                self.peer = dict(snap.get("peer") or {})
                self.peer_transfer = dict(snap.get("peer_transfer") or {})
        if iteration_stats is not None:
            self.generated_tokens += iteration_stats.num_generation_tokens
            self.preemptions += iteration_stats.num_preempted_reqs

    def engine_stats(self, total_blocks: int, in_flight: int, block_size: int) -> EngineStats:
        # vLLM's gauges describe its last step; with nothing in flight it is idle whatever they said.
        running, waiting = (self.running, self.waiting) if in_flight else (0, 0)
        used = min(total_blocks, round(self.kv_usage * total_blocks))
        onboarded = self.onboarded  # blocks vLLM used; a tier's onboard_blocks also counts those read past a miss
        peer = self.peer
        # External hits are the handoff's NIXL reads, tier loads and peer pulls: the first are what is left.
        pulled = max(0, self.external_hit_tokens // block_size - sum(t.onboard_blocks for t in self.tiers)
                     - peer.get("pulled_blocks", 0))
        return EngineStats(running=running, waiting=waiting, used_blocks=used, free_blocks=total_blocks - used,
                           total_blocks=total_blocks, prefix_hit_tokens=self.prefix_hit_tokens,
                           prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                           preemptions=self.preemptions, remote_prefills=self.remote_prefills,
                           pulled_blocks=pulled, pull_failures=self.pull_failures, onboarded_blocks=onboarded,
                           offload_pinned=self.rows_in_use, offload_skipped=self.save_skipped, tiers=self.tiers,
                           peer_pulled_blocks=peer.get("pulled_blocks", 0),
                           peer_pull_failures=peer.get("failures", 0), peer_lent_blocks=peer.get("lent_blocks", 0),
                           peer_lease_pinned=peer.get("lease_pinned", 0))


def stat_logger_factory(sink: VllmStats) -> Any:
    """A `StatLoggerFactory` (vllm_config, engine_index) -> StatLoggerBase that feeds `sink`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KvrelayStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.sink = sink

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            self.sink.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return KvrelayStatLogger

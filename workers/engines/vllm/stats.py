"""Load and cache counters from vLLM's stat-logger interface (`StatLoggerBase.record`), as kvrelay's
`EngineStats`. vLLM calls `record` on the event loop with each engine-core output batch: the latest
scheduler gauges (running, waiting, KV usage) and this batch's prefix-cache and token counts, which are
summed here into the cumulative counters kvrelay reports.
"""

from __future__ import annotations

from typing import Any

from kvrelay.workers.api.messages import EngineStats


class VllmStats:
    def __init__(self) -> None:
        self.running = self.waiting = 0
        self.kv_usage = 0.0
        self.prompt_tokens = self.prefix_hit_tokens = self.generated_tokens = self.preemptions = 0
        self.external_hit_tokens = 0  # prompt tokens loaded by a KV connector (remote prefill)
        self.remote_prefills = self.pull_failures = 0  # decode role: handles used / recomputed instead

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self.kv_usage = scheduler_stats.kv_cache_usage
            pc = scheduler_stats.prefix_cache_stats
            self.prompt_tokens += pc.queries
            self.prefix_hit_tokens += pc.hits
            if scheduler_stats.connector_prefix_cache_stats is not None:
                self.external_hit_tokens += scheduler_stats.connector_prefix_cache_stats.hits
        if iteration_stats is not None:
            self.generated_tokens += iteration_stats.num_generation_tokens
            self.preemptions += iteration_stats.num_preempted_reqs

    def engine_stats(self, total_blocks: int, in_flight: int, block_size: int) -> EngineStats:
        # vLLM's gauges describe its last step; with nothing in flight it is idle whatever they said.
        running, waiting = (self.running, self.waiting) if in_flight else (0, 0)
        used = min(total_blocks, round(self.kv_usage * total_blocks))
        return EngineStats(running=running, waiting=waiting, used_blocks=used, free_blocks=total_blocks - used,
                           total_blocks=total_blocks, prefix_hit_tokens=self.prefix_hit_tokens,
                           prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                           preemptions=self.preemptions, remote_prefills=self.remote_prefills,
                           pulled_blocks=self.external_hit_tokens // block_size, pull_failures=self.pull_failures)


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

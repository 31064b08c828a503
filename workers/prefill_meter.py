"""A worker's prefill throughput for its load reports (`LoadMetrics.prefill_rate`): prompt tokens per
second of the engine's steps that computed prompt tokens, from the engine's cumulative counters
(`EngineStats.prefill_tokens_computed`, `prefill_seconds`).

The kv router turns a worker's uncached prompt tokens and queued prefill into an expected time to first
token with it (frontend/ttft_cost.py). Measured here, at the engine, the rate is the engine's own: the
frontend could only learn it from first-token times, which its own lag dominates on a busy machine.
Sums decay by *prefill* seconds (half-life `half_life_s`), so recent steps weigh most and an idle worker
keeps reporting the rate it last had.
"""

from __future__ import annotations

from kvrelay.workers.api.messages import EngineStats


class PrefillMeter:
    def __init__(self, half_life_s: float = 2.0):
        self.half_life_s = half_life_s
        self._tokens = self._seconds = 0.0  # decayed sums
        self._last_tokens, self._last_seconds = 0, 0.0

    def update(self, stats: EngineStats) -> float:
        """The rate as of these stats, tokens/s; 0.0 while the engine has computed no prompt token."""
        tokens = stats.prefill_tokens_computed - self._last_tokens
        seconds = stats.prefill_seconds - self._last_seconds
        self._last_tokens, self._last_seconds = stats.prefill_tokens_computed, stats.prefill_seconds
        if seconds > 0 and tokens >= 0:
            decay = 0.5 ** (seconds / self.half_life_s)
            self._tokens = self._tokens * decay + tokens
            self._seconds = self._seconds * decay + seconds
        return self._tokens / self._seconds if self._seconds > 0 else 0.0

"""`LatencyTargets`: the planner's latency goals, declared once with their defaults, help and checks.
The planner's flags (config.py), both policies (`LoadConfig`, `SlaConfig`), `/set` and the simulator
all take this one group."""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.runtime.config import positive, setting


@dataclass(frozen=True)
class LatencyTargets:
    group_title = "planner latency targets"  # its heading in --help (runtime/config.py)

    ttft_target: float = setting(1.0, "TTFT p90 target (seconds)", positive)
    itl_target: float = setting(0.05, "ITL p90 target (seconds)", positive)

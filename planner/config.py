"""Planner configuration: flags `--foo-bar` / env `KVRELAY_FOO_BAR` (runtime/config.py). Names are unique
across the configs `kvrelay serve` composes, hence the `planner_` prefixes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from kvrelay.planner.targets import LatencyTargets
from kvrelay.runtime.config import non_negative, positive, setting


def _port(value: int) -> str | None:
    return None if -1 <= value <= 65535 else "must be a TCP port, 0 (any free port) or -1 (off)"


@dataclass(frozen=True)
class PlannerConfig(LatencyTargets):
    group_title = "planner (--planner; planner/README.md)"
    planner_policy: Literal["load", "sla"] = setting("load", "scaling policy")
    planner_interval: float = setting(5.0, "seconds between decisions", positive)
    scale_timeout: float = setting(120.0, "seconds a scale may stay unready before it is reported and "
                                   "the planner plans again", positive)
    cooldown_intervals: int = setting(1, "load policy: intervals a pool holds after a change", non_negative)
    predictor: Literal["constant", "ewma", "kalman"] = setting("kalman", "sla policy: load predictor")
    profile: str = setting("", "sla policy: profile file (kvrelay planner profile)")
    min_prefill: int = setting(0, "fewest prefill workers", non_negative)
    max_prefill: int = setting(4, "most prefill workers (0 = no prefill pool)", non_negative)
    min_decode: int = setting(1, "fewest decode workers", non_negative)
    max_decode: int = setting(8, "most decode workers", non_negative)
    budget: int = setting(8, "most workers of both pools together", positive)
    connector: Literal["local", "kubernetes", "virtual"] = setting("local", "how decisions become workers")
    dry_run: bool = setting(False, "log decisions, never act on them")
    frontend_url: str = setting("http://127.0.0.1:8000", "frontend(s) whose /metrics to scrape (comma-separated)")
    prometheus_url: str = setting("", "read the same series from this Prometheus server instead of /metrics")
    frontend_api_key: str = setting("", "bearer key for the frontends' /metrics when they run with --api-key "
                                    "(prefer env KVRELAY_FRONTEND_API_KEY: argv is visible to other users)")
    planner_api_key: str = setting("", "bearer key required on the planner's /status, /set and /metrics (empty: "
                                   "`kvrelay serve` uses its --api-key; prefer env KVRELAY_PLANNER_API_KEY: "
                                   "argv is visible to other users)")
    planner_host: str = setting("127.0.0.1", "status/set/metrics HTTP listen address")
    planner_port: int = setting(0, "status/set/metrics HTTP port (0 = any free port, -1 = off)", _port)
    k8s_namespace: str = setting("default", "kubernetes: namespace of the Deployments")
    k8s_prefill_deployment: str = setting("", "kubernetes: the prefill Deployment (empty = not managed)")
    k8s_decode_deployment: str = setting("kvrelay-decode", "kubernetes: the decode Deployment")
    k8s_api_url: str = setting("", "kubernetes: API server URL (empty = in-cluster, else ~/.kube/config)")

    def targets(self) -> LatencyTargets:
        return LatencyTargets(**{f.name: getattr(self, f.name) for f in fields(LatencyTargets)})

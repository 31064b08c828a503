"""`kvrelay_planner_*` metrics, on the planner's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.ready = Gauge("kvrelay_planner_ready_workers", "workers serving, per pool", ["pool"], registry=registry)
        self.desired = Gauge("kvrelay_planner_desired_workers", "workers the last decision asked for", ["pool"],
                             registry=registry)
        self.decisions = Counter("kvrelay_planner_decisions", "decisions, by pool and direction",
                                 ["pool", "direction"], registry=registry)
        self.scale_timeouts = Counter("kvrelay_planner_scale_timeouts", "scales not ready within the timeout",
                                      ["pool"], registry=registry)
        self.scale_errors = Counter("kvrelay_planner_scale_errors", "scale requests the connector refused",
                                    registry=registry)
        self.observed_rate = Gauge("kvrelay_planner_request_rate", "observed requests/s of the last interval",
                                   registry=registry)
        self.ttft_p90 = Gauge("kvrelay_planner_ttft_p90_seconds", "observed TTFT p90 of the last interval",
                              registry=registry)
        self.itl_p90 = Gauge("kvrelay_planner_itl_p90_seconds", "observed ITL p90 of the last interval",
                             registry=registry)
        self.intervals = Counter("kvrelay_planner_intervals", "planning intervals run", registry=registry)

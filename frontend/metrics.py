"""Frontend Prometheus metrics (on the service's own registry; no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("kvrelay_frontend_requests", "HTTP API requests by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.inflight = Gauge("kvrelay_frontend_inflight_requests", "requests being served", registry=registry)
        self.ttft = Histogram("kvrelay_frontend_ttft_seconds", "time to first token", buckets=_LATENCY,
                              registry=registry)
        self.itl = Histogram("kvrelay_frontend_itl_seconds", "time between streamed outputs", buckets=_ITL,
                             registry=registry)
        self.e2e = Histogram("kvrelay_frontend_request_seconds", "request duration", buckets=_LATENCY,
                             registry=registry)
        self.prompt_tokens = Counter("kvrelay_frontend_prompt_tokens", "prompt tokens", registry=registry)
        self.cached_tokens = Counter("kvrelay_frontend_cached_prompt_tokens", "prompt tokens served from cache",
                                     registry=registry)
        self.completion_tokens = Counter("kvrelay_frontend_completion_tokens", "generated tokens",
                                         registry=registry)

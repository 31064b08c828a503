"""Frontend Prometheus metrics (on the service's own registry; no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Steps of at most ~1.33x from 0.1 s up: a p99 read from the buckets is then within ~15% of the true one.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10,
            15, 20, 30, 45, 60, 90, 120)
# Steps of at most ~1.25x from 10 ms to 100 ms, where ITL targets sit (a planner's 40 ms target could not
# be told from 26 or 49 ms with 25/50 ms buckets, so the load policy kept adding workers).
_ITL = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045,
        0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1, 2)


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("kvrelay_frontend_requests", "HTTP API requests by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.inflight = Gauge("kvrelay_frontend_inflight_requests", "requests being served", registry=registry)
        # TTFT, queue time and request duration all start when the request arrives (before its body is
        # read): what a client waits for includes the frontend's own backlog.
        self.ttft = Histogram("kvrelay_frontend_ttft_seconds", "time to first token, from arrival",
                              buckets=_LATENCY, registry=registry)
        self.queue = Histogram("kvrelay_frontend_queue_seconds", "time from arrival until the request is "
                               "handed to a worker (body read, tokenized, routed)", buckets=_LATENCY,
                               registry=registry)
        self.itl = Histogram("kvrelay_frontend_itl_seconds", "time between streamed outputs", buckets=_ITL,
                             registry=registry)
        self.e2e = Histogram("kvrelay_frontend_request_seconds", "request duration, from arrival", buckets=_LATENCY,
                             registry=registry)
        self.prompt_tokens = Counter("kvrelay_frontend_prompt_tokens", "prompt tokens", registry=registry)
        self.cached_tokens = Counter("kvrelay_frontend_cached_prompt_tokens", "prompt tokens served from cache",
                                     registry=registry)
        self.completion_tokens = Counter("kvrelay_frontend_completion_tokens", "generated tokens",
                                         registry=registry)

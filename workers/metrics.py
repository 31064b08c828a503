"""A worker's Prometheus metrics: the engine's load and cache counters and, per KV tier, capacity, use,
hits, misses, evictions and the bytes/seconds moved between G1 and the tier.

Read from `engine.stats()` at scrape time (a custom collector: nothing to keep in sync on the hot path).
Served on `--metrics-port` (0 = any free port; the address is published in discovery as the instance
label `metrics`; -1 = off). With `--metrics-api-key` (`kvrelay serve` passes its `--api-key`) a scrape
needs `Authorization: Bearer <key>` (401 otherwise): per-worker load and cache detail is not for anyone.
"""

from __future__ import annotations

import hmac
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from kvrelay.workers.core.kv_sources.peer_pull_stats import PULL_SECONDS_BUCKETS
from kvrelay.workers.protocol import Engine

_ENGINE_GAUGES = {
    "running": "sequences running", "waiting": "sequences waiting", "used_blocks": "G1 blocks in use",
    "total_blocks": "G1 blocks", "held_requests": "prefill role: handles whose blocks wait to be pulled",
    "offload_pinned": "G1 blocks pinned while being copied to lower tiers",
}
_PEER_GAUGES = {"lease_pinned": "G1 blocks pinned now for peers' pulls (the cluster KV pool)",
                "pulls_in_flight": "peer asks and pulls holding this worker's pull budget now"}
_PEER_COUNTERS = {
    "asked": "requests that asked a peer to lend a prompt prefix", "pulled_blocks": "blocks pulled from peers",
    "pull_failures": "peer pulls that did not deliver (recomputed)",
    "fallbacks": "peer asks that got less than asked (evicted or gone): recomputed",
    "followed": "requests that waited for another request's pull of the same blocks instead of asking",
    "lent_blocks": "blocks this worker lent to peers' pulls",
    "lent_from_g2": "of the blocks lent, those loaded from G2 into G1 to be lent",
    "verify_failures": "pulled blocks whose bytes did not match the lender's checksum (recomputed, never served)",
    "pulled_bytes": "bytes of KV pulled from peers and kept",
    "budget_refusals": "peer asks not made: the pull budget (--kv-peer-max-pulls/-bytes) was spent (recomputed)",
}
_ENGINE_COUNTERS = {
    "prefix_hit_tokens": "prompt tokens served from cache (G1 hits and onboarded blocks)",
    "prompt_tokens": "prompt tokens received", "generated_tokens": "tokens generated",
    "preemptions": "sequences preempted (recomputed later)",
    "onboarded_blocks": "blocks loaded from lower tiers instead of recomputed",
    "reonboarded_blocks": "blocks of preempted requests loaded back from lower tiers",
    "offload_skipped": "blocks evicted from G1 before they could be offloaded",
    "pulled_blocks": "decode role: blocks pulled from prefill workers",
    "pull_failures": "decode role: KV handles recomputed instead of pulled",
}
_TIER_GAUGES = {
    "capacity_bytes": "hard bound on the tier's footprint", "footprint_bytes": "bytes the tier occupies",
    "used_bytes": "bytes of blocks held", "blocks": "blocks held", "enabled": "1 if the tier is serving",
}
_TIER_COUNTERS = {
    "hits": "blocks found", "misses": "blocks not found (or found corrupt)", "evictions": "blocks evicted",
    "rejected_puts": "blocks not stored (no room, not admitted, or tier disabled)",
    "checksum_failures": "blocks whose bytes failed verification (a miss, never served)",
    "errors": "I/O errors (each disables the tier)",
    "onboard_blocks": "blocks loaded into G1", "onboard_bytes": "bytes loaded into G1",
    "onboard_seconds": "seconds spent loading into G1", "offload_blocks": "blocks copied from G1",
    "offload_bytes": "bytes copied from G1", "offload_seconds": "seconds spent copying from G1",
}


class WorkerCollector(Collector):
    def __init__(self, engine: Engine, worker_id: str):
        self.engine, self.worker_id = engine, worker_id

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        s = self.engine.stats()
        for name, doc in _ENGINE_GAUGES.items():
            g = GaugeMetricFamily(f"kvrelay_worker_{name}", doc, labels=["worker"])
            g.add_metric([self.worker_id], getattr(s, name))
            yield g
        for name, doc in _ENGINE_COUNTERS.items():
            c = CounterMetricFamily(f"kvrelay_worker_{name}", doc, labels=["worker"])
            c.add_metric([self.worker_id], getattr(s, name))
            yield c
        for name, doc in _PEER_GAUGES.items():
            g = GaugeMetricFamily(f"kvrelay_kv_peer_{name}", doc, labels=["worker"])
            g.add_metric([self.worker_id], getattr(s, f"peer_{name}"))
            yield g
        for name, doc in _PEER_COUNTERS.items():
            c = CounterMetricFamily(f"kvrelay_kv_peer_{name}", doc, labels=["worker"])
            c.add_metric([self.worker_id], getattr(s, f"peer_{name}"))
            yield c
        yield _pull_seconds(self.worker_id, s.peer_pull_seconds_buckets, s.peer_pull_seconds_sum)
        for name, doc in _TIER_GAUGES.items():
            g = GaugeMetricFamily(f"kvrelay_kv_tier_{name}", doc, labels=["worker", "tier"])
            for t in s.tiers:
                g.add_metric([self.worker_id, t.tier], float(getattr(t, name)))
            yield g
        for name, doc in _TIER_COUNTERS.items():
            c = CounterMetricFamily(f"kvrelay_kv_tier_{name}", doc, labels=["worker", "tier"])
            for t in s.tiers:
                c.add_metric([self.worker_id, t.tier], float(getattr(t, name)))
            yield c


def _pull_seconds(worker_id: str, counts: list[int], total: float) -> HistogramMetricFamily:
    """`kvrelay_kv_peer_pull_seconds`: from per-bucket counts (peer_pull_stats.py) to Prometheus'
    cumulative buckets."""
    h = HistogramMetricFamily("kvrelay_kv_peer_pull_seconds", "seconds each pull of a peer's blocks took "
                              "(from the transfer's start to its last byte, verification included)",
                              labels=["worker"])
    counts = counts or [0] * (len(PULL_SECONDS_BUCKETS) + 1)
    bounds = [*(f"{b:g}" for b in PULL_SECONDS_BUCKETS), "+Inf"]
    running, buckets = 0, []
    for bound, n in zip(bounds, counts, strict=True):
        running += n
        buckets.append((bound, running))
    h.add_metric([worker_id], buckets, total)
    return h


class MetricsServer:
    """The /metrics HTTP endpoint (prometheus_client's threaded server, on its own registry)."""

    def __init__(self, engine: Engine, worker_id: str, api_key: str = ""):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerCollector(engine, worker_id))
        self.api_key = api_key
        self._server: ThreadingWSGIServer | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        app = make_wsgi_app(self.registry)
        if self.api_key:
            app = _bearer(app, self.api_key)
        server_class = _Ipv6Server if ":" in host else ThreadingWSGIServer
        server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self._server = server
        threading.Thread(target=server.serve_forever, name="kvrelay-metrics", daemon=True).start()
        self.port = server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Ipv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per scrape is noise
        pass


_DENIED = b'{"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", ' \
          b'"param": null, "code": "invalid_api_key"}}'


def _bearer(app: Callable, key: str) -> Callable:
    """`app` behind `Authorization: Bearer <key>` (compared in constant time)."""
    expected = key.encode()

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if hmac.compare_digest(token.encode(), expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(_DENIED)))])
        return [_DENIED]

    return guarded

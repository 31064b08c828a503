"""Frontend configuration: flags `--foo-bar` / env `KVRELAY_FOO_BAR` (see runtime/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from kvrelay.runtime.auth import read_secret_file
from kvrelay.runtime.config import non_negative, positive, setting


def _below_one(value: float) -> str | None:
    return None if 0 <= value < 1 else f"must be >= 0 and < 1, got {value}"


@dataclass(frozen=True)
class FrontendConfig:
    group_title = "frontend (HTTP API, routing, disaggregation)"
    http_host: str = setting("127.0.0.1", "HTTP listen address")
    http_port: int = setting(8000, "HTTP listen port", lambda p: None if 0 <= p <= 65535 else "must be a TCP port")
    namespace: str = setting("default", "deployment namespace")
    router_mode: Literal["kv", "round-robin", "random", "least-loaded"] = setting("kv", "how to pick a worker")
    router_cost: Literal["ttft", "overlap"] = setting(
        "ttft", "kv router: ttft = lowest expected time to first token (queued prefill + uncached prefill + "
        "onboarding, frontend/README.md); overlap = the older overlap_weight * uncached blocks + active blocks")
    # 2.0 measured best on the multi-turn routing-quality workload (tests/frontend/test_routing_quality.py).
    overlap_weight: float = setting(2.0, "kv router, --router-cost overlap: weight of uncached prefill blocks "
                                    "against decode load", non_negative)
    router_speculative_ttl: float = setting(10.0, "kv router: seconds a routed prompt's blocks count as held by "
                                            "its worker before KV events confirm them (0 = off)", non_negative)
    router_balance: float = setting(2.0, "kv router, --router-cost ttft: each in-flight request a worker has "
                                    "beyond 1.5x the mean + 2 costs this many mean prefills (0 = off)",
                                    non_negative)
    # 0.8: a pull moves a block's KV in well under a fifth of its prefill time (perf/RESULTS.md "Cluster KV
    # pool"); the rest of the credit covers the lease round trip.
    router_peer_weight: float = setting(0.8, "kv router: credit for a prefix block another worker holds in G1, "
                                        "which the chosen worker pulls instead of computing (the cluster KV "
                                        "pool; 0 = off; below 1: G1 of its own is best)", _below_one)
    router_prefill_rate: float = setting(20000.0, "kv router: prior prefill rate, tokens/s, until first-token "
                                         "times give a worker's own", positive)
    lower_tier_weight: float = setting(0.5, "kv router: credit for a prefix block a worker holds in G2/G3 "
                                       "instead of G1 (0 = ignore lower tiers; G1 = 1)", non_negative)
    router_temperature: float = setting(0.0, "kv router: softmax temperature (0 = pick the lowest cost)",
                                        non_negative)
    migration_limit: int = setting(3, "times a request may move to another worker after its worker died",
                                   non_negative)
    api_key: str = setting("", "require this bearer token on /v1 requests, /metrics, the planner's control "
                           "port and the workers' /metrics (empty = no auth; prefer env KVRELAY_API_KEY or "
                           "--api-key-file: argv is visible to other users)")
    api_key_file: str = setting("", "read the API key from this file's first line (wins over --api-key)")
    # 30 s: engine steps take milliseconds on a GPU and well under 30 s on CPU (a full 2,048-token chunk);
    # a request queued at a busy worker is not a stall: that worker keeps reporting load (stream_watch.py).
    worker_stall_timeout: float = setting(30.0, "seconds without output on a worker stream, from a worker that "
                                          "also stopped reporting load, after which the worker counts as "
                                          "failed and the request moves to another", positive)
    # 15 s: a restarted worker of a role (kvrelay serve's fleet: a few seconds for the mocker, ~6 s for
    # the native engine with a small model) is back within it; requests wait instead of failing meanwhile.
    worker_wait: float = setting(15.0, "seconds a request waits for a worker of its model (of the needed role) "
                                 "to appear, e.g. while the only one restarts; at most 1,024 requests wait, "
                                 "the rest get 503 no_worker at once (0 = fail at once)", non_negative)
    disagg_min_tokens: int = setting(512, "prefill on a prefill worker only when at least this many prompt "
                                     "tokens are not cached on the decode worker", non_negative)
    max_request_bytes: int = setting(8 << 20, "largest accepted HTTP body", positive)
    require_prefill: bool = setting(False, "/ready also waits for a prefill worker of each model (set by "
                                    "`kvrelay serve --prefill-workers N`)")
    access_log: bool = setting(True, "log one line per HTTP request at INFO (method, path, status, model, "
                               "tokens, TTFT, total time; never prompt text); probes at DEBUG")
    drain_timeout: float = setting(30.0, "on SIGTERM: seconds in-flight streams may take to finish before "
                                   "they are ended with an error event", non_negative)

    tool_call_parser: Literal["auto", "hermes"] = setting(
        "auto", "how tool calls are written and parsed (frontend/README.md \"Tool calling\"): auto = picked per "
        "model from its chat template (hermes for templates that write <tool_call> and for those without tool "
        "support, which get hermes-style rendering); hermes = <tool_call>{json}</tool_call>")

    def with_key_file(self) -> FrontendConfig:
        """This config with `api_key` read from `api_key_file` when one is given (ConfigError if unreadable)."""
        if not self.api_key_file:
            return self
        return replace(self, api_key=read_secret_file(self.api_key_file, "--api-key-file"))

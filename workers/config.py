"""Worker configuration: flags `--foo-bar` / env `KVRELAY_FOO_BAR` (see runtime/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvrelay.runtime.config import non_negative, positive, setting


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port (0 = any free port)"


def _metrics_port(value: int) -> str | None:
    return None if -1 <= value <= 65535 else "must be a TCP port, 0 (any free port) or -1 (off)"


def _probability(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


@dataclass(frozen=True)
class WorkerConfig:
    engine: Literal["native", "mocker"] = setting("native", "engine adapter (mocker: simulated, no compute)")
    role: Literal["agg", "prefill", "decode"] = setting("agg", "serving role")
    model: str = setting("", "model directory (Hugging Face layout); empty = the built-in tiny model")
    served_model_name: str = setting("", "name clients use in requests (default: the model's directory name)")
    namespace: str = setting("default", "deployment namespace")
    component: str = setting("backend", "discovery component this worker registers under")
    host: str = setting("127.0.0.1", "request-plane listen address")
    port: int = setting(0, "request-plane listen port (0 = any free port)", _port)
    advertise_host: str = setting("", "address peers use to reach this worker (default: --host)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", "weights and KV dtype")
    device: str = setting("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    block_size: int = setting(16, "tokens per KV block", positive)
    kv_cache_bytes: int = setting(256 << 20, "bytes of the G1 KV pool", positive)
    max_num_batched_tokens: int = setting(2048, "token budget of one engine step", positive)
    max_num_seqs: int = setting(64, "most sequences running at once", positive)
    max_waiting: int = setting(1024, "waiting-queue bound; more is rejected as busy", positive)
    max_model_len: int = setting(0, "context length (0 = the model's)", non_negative)
    metrics_port: int = setting(0, "Prometheus /metrics port (0 = any free port, published in discovery "
                                "as label 'metrics'; -1 = off)", _metrics_port)
    load_interval: float = setting(0.5, "seconds between load-metric publications", positive)
    drain_timeout: float = setting(30.0, "on SIGTERM: seconds requests in flight may take to finish after "
                                   "the worker left discovery (the rest fail over to other workers)", non_negative)
    kv_transfer: Literal["auto", "nixl", "tcp", "none"] = setting(
        "auto", "prefill/decode roles: KV transport (auto = NIXL, TCP fallback if NIXL fails; none = no "
        "handoff, decode workers prefill locally)")
    kv_lease_s: float = setting(30.0, "prefill role: seconds a computed prompt's blocks wait to be pulled",
                                positive)
    # Lower KV tiers (native engine; kvbm/README.md). Sizes take units: 512MiB, 4GiB.
    kv_host_bytes: int = setting(512 << 20, "G2: bytes of host memory for KV blocks (0 = no G2)",
                                 non_negative)
    kv_disk_dir: str = setting("auto", "G3: base directory for KV blocks on local disk (auto = "
                               "$KVRELAY_CACHE_DIR/kv, default ~/.cache/kvrelay/kv; off = no G3)")
    kv_disk_bytes: int = setting(4 << 30, "G3: bytes of disk (data file + index) per worker", positive)
    kv_object_store: str = setting("", "G4: s3://bucket[/prefix]?endpoint=URL or file:///path (empty = "
                                   "no G4; credentials from AWS_* variables)")
    kv_object_bytes: int = setting(16 << 30, "G4: bound on the bytes of objects this worker writes", positive)
    kv_tier_policy: Literal["lru", "tinylfu"] = setting("lru", "eviction/admission policy of G2-G4")
    kv_offload: Literal["write-back", "write-through"] = setting(
        "write-back", "copy G1 blocks down when they become evictable (write-back) or when computed "
        "(write-through)")
    kv_onboard: Literal["cost", "always"] = setting(
        "cost", "load a lower-tier hit only when the measured cost model says it beats recompute, or always")
    # --engine mocker only (workers/engines/mocker/README.md); defaults equal MockerConfig's.
    mocker_speedup: float = setting(1.0, "mocker: divide simulated times by this (0 = never sleep)",
                                    non_negative)
    mocker_num_blocks: int = setting(16384, "mocker: KV blocks in the simulated pool", positive)
    mocker_prefill_us_per_token: float = setting(20.0, "mocker: prefill cost per new token (us)",
                                                 non_negative)
    mocker_prefill_us_per_token_pair: float = setting(0.0005, "mocker: attention cost per (new token, "
                                                      "attended token) pair (us)", non_negative)
    mocker_decode_base_ms: float = setting(5.0, "mocker: fixed cost of a step with decodes (ms)",
                                           non_negative)
    mocker_decode_us_per_seq: float = setting(20.0, "mocker: decode cost per sequence (us)", non_negative)
    mocker_decode_us_per_kv_block: float = setting(0.6, "mocker: decode cost per KV block read (us)",
                                                   non_negative)
    mocker_transfer_gbps: float = setting(100.0, "mocker: simulated KV transfer bandwidth (Gbit/s)",
                                          positive)
    mocker_eos_probability: float = setting(0.0, "mocker: chance per token of EOS unless ignore_eos",
                                            _probability)
    mocker_seed: int = setting(0, "mocker: seed of the generated tokens (equal on every worker)")

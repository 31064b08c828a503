"""What one `kvrelay bench run` does: a msgspec Struct (it is written into the result JSON) and its checks.

Bench settings are flags only: unlike `serve`, they are not read from `KVRELAY_*` environment variables,
so a serving environment (`KVRELAY_MODEL`, `KVRELAY_BLOCK_SIZE`, ...) never changes a benchmark.
Invalid values raise `ConfigError` naming the flag; the CLI prints one line and exits 2.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import msgspec

from kvrelay.runtime.config import ConfigError

Workload = Literal["random", "prefix", "multi-turn", "long-doc", "trace"]
WORKLOADS: tuple[str, ...] = ("random", "prefix", "multi-turn", "long-doc", "trace")
ARRIVALS: tuple[str, ...] = ("auto", "closed", "poisson", "gamma", "trace")
SLO_KEYS: tuple[str, ...] = ("ttft", "itl", "tpot", "e2e")


class BenchConfig(msgspec.Struct, kw_only=True):
    url: str = "http://127.0.0.1:8000"
    model: str = ""  # "" = the first model the endpoint lists at GET /v1/models
    endpoint: Literal["completions", "chat"] = "completions"
    prompt_format: Literal["tokens", "text"] = "tokens"
    tokenizer: str = ""  # a directory holding tokenizer.json, or a kvrelay model name
    workload: Workload = "random"
    seed: int = 0
    num_requests: int | None = None  # None: the workload's natural size (see workloads.natural_size)
    duration: float | None = None  # seconds of dispatching measured requests
    warmup: int = 0
    concurrency: int | None = None  # closed loop: workers (default 1); open loop: cap on in flight
    request_rate: float | None = None  # requests/s; math.inf sends everything at once
    burstiness: float = 1.0  # gamma shape: 1 = Poisson, < 1 burstier, > 1 smoother
    arrivals: str = "auto"
    input_len: int = 128  # random: prompt; prefix: suffix; multi-turn: user turn; long-doc: question
    output_len: int = 64
    range_ratio: float = 0.0  # random lengths uniform in [L*(1-r), L*(1+r)]
    num_prefixes: int = 4
    prefix_len: int = 512
    suffixes_per_prefix: int = 8
    users: int = 8
    turns: int = 4
    system_len: int = 0  # multi-turn: a system prompt every user shares (0: none)
    long_users: int = 0  # multi-turn: the first this many users of each wave write turns long_factor x longer
    long_factor: int = 1
    num_docs: int = 4
    doc_len: int = 2048
    questions_per_doc: int = 8
    hot_doc_share: float = 0.0  # long-doc: share of questions about document 0 (0: every document alike)
    trace: str = ""
    block_size: int = 512  # tokens per trace hash_id (Mooncake traces use 512)
    trace_speedup: float = 1.0
    slo: dict[str, float] = {}  # milliseconds
    ignore_eos: bool = True
    extra_body: dict[str, Any] = {}
    timeout: float = 600.0

    def arrival_mode(self) -> str:
        """The arrival process actually used once `auto` is resolved."""
        if self.arrivals != "auto":
            return self.arrivals
        if self.workload == "trace" and self.request_rate is None:
            return "trace"
        if self.request_rate is None:
            return "closed"
        return "poisson" if self.burstiness == 1.0 else "gamma"


def parse_slo(text: str) -> dict[str, float]:
    """'ttft=200,itl=20' -> {'ttft': 200.0, 'itl': 20.0}, in ms; values may end in 'ms' or 's'."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        key, raw = key.strip(), raw.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ConfigError(f"--slo: expected KEY=MS[,KEY=MS] with KEY in {', '.join(SLO_KEYS)}, got {text!r}")
        scale = 1.0
        if raw.endswith("ms"):
            raw = raw[:-2]
        elif raw.endswith("s"):
            raw, scale = raw[:-1], 1000.0
        try:
            value = float(raw) * scale
        except ValueError:
            raise ConfigError(f"--slo: {key}: expected a number of ms, got {part!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--slo: {key}: must be > 0, got {part!r}")
        out[key] = value
    return out


def parse_extra_body(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--extra-body: not JSON ({e.msg}), got {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--extra-body: expected a JSON object, got {text!r}")
    return value


def _require(ok: bool, flag: str, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{flag}: {problem}, got {value!r}")


def validate(cfg: BenchConfig) -> BenchConfig:
    """Raise ConfigError (naming the flag) for the first invalid setting; return cfg."""
    _require(cfg.url.startswith(("http://", "https://")), "--url", "must start with http:// or https://", cfg.url)
    for flag, value in (("--input-len", cfg.input_len), ("--output-len", cfg.output_len),
                        ("--num-prefixes", cfg.num_prefixes), ("--prefix-len", cfg.prefix_len),
                        ("--suffixes-per-prefix", cfg.suffixes_per_prefix), ("--users", cfg.users),
                        ("--turns", cfg.turns), ("--num-docs", cfg.num_docs), ("--doc-len", cfg.doc_len),
                        ("--questions-per-doc", cfg.questions_per_doc), ("--block-size", cfg.block_size),
                        ("--long-factor", cfg.long_factor)):
        _require(value >= 1, flag, "must be >= 1", value)
    if cfg.num_requests is not None:
        _require(cfg.num_requests >= 1, "--num-requests", "must be >= 1", cfg.num_requests)
    if cfg.concurrency is not None:
        _require(cfg.concurrency >= 1, "--concurrency", "must be >= 1", cfg.concurrency)
    if cfg.duration is not None:
        _require(cfg.duration > 0 and math.isfinite(cfg.duration), "--duration", "must be > 0", cfg.duration)
    if cfg.request_rate is not None:
        _require(cfg.request_rate > 0, "--request-rate", "must be > 0 (or inf)", cfg.request_rate)
    _require(cfg.warmup >= 0, "--warmup", "must be >= 0", cfg.warmup)
    _require(0.0 <= cfg.hot_doc_share <= 1.0, "--hot-doc-share", "must be in [0, 1]", cfg.hot_doc_share)
    _require(0 <= cfg.long_users <= cfg.users, "--long-users", "must be in [0, --users]", cfg.long_users)
    _require(cfg.system_len >= 0, "--system-len", "must be >= 0", cfg.system_len)
    _require(cfg.burstiness > 0 and math.isfinite(cfg.burstiness), "--burstiness", "must be > 0", cfg.burstiness)
    _require(0 <= cfg.range_ratio < 1, "--range-ratio", "must be in [0, 1)", cfg.range_ratio)
    _require(cfg.trace_speedup > 0, "--trace-speedup", "must be > 0", cfg.trace_speedup)
    _require(cfg.timeout > 0, "--timeout", "must be > 0", cfg.timeout)
    _require(cfg.arrivals in ARRIVALS, "--arrivals", f"must be one of {', '.join(ARRIVALS)}", cfg.arrivals)
    mode = cfg.arrival_mode()
    if mode in ("poisson", "gamma"):
        _require(cfg.request_rate is not None, "--arrivals", f"{mode} needs --request-rate", mode)
    if mode == "trace":
        _require(cfg.workload == "trace", "--arrivals", "trace timestamps need --workload trace", mode)
    if mode == "closed":
        _require(cfg.request_rate is None, "--request-rate", "has no effect with --arrivals closed",
                 cfg.request_rate)
    if cfg.workload == "trace":
        _require(bool(cfg.trace) and os.path.isfile(cfg.trace), "--trace", "must name a Mooncake JSONL file",
                 cfg.trace)
    _require(not (cfg.prompt_format == "tokens" and cfg.endpoint == "chat"), "--prompt-format",
             "tokens needs --endpoint completions (chat messages are text)", cfg.prompt_format)
    if os.sep in cfg.tokenizer:  # a directory; a bare word is a model name, resolved by `kvrelay bench`
        _require(os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")), "--tokenizer",
                 "must be a directory holding tokenizer.json", cfg.tokenizer)
    return cfg

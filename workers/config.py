"""Worker configuration: flags `--foo-bar` / env `KVRELAY_FOO_BAR` (see runtime/config.py).

`WorkerConfig` is flat (`cfg.kv_host_bytes`) but composed of groups, each its own heading in `--help`
and each the one place its flags are declared: the process (`ProcessSettings`), the engine
(`EngineSettings`), transfer (`TransferSettings`), the lower KV tiers (`KvTierSettings`) and the mocker
(`MockerSettings`, derived from `MockerConfig`'s own fields). `kvrelay serve` passes `SERVE_GROUPS`
through to its workers and decides the process settings itself.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.runtime.config import non_negative, positive, setting
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.mocker.config import WORKER_SETTINGS, MockerConfig
from kvrelay.workers.models.registry import DEFAULT_MODEL


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a TCP port (0 = any free port)"


def _metrics_port(value: int) -> str | None:
    return None if -1 <= value <= 65535 else "must be a TCP port, 0 (any free port) or -1 (off)"


@dataclass(frozen=True)
class ProcessSettings:
    group_title = "worker process"
    role: Literal["agg", "prefill", "decode"] = setting("agg", "serving role")
    namespace: str = setting("default", "deployment namespace")
    component: str = setting("backend", "discovery component this worker registers under")
    host: str = setting("127.0.0.1", "request-plane listen address")
    port: int = setting(0, "request-plane listen port (0 = any free port)", _port)
    advertise_host: str = setting("", "address peers use to reach this worker (default: --host)")
    metrics_port: int = setting(0, "Prometheus /metrics port (0 = any free port, published in discovery "
                                "as label 'metrics'; -1 = off)", _metrics_port)
    metrics_api_key: str = setting("", "bearer key required on /metrics (empty = open; kvrelay serve passes its "
                                   "--api-key; prefer env KVRELAY_METRICS_API_KEY: argv is visible to others)")
    load_interval: float = setting(0.5, "seconds between load-metric publications", positive)
    drain_timeout: float = setting(30.0, "on SIGTERM: seconds requests in flight may take to finish after "
                                   "the worker left discovery (the rest fail over to other workers)", non_negative)


@dataclass(frozen=True)
class EngineSettings:
    group_title = "engine"
    engine: Literal["native", "vllm", "mocker"] = setting(
        "native", "engine adapter (vllm: vLLM's AsyncLLM, needs the vllm extra; mocker: simulated, no compute)")
    model: str = setting(DEFAULT_MODEL, "smollm2-135m-instruct (packaged GGUF), tiny (built-in random "
                         "Llama), a .gguf file, or a Hugging Face model directory")
    served_model_name: str = setting("", "name clients use in requests (default: the model's directory name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", "weights and KV dtype")
    device: str = setting("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    kv_cache_bytes: int = setting(0, "bytes of the G1 KV pool (0 = room for 16384 tokens of the model, "
                                  "at least 256MiB)", non_negative)


def _derived_settings(name: str, source: type, title: str, prefix: str = "", names: tuple[str, ...] = (),
                      label: str = "") -> type:
    """A settings group whose fields are `source`'s own (`prefix` + name), with their defaults, help and
    checks (help lines start with `label: ` when one is given): the flags of a group that another
    package declares, declared once there."""
    fields = {f.name: f for f in dataclasses.fields(source)}
    hints = typing.get_type_hints(source)
    spec: list[tuple[str, Any, Any]] = [
        (prefix + n, hints[n], setting(fields[n].default, (f"{label}: " if label else "")
                                       + fields[n].metadata["help"], fields[n].metadata["check"]))
        for n in (names or tuple(fields))]
    cls = dataclasses.make_dataclass(name, spec, frozen=True, namespace={"group_title": title})
    cls.__module__ = __name__
    return cls


# The engine limits (block size, step budget, sequences, waiting bound, context), from EngineLimits.
EngineLimitSettings = _derived_settings("EngineLimitSettings", EngineLimits, "engine limits")


@dataclass(frozen=True)
class TransferSettings:
    group_title = "KV transfer (prefill/decode handoff, peer pulls)"
    kv_transfer: Literal["auto", "nixl", "tcp", "none"] = setting(
        "auto", "KV transport between workers (auto = NIXL, TCP fallback if NIXL fails; none = no handoff "
        "and no peer pulls: decode workers prefill locally)")
    kv_lease_s: float = setting(30.0, "seconds computed blocks wait to be pulled (a prefill's handle, a "
                                "peer's lease)", positive)
    kv_peer_pull: bool = setting(True, "cluster KV pool: pull a prompt prefix that another worker holds "
                                 "(the router names it) instead of computing it, and lend this worker's "
                                 "blocks to peers (needs --kv-transfer other than none)")
    kv_peer_max_pulls: int = setting(4, "cluster KV pool: peer asks and pulls in flight at once on this worker; "
                                     "a request over the bound computes its prompt instead", non_negative)
    kv_peer_max_bytes: int = setting(256 << 20, "cluster KV pool: bytes of KV that this worker's peer pulls in "
                                     "flight may bring at once (a request over it computes its prompt; one "
                                     "pull alone is always allowed)", positive)


@dataclass(frozen=True)
class VllmSettings:
    group_title = "vLLM (--engine vllm; workers/engines/vllm/README.md)"
    vllm_args: str = setting("", "more vLLM engine flags, shell-quoted, parsed by vLLM's own parser "
                             "(e.g. '--enforce-eager --gpu-memory-utilization 0.8')")


# mocker_<name> for each of MockerConfig's WORKER_SETTINGS.
MockerSettings = _derived_settings("MockerSettings", MockerConfig,
                                   "mocker (--engine mocker; workers/engines/mocker/README.md)", "mocker_",
                                   WORKER_SETTINGS, label="mocker")

# kv_<field> for each of kvbm's TierConfig fields: the lower tiers' flags.
KvTierSettings = _derived_settings("KvTierSettings", TierConfig,
                                   "lower KV tiers G2/G3/G4 (kvbm/README.md; sizes take units: 512MiB, 4GiB)",
                                   "kv_")


@dataclass(frozen=True)
class WorkerConfig(ProcessSettings, EngineSettings, EngineLimitSettings, TransferSettings, KvTierSettings, VllmSettings, MockerSettings):  # type: ignore[misc, valid-type]  # groups built by make_dataclass
    """Every worker setting, flat; `--help` shows one heading per group."""

    def tiers(self) -> TierConfig:
        return TierConfig(**{f.name: getattr(self, f"kv_{f.name}") for f in dataclasses.fields(TierConfig)})

    def limits(self) -> EngineLimits:
        return EngineLimits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineLimits)})

    def mocker_config(self, model_dir: str) -> MockerConfig:
        """The mocker engine's config: the engine limits plus the mocker group."""
        return MockerConfig(model=model_dir, limits=self.limits(),
                            **{name: getattr(self, f"mocker_{name}") for name in WORKER_SETTINGS})


SERVE_GROUPS = (EngineSettings, EngineLimitSettings, TransferSettings, KvTierSettings, VllmSettings, MockerSettings)  # passed through by serve

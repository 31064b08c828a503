"""`VllmEngineConfig`: what a kvrelay worker asks of vLLM, turned into vLLM's own `AsyncEngineArgs`.

kvrelay's engine flags map onto vLLM's (`--block-size`, `--max-num-seqs`, `--max-num-batched-tokens`,
`--max-model-len`, `--dtype`, `--kv-cache-bytes` -> `--kv-cache-memory-bytes`); anything else goes
through `--vllm-args` verbatim and is parsed by vLLM's own argument parser, so every vLLM flag works and
a bad one fails with vLLM's message. kvrelay always sets the KV-event publisher (its router needs it),
prefix caching on, and, for prefill/decode roles, the NixlConnector.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from kvrelay.kvbm.g1_sizing import DEFAULT_G1_MIN_BYTES, DEFAULT_G1_TOKENS
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.core.limits import EngineLimits

KV_EVENTS_TOPIC = "kv"
TIER_CONNECTOR_MODULE = "kvrelay.workers.engines.vllm.tier_connector"
CPU_BLOCK_SIZE_MULTIPLE = 32  # vLLM's CPU attention backend takes block sizes that are multiples of 32


@dataclass(frozen=True)
class VllmEngineConfig:
    model: str
    role: str = "agg"  # agg | prefill | decode
    dtype: str = "auto"
    device: str = "cpu"
    # kvrelay's engine limits, taken whole (max_model_len 0 = the model's); the block size must suit vLLM's
    # backend (on CPU a multiple of CPU_BLOCK_SIZE_MULTIPLE: build.py picks it).
    limits: EngineLimits = EngineLimits(block_size=CPU_BLOCK_SIZE_MULTIPLE)
    kv_cache_bytes: int = 0  # 0 = room for DEFAULT_G1_TOKENS tokens, at least DEFAULT_G1_MIN_BYTES
    kv_lease_s: float = 30.0  # prefill role: how long vLLM keeps a prompt's blocks for the decode side
    host: str = "127.0.0.1"  # prefill role: where the NIXL side channel listens
    extra_args: str = ""  # --vllm-args
    guard_orphans: bool = False  # a worker process: vLLM's processes die with it (orphan_guard.py)
    socket_dir: str = ""  # the engine's private directory: KV-event sockets (ipc://), logging config
    tiers: TierConfig | None = None  # kvrelay's G2/G3/G4 through KvrelayTierConnector (tier_connector.py)
    fingerprint: str = ""  # kvrelay's block identity root (set at start, from the model directory)
    pool: Any = None  # peer_pool.PoolSettings: the cluster KV pool through the tier connector; None = off

    def event_endpoints(self) -> tuple[str, str]:
        return f"ipc://{self.socket_dir}/kv-events", f"ipc://{self.socket_dir}/kv-replay"

    def cli_args(self, kv_bytes_per_token: int) -> list[str]:
        """vLLM command-line arguments for this worker (kvrelay's settings first, --vllm-args last)."""
        kv_bytes = self.kv_cache_bytes or max(DEFAULT_G1_MIN_BYTES, DEFAULT_G1_TOKENS * kv_bytes_per_token)
        lim = self.limits
        args = ["--model", self.model, "--block-size", str(lim.block_size), "--max-num-seqs",
                str(lim.max_num_seqs), "--max-num-batched-tokens", str(lim.max_num_batched_tokens),
                "--kv-cache-memory-bytes", str(kv_bytes), "--enable-prefix-caching"]
        if self.dtype != "auto":
            args += ["--dtype", self.dtype]
        if lim.max_model_len:
            args += ["--max-model-len", str(lim.max_model_len)]
        return args + shlex.split(self.extra_args)

    def kv_events_config(self) -> dict[str, Any]:
        pub, replay = self.event_endpoints()
        return {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": pub, "replay_endpoint": replay,
                "topic": KV_EVENTS_TOPIC}

    def kv_transfer_config(self) -> dict[str, Any] | None:
        """vLLM's connector: none (agg, no tiers), NIXL (prefill/decode), kvrelay's tiers, or both through
        vLLM's MultiConnector (NIXL first: a request with a remote prefill loads over NIXL, any other from
        the tiers). A block that fails to load is recomputed ("recompute"), never a failed request."""
        nixl = {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                "kv_buffer_device": "cpu" if self.device == "cpu" else "cuda",
                "kv_connector_extra_config": {"kv_lease_duration": max(1, round(self.kv_lease_s))}}
        tiers = None
        if self.tiers is not None and self.tiers.any:
            from kvrelay.workers.engines.vllm.tier_runtime import TierSettings

            settings = TierSettings(key=self.socket_dir, fingerprint=self.fingerprint, block_size=self.limits.block_size,
                                    tiers=self.tiers, pool=self.pool)
            tiers = {"kv_connector": "KvrelayTierConnector", "kv_role": "kv_both",
                     "kv_connector_module_path": TIER_CONNECTOR_MODULE,
                     "kv_connector_extra_config": {"kvrelay": settings.to_extra()}}
        if self.role == "agg":
            return None if tiers is None else {**tiers, "kv_load_failure_policy": "recompute"}
        if tiers is None:
            return nixl
        return {"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_buffer_device": nixl["kv_buffer_device"],
                "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"connectors": [nixl, tiers]}}


def register_tier_connector() -> None:
    """Make `KvrelayTierConnector` known to vLLM's connector registry by name (idempotent)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if "KvrelayTierConnector" not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector("KvrelayTierConnector", TIER_CONNECTOR_MODULE, "KvrelayTierConnector")


def engine_args(cfg: VllmEngineConfig, kv_bytes_per_token: int) -> Any:
    """vLLM's `AsyncEngineArgs`, parsed by vLLM's own parser (its errors name its flags)."""
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="kvrelay worker --vllm-args"))
    ns = parser.parse_args(cfg.cli_args(kv_bytes_per_token))
    args = AsyncEngineArgs.from_cli_args(ns)
    args.kv_events_config = KVEventsConfig(**cfg.kv_events_config())
    transfer = cfg.kv_transfer_config()
    if transfer is not None and transfer["kv_connector"] == "MultiConnector":
        register_tier_connector()  # MultiConnector's stats look their children up by name, in this process
    if transfer is not None:
        args.kv_transfer_config = KVTransferConfig(**transfer)
    return args

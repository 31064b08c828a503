"""Finding NIXL's Python API, and the per-block descriptor rows a pool is prepared with."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import numpy as np

from kvrelay.transfer.metadata import PoolDesc

NIXL_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")


def load_nixl_api() -> ModuleType:
    """Import NIXL's Python API from whichever wheel is installed; ImportError naming each attempt."""
    errors = []
    for name in NIXL_MODULES:
        try:
            api = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if not os.environ.get("NIXL_LOG_LEVEL"):  # NIXL logs INFO lines to stdout by default
            logging.getLogger("nixl").setLevel(logging.WARNING)
        return api
    raise ImportError("NIXL is not importable (" + "; ".join(errors) + ")")


def block_descs(p: PoolDesc) -> np.ndarray:
    """One (addr, len, dev) row per block: the prepped list that transfers index by block id."""
    rows = np.empty((p.num_blocks, 3), dtype=np.uint64)
    rows[:, 0] = p.base_addr + np.arange(p.num_blocks, dtype=np.uint64) * np.uint64(p.block_bytes)
    rows[:, 1] = p.block_bytes
    rows[:, 2] = p.device_id
    return rows

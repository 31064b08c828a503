"""Pools and block lists: validating a registration, checking block ids, coalescing runs.

Shared by every engine so that a bad request fails the same way (ValueError, before any byte moves)
whichever transport is configured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvrelay.transfer.metadata import PoolDesc


def describe_pool(name: str, tensor: torch.Tensor, block_bytes: int) -> PoolDesc:
    """Check that `tensor` is one contiguous region of whole blocks and describe it.

    The KV layout contract (docs/ARCHITECTURE.md "KV layout") makes block `i` of `kv_cache` the byte range
    `[i*block_bytes, (i+1)*block_bytes)` from `data_ptr()`; any contiguous tensor whose size is a
    multiple of `block_bytes` (a flat uint8 host pool, say) qualifies too.
    """
    if not name:
        raise ValueError("pool name must be non-empty")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"pool {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_contiguous():
        raise ValueError(f"pool {name!r}: tensor must be contiguous, strides {tensor.stride()}")
    nbytes = tensor.numel() * tensor.element_size()
    if block_bytes <= 0 or nbytes == 0 or nbytes % block_bytes:
        raise ValueError(f"pool {name!r}: {nbytes} bytes is not a positive multiple of block_bytes={block_bytes}")
    if tensor.dim() >= 2 and tensor.shape[0] * block_bytes != nbytes:
        raise ValueError(f"pool {name!r}: dim 0 ({tensor.shape[0]} blocks) disagrees with "
                         f"block_bytes={block_bytes} ({nbytes // block_bytes} blocks)")
    if tensor.device.type == "cpu":
        mem_type, device_id = "DRAM", 0
    elif tensor.device.type == "cuda":
        mem_type, device_id = "VRAM", tensor.device.index or 0
    else:
        raise ValueError(f"pool {name!r}: unsupported device {tensor.device}")
    return PoolDesc(name=name, base_addr=tensor.data_ptr(), num_blocks=nbytes // block_bytes,
                    block_bytes=block_bytes, mem_type=mem_type, device_id=device_id)


def check_ids(ids: Sequence[int], pool: PoolDesc, what: str, *, distinct: bool) -> np.ndarray:
    """Validate block ids against `pool`; return them as int64. Raises ValueError naming the offender."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} block ids must be a flat list, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} block ids must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= pool.num_blocks:
            bad = [int(x) for x in arr[(arr < 0) | (arr >= pool.num_blocks)][:8]]
            raise ValueError(f"{what} block ids out of range [0, {pool.num_blocks}) of pool {pool.name!r}: {bad}")
        if distinct and arr.size > 1 and len(set(arr.tolist())) != arr.size:  # set: ~10x np.unique for short lists
            raise ValueError(f"{what} block ids must be distinct (they are transfer destinations)")
    return arr


def check_pair(src: PoolDesc, dst: PoolDesc) -> None:
    if src.block_bytes != dst.block_bytes:
        raise ValueError(f"block size mismatch: pool {src.name!r} has {src.block_bytes} bytes per block, "
                         f"pool {dst.name!r} has {dst.block_bytes}")


def resolve_transfer(pools: Mapping[str, Any], peers: Mapping[str, Any], kind: str, peer_id: str, local_pool: str,
                     local_ids: Sequence[int], remote_pool: str, remote_ids: Sequence[int],
                     reading: bool) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """Every engine's argument checks, before anything moves: (local pool, peer, local ids, remote ids).
    Pool entries carry `.desc` (PoolDesc), peers `.md` (the peer's TransferMetadata). Reads land in
    distinct local blocks; writes in distinct remote ones."""
    local = pools.get(local_pool)
    if local is None:
        raise ValueError(f"no local pool {local_pool!r} (registered: {list(pools)})")
    peer = peers.get(peer_id)
    if peer is None:
        from kvrelay.transfer.base import TransferError

        raise TransferError(f"unknown {kind} peer {peer_id!r} (add_peer first; it may have left)")
    rdesc = peer.md.pool(remote_pool)
    check_pair(local.desc, rdesc)
    lids = check_ids(local_ids, local.desc, "local", distinct=reading)
    rids = check_ids(remote_ids, rdesc, "remote", distinct=not reading)
    if lids.size != rids.size:
        raise ValueError(f"{lids.size} local block ids but {rids.size} remote block ids")
    return local, peer, lids, rids


def block_runs(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int, int]]:
    """Coalesce aligned id lists into `(a_start, b_start, count)` runs where both sides are consecutive.

    `[4,5,6,9]` -> `[1,2,3,7]` gives `[(4,1,3), (9,7,1)]`: one descriptor per run instead of per block.
    """
    if a.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(a) != 1) | (np.diff(b) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    counts = np.diff(np.concatenate((starts, [a.size])))
    return [(int(a[s]), int(b[s]), int(n)) for s, n in zip(starts, counts, strict=True)]


def count_runs(a: np.ndarray, b: np.ndarray) -> int:
    """`len(block_runs(a, b))` without building the runs."""
    if a.size <= 1:
        return int(a.size)
    return 1 + int(np.count_nonzero((np.diff(a) != 1) | (np.diff(b) != 1)))

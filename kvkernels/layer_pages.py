"""Blocks between an engine's per-layer paged KV caches and the tiers' block-contiguous rows.

vLLM keeps one paged tensor per attention layer (on CPU `[num_blocks, kv_heads, block_size, 2 * head]`,
on CUDA backends often `[2, num_blocks, ...]`): block `b` of a layer is that tensor's slice along its
block dimension. The tiers store a block as one contiguous row of bytes (docs/ARCHITECTURE.md "KV layout"), here
`[num_layers, page_numel]` in the cache dtype: layer 0's page of the block, then layer 1's, and so on.

    gather_layer_pages(pages, block_ids, rows, row_ids)   rows[row_ids[i]] <- block block_ids[i], every layer
    scatter_layer_pages(pages, block_ids, rows, row_ids)  block block_ids[i] of every layer <- rows[row_ids[i]]

`pages` are `LayerPages` views (the block dimension moved first; no copy), so any stride order works.
Each byte is copied once: a run of consecutive blocks going to consecutive rows is one `torch.cat`
into the rows (gather) or one strided `copy_` per layer (scatter, and a gather across devices); torch
reference, on CUDA the same calls are device copies. Invariant: gather then scatter of the same ids restores every byte of those blocks
and touches no other block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerPages:
    """One layer's cache seen block-first: `view[b]` is block b's page of this layer."""

    view: Tensor

    @classmethod
    def of(cls, cache: Tensor, num_blocks: int) -> LayerPages:
        """The view of `cache` whose first dimension is its block dimension (the one of size num_blocks;
        with K/V split first, `[2, num_blocks, ...]`, that is dimension 1)."""
        dims = [d for d, n in enumerate(cache.shape) if n == num_blocks]
        if not dims:
            raise ValueError(f"KV cache of shape {tuple(cache.shape)} has no block dimension of size {num_blocks}")
        return cls(cache.movedim(dims[0], 0))

    @property
    def page_numel(self) -> int:
        return self.view[0].numel() if self.view.shape[0] else 0

    @property
    def page_bytes(self) -> int:
        return self.page_numel * self.view.element_size()


def block_bytes(pages: Sequence[LayerPages]) -> int:
    """Bytes of one block across every layer: the length of a tier row."""
    return sum(p.page_bytes for p in pages)


def _rows_as(pages: Sequence[LayerPages], rows: Tensor) -> Tensor:
    """rows (uint8 [n, block_bytes]) as [n, num_layers, page_numel] in the cache dtype (a view)."""
    first = pages[0].view
    if any(p.view.dtype != first.dtype or p.page_numel != pages[0].page_numel for p in pages):
        raise ValueError("layers of different dtype or page size cannot share one row layout")
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != block_bytes(pages):
        raise ValueError(f"rows must be uint8 [n, {block_bytes(pages)}], got {rows.dtype} {tuple(rows.shape)}")
    return rows.view(first.dtype).view(rows.shape[0], len(pages), pages[0].page_numel)


def _runs(row_ids: Sequence[int], block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first row, first block, length) of each run where both ids step by one: one copy per run and
    layer instead of one per block (vLLM hands out fresh blocks mostly in order, rows are taken lowest
    first)."""
    if len(row_ids) != len(block_ids):
        raise ValueError(f"{len(row_ids)} rows for {len(block_ids)} blocks")
    runs: list[tuple[int, int, int]] = []
    for r, b in zip(row_ids, block_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == r and runs[-1][1] + runs[-1][2] == b:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((r, b, 1))
    return runs


def gather_layer_pages(pages: Sequence[LayerPages], block_ids: Sequence[int], rows: Tensor,
                       row_ids: Sequence[int]) -> None:
    """rows[row_ids[i]] <- block block_ids[i] of every layer (rows: uint8 [R, block_bytes])."""
    out = _rows_as(pages, rows)
    same_device = all(p.view.device == rows.device for p in pages)
    for r, b, n in _runs(row_ids, block_ids):
        if same_device:  # one kernel writing the rows in order: ~10% faster than a strided copy per layer
            torch.cat([p.view[b:b + n].reshape(n, 1, -1) for p in pages], dim=1, out=out[r:r + n])
            continue
        for layer, p in enumerate(pages):
            out[r:r + n, layer].copy_(p.view[b:b + n].reshape(n, -1))


def scatter_layer_pages(pages: Sequence[LayerPages], block_ids: Sequence[int], rows: Tensor,
                        row_ids: Sequence[int]) -> None:
    """Block block_ids[i] of every layer <- rows[row_ids[i]]; block ids must be distinct (else the
    result would depend on write order)."""
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block ids for a scatter must be distinct")
    src = _rows_as(pages, rows)
    for r, b, n in _runs(row_ids, block_ids):
        for layer, p in enumerate(pages):
            p.view[b:b + n].copy_(src[r:r + n, layer].reshape(n, *p.view.shape[1:]))

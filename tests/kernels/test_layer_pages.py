"""kvkernels/layer_pages.py (kvrelay.kernels.layer_pages): blocks between per-layer paged caches (vLLM's layout) and block-contiguous rows."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels.layer_pages import LayerPages, block_bytes, gather_layer_pages, scatter_layer_pages

NUM_BLOCKS, LAYERS = 12, 3


def cpu_layout() -> list[torch.Tensor]:
    """vLLM's CPU backend: [num_blocks, kv_heads, block_size, 2 * head_dim] per layer."""
    return [torch.randn(NUM_BLOCKS, 2, 32, 16) for _ in range(LAYERS)]


def kv_first_layout() -> list[torch.Tensor]:
    """Flash-attention style: [2, num_blocks, block_size, kv_heads, head_dim] per layer."""
    return [torch.randn(2, NUM_BLOCKS, 32, 2, 8) for _ in range(LAYERS)]


def reference_row(caches: list[torch.Tensor], block: int, kv_first: bool) -> torch.Tensor:
    parts = [(c[:, block] if kv_first else c[block]).reshape(-1) for c in caches]
    return torch.cat(parts).view(torch.uint8)


@pytest.mark.parametrize("kv_first", [False, True])
def test_gather_writes_each_block_as_its_layers_in_order_and_scatter_restores_it(kv_first):
    caches = kv_first_layout() if kv_first else cpu_layout()
    pages = [LayerPages.of(c, NUM_BLOCKS) for c in caches]
    nbytes = block_bytes(pages)
    assert nbytes == sum(c.numel() // NUM_BLOCKS * 4 for c in caches)
    rows = torch.zeros((8, nbytes), dtype=torch.uint8)
    blocks, row_ids = [3, 4, 5, 9, 0], [1, 2, 3, 6, 7]  # two runs of three and two, and a break
    gather_layer_pages(pages, blocks, rows, row_ids)
    for b, r in zip(blocks, row_ids, strict=True):
        assert torch.equal(rows[r], reference_row(caches, b, kv_first))
    assert rows[0].count_nonzero() == 0 and rows[4].count_nonzero() == 0  # untouched rows

    before = [c.clone() for c in caches]
    targets = [7, 8, 10, 11, 1]
    scatter_layer_pages(pages, targets, rows, row_ids)
    for src, dst in zip(blocks, targets, strict=True):
        assert torch.equal(reference_row(caches, dst, kv_first), reference_row(before, src, kv_first))
    others = [b for b in range(NUM_BLOCKS) if b not in targets]
    for c, old in zip(caches, before, strict=True):
        view_new = c[:, others] if kv_first else c[others]
        view_old = old[:, others] if kv_first else old[others]
        assert torch.equal(view_new, view_old)  # no other block was written


def test_misuse_is_a_clear_error():
    caches = cpu_layout()
    pages = [LayerPages.of(c, NUM_BLOCKS) for c in caches]
    rows = torch.zeros((4, block_bytes(pages)), dtype=torch.uint8)
    with pytest.raises(ValueError, match="distinct"):
        scatter_layer_pages(pages, [1, 1], rows, [0, 1])
    with pytest.raises(ValueError, match="rows must be uint8"):
        gather_layer_pages(pages, [1], torch.zeros((4, 10), dtype=torch.uint8), [0])
    with pytest.raises(ValueError, match="2 rows for 1 blocks"):
        gather_layer_pages(pages, [1], rows, [0, 1])
    with pytest.raises(ValueError, match="no block dimension"):
        LayerPages.of(torch.zeros(5, 6), NUM_BLOCKS)

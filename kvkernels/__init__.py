"""Attention and KV-block kernels: Triton on CUDA, PyTorch references on CPU and in tests.

Layout contract: `kv_cache` is `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`
(0 = K, 1 = V); one block is one contiguous byte range. See README.md.
"""

from kvrelay.kernels.block_copy import (
    gather_blocks,
    gather_blocks_ref,
    gather_blocks_triton,
    scatter_blocks,
    scatter_blocks_ref,
    scatter_blocks_triton,
    write_kv,
    write_kv_ref,
)
from kvrelay.kernels.paged_attention import (
    HAS_TRITON,
    DecodePlan,
    paged_attention_decode,
    paged_attention_decode_ref,
    paged_attention_decode_triton,
    plan_decode,
    plan_decode_host,
    prefill_attention_ref,
    release_workspace,
)

__all__ = [
    "HAS_TRITON",
    "DecodePlan",
    "gather_blocks",
    "gather_blocks_ref",
    "gather_blocks_triton",
    "paged_attention_decode",
    "paged_attention_decode_ref",
    "paged_attention_decode_triton",
    "plan_decode",
    "plan_decode_host",
    "prefill_attention_ref",
    "release_workspace",
    "scatter_blocks",
    "scatter_blocks_ref",
    "scatter_blocks_triton",
    "write_kv",
    "write_kv_ref",
]

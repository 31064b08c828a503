"""How many blocks the G1 pool gets when the operator gives no size.

Default (`--kv-cache-bytes 0`): room for DEFAULT_G1_TOKENS tokens of the model being served, and never
less than DEFAULT_G1_MIN_BYTES. The KV bytes per token differ by three orders of magnitude between
models (2 KiB for the tiny model, 45 KiB for SmolLM2-135M in float32, megabytes for large models),
so a fixed byte default is either too small to serve a real model or wasteful for a small one.
"""

from __future__ import annotations

DEFAULT_G1_TOKENS = 16384
DEFAULT_G1_MIN_BYTES = 256 << 20


def g1_num_blocks(kv_cache_bytes: int, block_bytes: int, block_size: int) -> int:
    """Blocks of `block_bytes` for a pool of `kv_cache_bytes` (0 = the default above); at least 1."""
    if kv_cache_bytes <= 0:
        per_token = block_bytes / block_size
        kv_cache_bytes = max(DEFAULT_G1_MIN_BYTES, int(DEFAULT_G1_TOKENS * per_token))
    return max(1, kv_cache_bytes // block_bytes)

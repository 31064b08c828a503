"""Content checksums of G1 blocks for the cluster KV pool (docs/ARCHITECTURE.md "Cluster KV pool"): the
lender sums each block it lends when it pins it, the puller sums what arrived and keeps only blocks
whose sums agree. The same xxh3_64 over a block's bytes that G3's index keeps (tiers/disk.py).

Why at lend time and not before: a lent block is pinned (never rewritten while its lease holds), so
its sum then is the sum of the bytes any pull of it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash


def block_checksums(rows: torch.Tensor, block_ids: Sequence[int]) -> list[int]:
    """xxh3_64 of each block's bytes; `rows`: the G1 pool as uint8 [num_blocks, block_bytes]. Host rows
    are summed in place (no copy); device rows are gathered and copied to the host once first (callers
    run that off the event loop: it waits for the device)."""
    if not block_ids:
        return []
    if rows.device.type == "cpu":
        host = rows.numpy()
        return [xxhash.xxh3_64_intdigest(host[i].data) for i in block_ids]
    picked = rows[torch.tensor(list(block_ids), dtype=torch.long, device=rows.device)].cpu().numpy()
    return [xxhash.xxh3_64_intdigest(picked[i].data) for i in range(len(block_ids))]

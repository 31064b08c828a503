"""G2: host memory, a pool of fixed-size slots (docs/ARCHITECTURE.md "Tiers").

One preallocated uint8 tensor of `num_slots * block_bytes` (pinned when CUDA is present, so device
copies are DMA and can be non-blocking); a put/get is one `copy_` per block between the caller's view
and its slot (one copy for a run of neighbouring blocks). The pool is the whole footprint: allocated
once, never grown, so the byte bound holds by construction. Host memory is not a persistence boundary,
so G2 keeps no checksums.

Where copies run: CPU-to-CPU batches run on the event loop in ~32 MiB slices, yielding in between.
Measured here, handing them to a thread instead cost 10-50%: torch's OpenMP gives every calling thread
its own worker team, and two teams spinning on two cores fight. Device copies (DMA, then a stream sync)
run on the I/O thread so the loop never waits for the GPU.
"""

from __future__ import annotations

import torch

from .base import RETRY_AFTER_S, EventCallback
from .slots import Item, SlotStore, coalesce


class HostStore(SlotStore):
    tier = "G2"

    def __init__(self, block_bytes: int, capacity_bytes: int, *, policy: str = "lru",
                 pin_memory: bool | None = None, on_event: EventCallback | None = None,
                 inline_bytes: int = 1 << 20, slice_bytes: int = 32 << 20, cooperative: bool = True,
                 io_threads: int = 1, retry_after_s: float | None = RETRY_AFTER_S):
        """capacity_bytes: the pool's size bound; it holds capacity_bytes // block_bytes blocks.
        Batches up to inline_bytes copy on the event loop at once. Larger batches of CPU tensors copy
        on the loop in slices of ~slice_bytes (~3 ms each at 10 GB/s), yielding in between (`cooperative`);
        device tensors, or all large batches when not cooperative, copy on an I/O thread."""
        super().__init__(block_bytes, capacity_bytes // max(1, block_bytes), capacity_bytes, policy=policy,
                         on_event=on_event, inline_bytes=inline_bytes, io_threads=io_threads,
                         retry_after_s=retry_after_s)
        self.chunk_blocks = max(1, slice_bytes // max(1, block_bytes))
        self.cooperative = cooperative
        self.pinned = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pool = torch.empty((self.num_slots, block_bytes), dtype=torch.uint8, pin_memory=self.pinned)
        if not self.pinned:
            self.pool.zero_()  # fault every page in now: the bound is real memory, not a lazy promise

    def _footprint(self) -> int:
        return self.pool.numel()

    async def close(self) -> None:
        await super().close()
        self.pool = torch.empty((0, self.block_bytes), dtype=torch.uint8)  # give the memory back now

    def _write(self, items: list[Item]) -> None:
        devices = set()
        for group, src in coalesce(items, self.block_bytes):
            slot = group[0][1]
            self.pool[slot:slot + len(group)].view(-1).copy_(src, non_blocking=self.pinned and src.is_cuda)
            if src.is_cuda:
                devices.add(src.device)
        _sync(devices)  # the slot must hold the bytes before it is committed (readable)

    def _read(self, items: list[Item]) -> list[bool]:
        devices = set()
        for group, dst in coalesce(items, self.block_bytes):
            slot = group[0][1]
            dst.copy_(self.pool[slot:slot + len(group)].view(-1), non_blocking=self.pinned and dst.is_cuda)
            if dst.is_cuda:
                devices.add(dst.device)
        _sync(devices)  # the copy must be done before the slot is unpinned (and may be overwritten)
        return [True] * len(items)


def _sync(devices: set[torch.device]) -> None:
    for d in devices:
        torch.cuda.current_stream(d).synchronize()

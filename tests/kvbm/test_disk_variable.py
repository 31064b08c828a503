"""G3 with variable-size blocks (a codec's frames, kvbm/tiers/disk_extents.py): capacity is charged by
the frames' pages in a sparse file, so a byte budget holds more short blocks than full-size ones; the
real disk allocation never passes the bound; a restart reads every block's length back from the index;
a flipped byte is a checksum miss; room left by removed or corrupt blocks is punched and reused."""

from __future__ import annotations

import os
import random

import torch

from kvrelay.kvbm.tiers import DiskStore
from kvrelay.kvbm.tiers.disk_extents import PAGE, pages

BLOCK = 64 * PAGE  # 256 KiB: the largest frame


def frame(h: int, n: int | None = None) -> torch.Tensor:
    """Hash h's bytes: a length of 1..BLOCK derived from h (or n), content distinct per hash."""
    n = n if n is not None else 1 + (h * 7919) % BLOCK
    g = torch.Generator().manual_seed(h)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


async def read(store: DiskStore, hashes: list[int]) -> tuple[list[bool], torch.Tensor]:
    dst = torch.zeros((len(hashes), store.block_bytes), dtype=torch.uint8)
    return await store.get(hashes, list(dst)), dst


def holds(dst: torch.Tensor, h: int, n: int | None = None) -> bool:
    f = frame(h, n)
    return bool(torch.equal(dst[:f.numel()], f))


def allocated(store: DiskStore) -> int:
    return os.stat(store.directory / "blocks.dat").st_blocks * 512


async def test_a_byte_budget_holds_blocks_by_their_length(tmp_path):
    capacity = 40 * BLOCK
    full = await DiskStore.open(tmp_path / "full", BLOCK, capacity)
    short = await DiskStore.open(tmp_path / "short", BLOCK, capacity, variable=True)
    assert short._book is not None  # ext4 punches holes; the budget is in pages, not slots
    hashes = list(range(1, 201))
    await full.put(hashes, [frame(h, BLOCK) for h in hashes])
    await short.put(hashes, [frame(h, BLOCK // 4) for h in hashes])  # quarter-size frames
    assert full.stats.blocks == full.num_slots < 40
    st = short.stats
    assert st.blocks >= 3.5 * full.stats.blocks, (st.blocks, full.stats.blocks)
    assert st.used_bytes == st.blocks * (BLOCK // 4)
    assert st.footprint_bytes <= st.capacity_bytes and allocated(short) <= capacity
    kept = short.hashes()  # a batch past the room keeps its head
    assert kept == hashes[:len(kept)]
    ok, dst = await read(short, kept)
    assert all(ok) and all(holds(dst[i], h, BLOCK // 4) for i, h in enumerate(kept))
    await full.close()
    await short.close()


async def test_random_lengths_puts_and_removes_keep_the_bound_and_the_bytes(tmp_path):
    capacity = 24 * BLOCK
    store = await DiskStore.open(tmp_path, BLOCK, capacity, variable=True)
    book = store._book
    assert book is not None
    rng, live = random.Random(5), set()
    for step in range(300):
        if rng.random() < 0.75:
            hs = [rng.randrange(1, 400) for _ in range(rng.randrange(1, 6))]
            hs = list(dict.fromkeys(hs))
            oks = await store.put(hs, [frame(h) for h in hs])
            live |= {h for h, ok in zip(hs, oks, strict=True) if ok}
        elif live:
            gone = rng.sample(sorted(live), min(len(live), rng.randrange(1, 4)))
            await store.remove(gone)
        live &= set(store.hashes())  # evictions
        store._slots.check()
        assert allocated(store) <= book.held + PAGE and book.held - book.reclaiming <= book.budget, step
        assert allocated(store) <= book.budget + PAGE, step
        assert book.held == sum(book.alloc.values())
        assert store.stats.footprint_bytes <= capacity
        assert store.stats.used_bytes == sum(frame(h).numel() for h in live)
    probe = sorted(live)[:20]
    ok, dst = await read(store, probe)
    assert all(ok) and all(holds(dst[i], h) for i, h in enumerate(probe))
    await store.close()


async def test_restart_reads_every_length_back(tmp_path):
    capacity = 16 * BLOCK
    store = await DiskStore.open(tmp_path, BLOCK, capacity, variable=True)
    hashes = list(range(1, 60))
    for h in hashes:  # one at a time: evictions for room log their slots free
        await store.put([h], [frame(h)])
    before = store.stats
    kept = store.hashes()
    await store.close()
    again = await DiskStore.open(tmp_path, BLOCK, capacity, variable=True)
    st = again.stats
    assert sorted(again.hashes()) == sorted(kept) and st.used_bytes == before.used_bytes
    assert again._book is not None and again._book.held == sum(pages(frame(h).numel()) for h in kept)
    ok, dst = await read(again, kept)
    assert all(ok) and all(holds(dst[i], h) for i, h in enumerate(kept))
    assert await again.put([999], [frame(999)]) == [True]  # and it goes on charging by length
    assert again._book.held - again._book.reclaiming <= again._book.budget
    await again.close()


async def test_a_batch_evicts_only_what_it_needs(tmp_path):
    """Room a batch's first blocks reclaim counts for its later blocks too: a full store taking a batch
    of k blocks evicts about k blocks' worth, not one more round per block."""
    store = await DiskStore.open(tmp_path, BLOCK, 20 * BLOCK, variable=True)
    first = list(range(1, 41))
    for h in first:
        await store.put([h], [frame(h, BLOCK // 2)])
    held = store.stats.blocks
    batch = list(range(100, 110))
    assert await store.put(batch, [frame(h, BLOCK // 2) for h in batch]) == [True] * 10
    st = store.stats
    assert st.blocks >= held - 1, (st.blocks, held)  # ten in, about ten out
    assert allocated(store) <= store._book.budget + PAGE
    await store.close()


async def test_a_flipped_byte_in_a_short_block_is_a_checksum_miss(tmp_path):
    store = await DiskStore.open(tmp_path, BLOCK, 8 * BLOCK, variable=True)
    await store.put([1, 2, 3], [frame(h, 5000) for h in (1, 2, 3)])
    with open(tmp_path / "blocks.dat", "r+b") as f:
        f.seek(store._slots.map[2] * store.slot_bytes + 4321)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x08]))
    ok, dst = await read(store, [1, 2, 3])
    assert ok == [True, False, True] and holds(dst[0], 1, 5000) and holds(dst[2], 3, 5000)
    assert store.stats.checksum_failures == 1 and 2 not in store.hashes()
    assert await store.put([2], [frame(2, 5000)]) == [True]  # recomputed, stored again
    await store.close()


async def test_room_of_removed_blocks_is_punched_and_reused_before_any_eviction(tmp_path):
    store = await DiskStore.open(tmp_path, BLOCK, 12 * BLOCK, variable=True)
    first = list(range(1, 9))
    await store.put(first, [frame(h, BLOCK) for h in first])
    full = store.stats.blocks
    await store.remove(first[:4])
    assert allocated(store) >= full * BLOCK  # the pages stay until room is needed
    await store.put([100, 101, 102, 103], [frame(h, BLOCK) for h in (100, 101, 102, 103)])
    st = store.stats
    assert st.evictions == 0 and st.blocks == full  # the removed blocks' pages, not live ones, made room
    assert allocated(store) <= full * BLOCK + PAGE
    await store.close()


async def test_leftover_pages_after_a_crash_are_punched_on_open(tmp_path):
    store = await DiskStore.open(tmp_path, BLOCK, 40 * BLOCK, variable=True)
    hashes = list(range(1, 21))
    await store.put(hashes, [frame(h, BLOCK) for h in hashes])
    await store.remove(hashes[:10])  # logged free, pages not punched yet (no put needed room)
    await store.close()
    assert allocated(store) >= 20 * BLOCK
    again = await DiskStore.open(tmp_path, BLOCK, 40 * BLOCK, variable=True)
    assert sorted(again.hashes()) == hashes[10:]
    assert allocated(again) <= 10 * BLOCK + PAGE
    await again.close()


async def test_a_frame_longer_than_the_block_is_misuse(tmp_path):
    import pytest

    store = await DiskStore.open(tmp_path, BLOCK, 8 * BLOCK, variable=True)
    with pytest.raises(ValueError):
        await store.put([1], [torch.zeros(BLOCK + 1, dtype=torch.uint8)])
    await store.close()

"""G3 only: checksums on disk, restart (clean and crashed), disk full, O_DIRECT, the on-disk bound."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvrelay.kvbm.tiers import DiskStore
from kvrelay.kvbm.tiers.disk import aligned_empty
from tests.kvbm.helpers import BLOCK_BYTES, Events, capacity_for, content, kv_pool, same

CAP8 = capacity_for("G3", 8)
REPO = Path(__file__).resolve().parents[2]


def disk_usage(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir())


async def read(store: DiskStore, hashes: list[int]) -> tuple[list[bool], torch.Tensor]:
    dst = torch.zeros((len(hashes), store.block_bytes), dtype=torch.uint8)
    return await store.get(hashes, list(dst)), dst


@pytest.mark.parametrize("direct", [True, False])
async def test_flipped_byte_is_a_miss_never_a_wrong_block(tmp_path, direct):
    ev = Events()
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8, direct_io=direct, on_event=ev)
    await store.put([1, 2, 3], list(kv_pool([1, 2, 3])))
    slot = store._slots.map[2]
    with open(tmp_path / "blocks.dat", "r+b") as f:  # flip one byte of block 2 behind the store's back
        f.seek(slot * store.slot_bytes + 1234)
        b = f.read(1)
        f.seek(slot * store.slot_bytes + 1234)
        f.write(bytes([b[0] ^ 0x40]))
    ok, dst = await read(store, [1, 2, 3])
    assert ok == [True, False, True] and same(dst[0], 1) and same(dst[2], 3)
    st = store.stats
    assert st.checksum_failures == 1 and st.blocks == 2 and 2 not in store.hashes()
    assert ev.log[-1] == ("removed", [2]) and ev.held == {1, 3}
    store._slots.check()
    assert await store.put([2], [content(2)]) == [True]  # recomputed and stored again: a hit now
    ok, dst = await read(store, [2])
    assert ok == [True] and same(dst[0], 2)
    await store.close()


async def test_restart_serves_the_same_blocks(tmp_path):
    hashes = list(range(40, 46))
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, capacity_for("G3", 6))
    assert store.direct_io  # ext4 here; the fallback is exercised by the *-buffered cases
    await store.put(hashes, list(kv_pool(hashes)))
    await store.close()
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, capacity_for("G3", 6))
    assert sorted(store.hashes()) == hashes and store.stats.blocks == 6
    ok, dst = await read(store, hashes)
    assert all(ok) and all(same(d, h) for d, h in zip(dst, hashes, strict=True))
    await store.close()
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, capacity_for("G3", 6))
    await store.put([99], [content(99)])  # write order survives a restart: the oldest block goes first
    assert sorted(store.hashes()) == [*hashes[1:], 99]
    await store.close()


async def test_crashed_worker_restart_finds_its_blocks(tmp_path):
    child = textwrap.dedent(f"""
        import asyncio, os, torch
        from kvrelay.kvbm.tiers import DiskStore
        from tests.kvbm.helpers import content
        async def main():
            s = await DiskStore.open({str(tmp_path)!r}, {BLOCK_BYTES}, {CAP8})
            assert all(await s.put([7, 8, 9], [content(h) for h in (7, 8, 9)]))
            print("stored", flush=True)
            os._exit(0)  # no close(): no final compaction, fds never closed cleanly
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert "stored" in out.stdout, out.stderr
    with open(tmp_path / "index.log", "ab") as f:
        f.write(os.urandom(57))  # and a torn, half-written record at the tail
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8)
    assert sorted(store.hashes()) == [7, 8, 9]
    ok, dst = await read(store, [7, 8, 9])
    assert all(ok) and all(same(d, h) for d, h in zip(dst, [7, 8, 9], strict=True))
    await store.close()


async def test_another_geometry_starts_empty(tmp_path):
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8)
    await store.put([1, 2], [content(1), content(2)])
    await store.close()
    store = await DiskStore.open(tmp_path, 2 * BLOCK_BYTES, CAP8)  # another model: nothing matches
    assert store.hashes() == [] and (await read(store, [1]))[0] == [False]
    await store.close()


async def test_disk_full_on_write_disables_with_one_warning(tmp_path, monkeypatch, caplog):
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8)
    await store.put([1], [content(1)])

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with caplog.at_level(logging.WARNING, logger="kvrelay.kvbm.tiers"):
        assert await store.put([2, 3], [content(2), content(3)]) == [False, False]
        assert await store.put([4], [content(4)]) == [False]
        assert (await read(store, [1, 2]))[0] == [False, False]
        assert await store.contains([1]) == [False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "G3 disabled" in warnings[0].getMessage()
    st = store.stats
    assert not st.enabled and st.errors == 1 and st.rejected_puts == 3 and st.blocks == 1
    store._slots.check()
    await store.close()


async def test_the_data_file_grows_as_blocks_are_written_never_up_front(tmp_path):
    """Issue 30: no preallocation of the whole budget; the footprint is what the files take now."""
    cap = capacity_for("G3", 64)
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, cap)
    assert store.enabled and store.num_slots == 64
    assert (tmp_path / "blocks.dat").stat().st_size == 0 and store.stats.footprint_bytes < 4096
    await store.put([1, 2, 3], list(kv_pool([1, 2, 3])))
    assert (tmp_path / "blocks.dat").stat().st_size == 3 * store.slot_bytes
    assert 3 * store.slot_bytes <= store.stats.footprint_bytes <= 3 * store.slot_bytes + 4096
    await store.close()
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, cap)  # a restart keeps the grown file and its blocks
    assert sorted(store.hashes()) == [1, 2, 3] and all((await read(store, [1, 2, 3]))[0])
    await store.close()


async def test_a_file_cut_short_loses_only_the_blocks_it_no_longer_covers(tmp_path):
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8)
    await store.put([1, 2, 3], list(kv_pool([1, 2, 3])))
    last = store._slots.map[3]
    await store.close()
    os.truncate(tmp_path / "blocks.dat", last * store.slot_bytes)
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8)
    assert sorted(store.hashes()) == [1, 2] and all((await read(store, [1, 2]))[0])
    await store.close()


async def test_an_empty_store_leaves_nothing_when_asked(tmp_path):
    empty, kept = tmp_path / "fp" / "slot-0", tmp_path / "fp2" / "slot-0"
    store = await DiskStore.open(empty, BLOCK_BYTES, CAP8, remove_if_empty=True)
    await store.close()
    assert not (tmp_path / "fp").exists()  # the slot and its (now empty) parent
    store = await DiskStore.open(kept, BLOCK_BYTES, CAP8, remove_if_empty=True)
    await store.put([1], [content(1)])
    await store.close()
    assert (kept / "blocks.dat").stat().st_size == store.slot_bytes  # a block is worth keeping


async def test_a_directory_serves_one_store_at_a_time(tmp_path):
    first = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8)
    second = await DiskStore.open(tmp_path, BLOCK_BYTES, CAP8)
    assert first.enabled and not second.enabled
    await second.close()
    await first.close()


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("block_bytes", [4096, 1000])
async def test_aligned_in_place_and_odd_block_sizes(tmp_path, direct, block_bytes):
    store = await DiskStore.open(tmp_path, block_bytes, capacity_for("G3", 4, block_bytes), direct_io=direct)
    src = aligned_empty(3 * block_bytes).view(3, block_bytes)  # 4 KiB aligned: in place under O_DIRECT
    dst = aligned_empty(3 * block_bytes).view(3, block_bytes)
    for i in range(3):
        src[i].copy_(content(i, block_bytes))
    assert all(await store.put([0, 1, 2], list(src)))
    assert all(await store.get([2, 0, 1], list(dst)))
    assert torch.equal(dst[0], src[2]) and torch.equal(dst[1], src[0]) and torch.equal(dst[2], src[1])
    await store.close()


async def test_disk_footprint_never_passes_the_bound_through_compactions(tmp_path):
    cap = capacity_for("G3", 4)
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, cap)
    for h in range(60):  # 60 puts into 4 slots: the index log is compacted many times
        await store.put([h], [content(h)])
        if h % 7 == 0:
            await store.remove([h])
        assert disk_usage(tmp_path) <= cap and store.stats.footprint_bytes <= cap
    survivors = store.hashes()
    await store.close()
    assert disk_usage(tmp_path) <= cap
    store = await DiskStore.open(tmp_path, BLOCK_BYTES, cap)
    assert sorted(store.hashes()) == sorted(survivors)
    await store.close()

"""Contract suite for the tier stores (kvbm/tiers/base.py), run against G2, G3 (O_DIRECT and buffered) and
G4 on a real moto S3 server; then what only one tier has: checksums on disk, restart, disk full,
shared and unreachable object stores."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from kvrelay.kvbm.tiers import TierStore
from tests.kvbm.helpers import BLOCK_BYTES, KINDS, Events, content, kv_pool, make_store, same


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make(kind: str, tmp_path, request: pytest.FixtureRequest):
    """make(blocks, **kw) -> an open store of `kind` holding exactly `blocks` blocks; closed after the test."""
    stores: list[TierStore] = []
    s3 = request.getfixturevalue("s3") if kind == "G4" else None
    bucket = s3.new_bucket() if s3 else None

    def _make(blocks: int, **kw) -> TierStore:
        store = make_store(kind, blocks, tmp=tmp_path, s3=s3, bucket=bucket, **kw)
        stores.append(store)
        return store

    yield _make
    for s in stores:
        await s.close()


def check(store: TierStore, events: Events | None = None) -> None:
    """The accounting contract, exactly."""
    st = store.stats
    assert st.used_bytes == st.blocks * store.block_bytes
    assert st.blocks == len(store.hashes()) == len(set(store.hashes()))
    assert st.used_bytes <= st.footprint_bytes <= st.capacity_bytes
    if hasattr(store, "_slots"):
        store._slots.check()  # type: ignore[attr-defined]
    if events is not None:
        assert events.held == set(store.hashes())


async def get_all(store: TierStore, hashes: list[int]) -> tuple[list[bool], torch.Tensor]:
    dst = torch.zeros((len(hashes), BLOCK_BYTES), dtype=torch.uint8)
    return await store.get(hashes, list(dst)), dst


async def test_roundtrip_exact_bytes_and_stats(make, kind):
    ev = Events()
    store = make(8, on_event=ev)
    assert isinstance(store, TierStore)
    pool = kv_pool([11, 12, 13])
    assert await store.put([11, 12, 13], list(pool)) == [True] * 3
    assert await store.contains([11, 12, 99]) == [True, True, False]
    dst = torch.zeros((4, *pool.shape[1:]), dtype=pool.dtype)  # into KV-shaped fp16 views, like G1
    assert await store.get([13, 99, 11, 12], list(dst)) == [True, False, True, True]
    assert same(dst[0], 13) and same(dst[2], 11) and same(dst[3], 12)
    st = store.stats
    assert (st.hits, st.misses, st.puts, st.blocks) == (3, 1, 3, 3)
    assert st.bytes_written == st.bytes_read == 3 * BLOCK_BYTES and st.checksum_failures == 0
    assert ev.log == [("stored", [11, 12, 13])]
    check(store, ev)
    await store.close()


async def test_dedup_is_a_noop_that_refreshes_recency(make):
    ev = Events()
    store = make(3, on_event=ev)
    for h in (1, 2, 3):
        assert await store.put([h], [content(h)]) == [True]
    assert await store.put([1], [content(1)]) == [True]  # dedup: 1 becomes most recent
    assert store.stats.dedup_puts == 1 and store.stats.puts == 3
    assert await store.put([4], [content(4)]) == [True]  # evicts 2, the least recently used
    assert sorted(store.hashes()) == [1, 3, 4]
    assert ev.log[-2:] == [("removed", [2]), ("stored", [4])]
    assert store.stats.evictions == 1
    check(store, ev)
    await store.close()


async def test_bound_holds_and_lru_evicts(make):
    ev = Events()
    store = make(4, on_event=ev)
    for h in range(20):
        await store.put([h], [content(h)])
        if h % 3 == 0:
            ok, dst = await get_all(store, [h - 2])  # a read refreshes recency too
        check(store, ev)
    assert store.stats.blocks == 4 and store.stats.evictions == 16
    ok, dst = await get_all(store, store.hashes())
    assert all(ok) and all(same(d, h) for d, h in zip(dst, store.hashes(), strict=True))
    await store.close()


async def test_batch_larger_than_the_tier_keeps_its_head(make):
    store = make(3)
    hashes = list(range(100, 106))
    assert await store.put(hashes, [content(h) for h in hashes]) == [True] * 3 + [False] * 3
    assert sorted(store.hashes()) == hashes[:3] and store.stats.rejected_puts == 3
    check(store)
    await store.close()


async def test_remove(make):
    ev = Events()
    store = make(4, on_event=ev)
    await store.put([1, 2, 3], [content(h) for h in (1, 2, 3)])
    assert await store.remove([2, 7, 2]) == 1
    assert await store.contains([1, 2, 3]) == [True, False, True]
    ok, _ = await get_all(store, [2])
    assert ok == [False] and store.stats.removals == 1
    check(store, ev)
    await store.close()


async def test_tinylfu_keeps_hot_blocks_through_a_scan(make):
    store = make(4, policy="tinylfu")
    hot = [1, 2, 3]
    await store.put(hot, [content(h) for h in hot])
    for _ in range(3):
        assert (await get_all(store, hot))[0] == [True] * 3
    for h in range(1000, 1030):  # a scan of one-hit blocks
        await store.put([h], [content(h)])
    assert set(hot) <= set(store.hashes())
    assert store.stats.rejected_puts > 0
    check(store)
    await store.close()


async def test_concurrent_operations_never_return_a_wrong_block(make):
    store = make(5)
    universe = list(range(12))

    async def worker(seed: int) -> None:
        rng = torch.Generator().manual_seed(seed)
        for _ in range(25):
            hs = [universe[int(i)] for i in torch.randint(0, 12, (3,), generator=rng)]
            op = int(torch.randint(0, 3, (1,), generator=rng))
            if op == 0:
                await store.put(hs, [content(h) for h in hs])
            elif op == 1:
                ok, dst = await get_all(store, hs)
                for good, d, h in zip(ok, dst, hs, strict=True):
                    assert not good or same(d, h), f"wrong bytes for {h}"
            else:
                await store.remove(hs[:1])

    await asyncio.gather(*(worker(s) for s in range(4)))
    check(store)
    await store.close()


async def test_wrong_tensor_size_is_a_programming_error(make):
    store = make(2)
    with pytest.raises(ValueError):
        await store.put([1], [torch.zeros(BLOCK_BYTES + 1, dtype=torch.uint8)])
    with pytest.raises(ValueError):
        await store.get([1, 2], [torch.zeros(BLOCK_BYTES, dtype=torch.uint8)])
    await store.close()


async def test_large_batches_go_through_io_threads_and_survive_cancellation(make, kind):
    store = make(64, **({"inline_bytes": 0, "slice_bytes": 8 * BLOCK_BYTES} if kind == "G2" else {}))
    hashes = list(range(500, 564))
    assert all(await store.put(hashes, [content(h) for h in hashes]))
    dst = torch.zeros((64, BLOCK_BYTES), dtype=torch.uint8)
    task = asyncio.ensure_future(store.get(hashes, list(dst)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the shielded I/O finishes and unpins on its own
        if not getattr(store, "_slots", None) or not store._slots.pins:
            break
        await asyncio.sleep(0.01)
    check(store)
    ok, dst = await get_all(store, hashes)
    assert all(ok) and all(same(d, h) for d, h in zip(dst, hashes, strict=True))
    await store.close()


async def test_g2_device_path_runs_on_an_io_thread():
    from kvrelay.kvbm.tiers import HostStore

    store = HostStore(BLOCK_BYTES, 8 * BLOCK_BYTES, inline_bytes=0, cooperative=False)
    hashes = list(range(8))
    assert all(await store.put(hashes, list(kv_pool(hashes))))
    ok, dst = await get_all(store, hashes)
    assert all(ok) and all(same(d, h) for d, h in zip(dst, hashes, strict=True))
    check(store)
    await store.close()
    assert await store.get([0], [dst[0]]) == [False]  # closed: a miss, not an error


def test_disabled_tier_logs_one_warning_and_serves_misses(caplog):
    from kvrelay.kvbm.tiers.base import Health

    h = Health("G9", retry_after_s=None)
    with caplog.at_level(logging.WARNING, logger="kvrelay.kvbm.tiers"):
        h.fail("boom")
        h.fail("boom again")
    assert not h.allow() and len(caplog.records) == 1 and "G9 disabled" in caplog.text

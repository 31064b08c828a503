"""G4 only, on a real moto S3 server: object format, corrupt and truncated objects, sharing between
workers, the per-worker bound, and an unreachable endpoint (disabled, then re-enabled)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from kvrelay.kvbm.tiers import ObjectStore, object_key
from kvrelay.kvbm.tiers.object_store import HEADER_BYTES, MAGIC
from tests.kvbm.helpers import BLOCK_BYTES, FINGERPRINT, S3, Events, content, make_store, same


def keys(s3: S3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


async def read(store: ObjectStore, hashes: list[int]) -> tuple[list[bool], torch.Tensor]:
    dst = torch.zeros((len(hashes), BLOCK_BYTES), dtype=torch.uint8)
    return await store.get(hashes, list(dst)), dst


@pytest.fixture
def bucket(s3: S3) -> str:
    return s3.new_bucket()


def g4(s3: S3, bucket: str, blocks: int, tmp_path, **kw) -> ObjectStore:
    return make_store("G4", blocks, tmp=tmp_path, s3=s3, bucket=bucket, **kw)


async def test_object_layout_and_the_bound_in_the_bucket(s3, bucket, tmp_path):
    store = g4(s3, bucket, 3, tmp_path)
    for h in range(10):
        await store.put([h], [content(h)])
        assert len(keys(s3, bucket)) <= 3  # evicted objects are really deleted
    assert sorted(keys(s3, bucket)) == sorted(object_key(FINGERPRINT, h) for h in store.hashes())
    assert object_key(FINGERPRINT, 0xAB) == f"kvrelay/{FINGERPRINT}/00000000000000ab"
    body = s3.client().get_object(Bucket=bucket, Key=object_key(FINGERPRINT, 9))["Body"].read()
    assert body[:4] == MAGIC and len(body) == HEADER_BYTES + BLOCK_BYTES
    assert bytes(body[HEADER_BYTES:]) == content(9).numpy().tobytes()
    st = store.stats
    assert st.footprint_bytes == 3 * (HEADER_BYTES + BLOCK_BYTES) <= st.capacity_bytes


@pytest.mark.parametrize("damage", ["truncate", "flip", "other-key", "empty"])
async def test_damaged_object_is_a_miss_and_is_deleted(s3, bucket, tmp_path, damage):
    ev = Events()
    store = g4(s3, bucket, 4, tmp_path, on_event=ev)
    await store.put([1, 2], [content(1), content(2)])
    c, key = s3.client(), object_key(FINGERPRINT, 1)
    body = c.get_object(Bucket=bucket, Key=key)["Body"].read()
    if damage == "truncate":
        body = body[: len(body) // 2]
    elif damage == "flip":
        body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
    elif damage == "other-key":  # a valid object, but of another block
        body = c.get_object(Bucket=bucket, Key=object_key(FINGERPRINT, 2))["Body"].read()
    else:
        body = b""
    c.put_object(Bucket=bucket, Key=key, Body=body)
    ok, dst = await read(store, [1, 2])
    assert ok == [False, True] and same(dst[1], 2)
    st = store.stats
    assert st.checksum_failures == 1 and st.misses == 1 and st.enabled
    assert key not in keys(s3, bucket) and store.hashes() == [2] and ev.held == {2}
    assert await store.put([1], [content(1)]) == [True]  # the recompute is stored again
    ok, dst = await read(store, [1])
    assert ok == [True] and same(dst[0], 1)


async def test_workers_share_blocks_but_each_bounds_its_own(s3, bucket, tmp_path):
    a, b = g4(s3, bucket, 2, tmp_path), g4(s3, bucket, 2, tmp_path)
    await a.put([1, 2], [content(1), content(2)])
    ok, dst = await read(b, [1, 2])
    assert ok == [True, True] and same(dst[0], 1)
    assert await b.contains([1, 3]) == [True, False]
    assert await b.put([1], [content(1)]) == [True]  # already written by a: a dedup, not b's object
    st = b.stats
    assert st.dedup_puts == 1 and st.blocks == 0 and b.hashes() == []
    await a.put([3], [content(3)])  # a evicts its LRU object, 1
    assert (await read(b, [1]))[0] == [False]
    assert await b.remove([2]) == 0 and (await read(b, [2]))[0] == [True]  # b never deletes a's objects


async def test_vanished_object_is_dropped_from_the_owned_set(s3, bucket, tmp_path):
    ev = Events()
    store = g4(s3, bucket, 4, tmp_path, on_event=ev)
    await store.put([5], [content(5)])
    s3.client().delete_object(Bucket=bucket, Key=object_key(FINGERPRINT, 5))  # a lifecycle rule, say
    assert (await read(store, [5]))[0] == [False]
    assert store.hashes() == [] and ev.held == set() and store.stats.checksum_failures == 0


async def test_unreachable_endpoint_disables_then_recovers(tmp_path, caplog):
    down = S3(tmp_path)  # a free port with nothing listening yet
    store = g4(down, "kvrelay-late", 4, tmp_path, retry_after_s=0.5)
    with caplog.at_level(logging.WARNING, logger="kvrelay.kvbm.tiers"):
        assert await store.put([1, 2], [content(1), content(2)]) == [False, False]
        assert (await read(store, [1]))[0] == [False]
        assert await store.contains([1]) == [False]
        assert await store.put([3], [content(3)]) == [False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "G4 disabled" in warnings[0] and "retrying in 0.5s" in warnings[0]
    st = store.stats
    assert not st.enabled and st.blocks == 0 and st.footprint_bytes == 0 and st.rejected_puts == 3

    down.proc.start()  # the endpoint comes back
    try:
        down.client().create_bucket(Bucket="kvrelay-late")
        await asyncio.sleep(0.6)
        assert await store.put([4], [content(4)]) == [True]
        assert store.enabled and "G4 re-enabled" in caplog.text
        ok, dst = await read(store, [4])
        assert ok == [True] and same(dst[0], 4)
    finally:
        down.proc.stop()

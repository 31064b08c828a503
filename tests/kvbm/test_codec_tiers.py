"""G3 and G4 storing through codecs (kvbm/codecs/store.py): round trips, corruption is a checksum miss,
a block of an unknown codec is a miss (and dropped), restart decodes, and compression holds more
blocks under the same byte bound."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kvbm.codecs.registry import make_codec
from kvrelay.kvbm.codecs.shape import BlockShape
from kvrelay.kvbm.codecs.store import CodecStore, slot_bytes
from kvrelay.kvbm.tiers import DiskStore, ObjectStore, s3_store
from kvrelay.kvbm.tiers.object_format import object_key
from tests.kvbm.helpers import FINGERPRINT

SHAPE = BlockShape("bfloat16", 4, 16, 64)  # 16 KiB blocks


def kv(h: int, shape: BlockShape = SHAPE) -> torch.Tensor:
    """A KV-like block (normal values) for hash h, as bytes."""
    g = torch.Generator().manual_seed(h)
    return torch.randn(shape.numel, generator=g).to(shape.torch_dtype).view(torch.uint8)


async def open_g3(path, codec_name: str, capacity: int = 1 << 20, shape: BlockShape = SHAPE) -> CodecStore | DiskStore:
    codec = make_codec(codec_name, shape)
    if codec is None:
        return await DiskStore.open(path, shape.block_bytes, capacity)
    variable = not codec.fixed_size  # lossless: frames at their own length, charged by their pages
    disk = await DiskStore.open(path, slot_bytes(codec, True), capacity, variable=variable)
    return CodecStore(disk, codec, variable=variable)


def open_g4(s3, bucket: str, codec_name: str, capacity: int = 1 << 20) -> CodecStore:
    codec = make_codec(codec_name, SHAPE)
    assert codec is not None
    client = s3_store(bucket, endpoint=s3.url, access_key_id="test", secret_access_key="test", timeout_s=5)
    inner = ObjectStore(client, FINGERPRINT, codec.max_bytes, capacity, variable=True, key_tag=codec.name)
    return CodecStore(inner, codec, variable=True)


async def read(store, hashes: list[int]) -> tuple[list[bool], torch.Tensor]:
    dst = torch.zeros((len(hashes), store.block_bytes), dtype=torch.uint8)
    return await store.get(hashes, list(dst)), dst


def exact(t: torch.Tensor, h: int) -> bool:
    return bool(torch.equal(t, kv(h)))


@pytest.mark.parametrize("where", ["G3", "G4"])
@pytest.mark.parametrize("codec_name", ["lossless", "int8", "int7z", "int6z"])
async def test_round_trip_through_the_tier(where, codec_name, tmp_path, s3):
    store = await open_g3(tmp_path, codec_name) if where == "G3" else open_g4(s3, s3.new_bucket(), codec_name)
    hashes = [11, 12, 13]
    assert await store.put(hashes, [kv(h) for h in hashes]) == [True] * 3
    ok, dst = await read(store, hashes + [99])
    assert ok == [True, True, True, False]
    for i, h in enumerate(hashes):
        if codec_name == "lossless":
            assert exact(dst[i], h)
        else:
            ref = kv(h).view(torch.bfloat16).float()
            err = (dst[i].view(torch.bfloat16).float() - ref).abs().max()
            bound = {"int8": 0.05, "int7z": 0.06, "int6z": 0.1}[codec_name]  # values ~N(0, 1): step ~4/levels
            assert 0 < float(err) < bound  # lossy, and close
    st = store.stats
    assert st.blocks == 3 and st.hits == 3
    assert st.used_bytes < 3 * SHAPE.block_bytes  # accounted in stored bytes
    await store.close()


async def test_g3_flipped_byte_in_a_compressed_block_is_a_checksum_miss(tmp_path):
    store = await open_g3(tmp_path, "lossless")
    assert isinstance(store, CodecStore)
    disk = store.inner
    assert isinstance(disk, DiskStore)
    await store.put([1, 2, 3], [kv(h) for h in (1, 2, 3)])
    with open(tmp_path / "blocks.dat", "r+b") as f:
        f.seek(disk._slots.map[2] * disk.slot_bytes + 100)  # inside the zstd payload
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    ok, dst = await read(store, [1, 2, 3])
    assert ok == [True, False, True] and exact(dst[0], 1) and exact(dst[2], 3)
    st = store.stats
    assert st.checksum_failures == 1 and st.blocks == 2 and 2 not in store.hashes()
    await store.close()


async def test_g4_corrupted_compressed_object_is_a_checksum_miss(tmp_path, s3):
    bucket = s3.new_bucket()
    store = open_g4(s3, bucket, "lossless")
    await store.put([5, 6], [kv(5), kv(6)])
    client, key = s3.client(), object_key(FINGERPRINT, 6, "lossless")
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-7] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    ok, dst = await read(store, [5, 6])
    assert ok == [True, False] and exact(dst[0], 5)
    assert store.stats.checksum_failures == 1
    await store.close()


async def test_a_block_of_an_unknown_codec_is_a_miss_and_dropped(tmp_path):
    """A valid, checksummed frame whose codec id this worker does not know (a newer kvrelay's codec):
    a miss, not a crash and not garbage, and its slot is freed."""
    store = await open_g3(tmp_path, "lossless")
    assert isinstance(store, CodecStore)
    frame = bytearray(store.codec.encode(kv(7)))
    frame[4] = 200  # codec id
    row = torch.frombuffer(frame, dtype=torch.uint8)
    assert await store.inner.put([7], [row]) == [True]  # written as the other worker would have
    await store.put([8], [kv(8)])
    ok, dst = await read(store, [7, 8])
    assert ok == [False, True] and exact(dst[1], 8)
    st = store.stats
    assert st.hits == 1 and st.misses == 1 and 7 not in store.hashes()
    await store.close()


async def test_g3_restart_decodes_and_another_codec_starts_empty(tmp_path):
    store = await open_g3(tmp_path, "lossless")
    await store.put([1, 2], [kv(1), kv(2)])
    await store.close()
    again = await open_g3(tmp_path, "lossless")
    ok, dst = await read(again, [1, 2])
    assert ok == [True, True] and exact(dst[0], 1) and exact(dst[1], 2)
    await again.close()
    other = await open_g3(tmp_path, "int8")  # another frame size: the index's geometry differs
    assert other.stats.blocks == 0
    await other.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_compressed_g3_holds_more_blocks_in_the_same_bytes(tmp_path, dtype):
    """Blocks of 64 KiB (G3 allocates whole 4 KiB pages, so tiny blocks would hide the gain). int8 fills
    fixed slots of its frame size; lossless frames vary and are charged by their own pages (sparse G3)."""
    shape = BlockShape(dtype, 4, 16, 256 if dtype == "float32" else 512)
    capacity = 2 << 20
    counts = {}
    for name in ("none", "int8", "lossless"):
        store = await open_g3(tmp_path / name, name, capacity, shape)
        hashes = list(range(1000, 1200))
        await store.put(hashes, [kv(h, shape) for h in hashes])
        st = store.stats
        assert st.footprint_bytes <= st.capacity_bytes == capacity
        counts[name] = st.blocks
        ok, _ = await read(store, hashes[:5])  # a batch past the room keeps its head
        assert all(ok)
        await store.close()
    int8_gain = 3 if dtype == "float32" else 1.6  # 20 KiB slots instead of 64 KiB; 36 KiB for bfloat16
    assert counts["int8"] >= int8_gain * counts["none"], counts
    # N(0, 1) values: the exponent plane shrinks (float32 ~1.1x, bfloat16 ~1.3x; real KV: 1.16x, 1.37x)
    assert counts["lossless"] >= (1.04 if dtype == "float32" else 1.2) * counts["none"], counts


async def test_compressed_g4_is_bounded_by_stored_bytes(tmp_path, s3):
    """Variable-size objects: the bound is on their real bytes, so lossless fits more than raw would."""
    raw_object = SHAPE.block_bytes + 32
    capacity = 10 * raw_object
    store = open_g4(s3, s3.new_bucket(), "lossless", capacity)
    hashes = list(range(40))
    for h in hashes:
        await store.put([h], [kv(h)])
        st = store.stats
        assert st.footprint_bytes <= capacity
    assert st.blocks > 10  # more than ten raw blocks in ten raw blocks' bytes
    ok, dst = await read(store, hashes[-3:])
    assert all(ok) and exact(dst[2], hashes[-1])
    await store.close()


async def test_decode_time_is_inside_the_tier_time_the_cost_model_measures(tmp_path, monkeypatch):
    """TieredKv times each tier's `get`; a codec store decodes inside it, so a slow decode makes the
    tier look slow (its effective bandwidth) and the cost model recomputes rather than wait."""
    import time

    from kvrelay.kvbm.cost_model import CostModel
    from kvrelay.kvbm.tiered_kv import OnboardPlan, TieredKv, TierFlow

    store = await open_g3(tmp_path, "lossless")
    assert isinstance(store, CodecStore)
    await store.put([1], [kv(1)])
    real = type(store.codec).decode

    def slow(self, frame, out):
        time.sleep(0.05)
        return real(self, frame, out)

    monkeypatch.setattr(type(store.codec), "decode", slow)
    rows = torch.zeros((2, SHAPE.block_bytes), dtype=torch.uint8)
    tiered = TieredKv(rows, CostModel(SHAPE.block_bytes, 16))
    tiered.stores, tiered.flows = [store], {"G3": TierFlow()}
    assert await tiered.onboard(OnboardPlan([1], [0], ["G3"])) == [True]
    assert exact(rows[0], 1)
    assert tiered.cost.tiers["G3"].latency_s >= 0.05
    await store.close()

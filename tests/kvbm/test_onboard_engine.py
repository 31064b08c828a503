"""Acceptance: a prompt whose KV was evicted from G1 into G2, G3 or G4 is served from that tier with the
same greedy tokens as a cold run, and the stats show the onboard."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.kvbm.tiers import object_key
from tests.kvbm.tiered_helpers import (
    block_hashes,
    engine,
    flush_g1,
    generate,
    prompt,
    serve_then_evict,
    settle,
    tier,
)

# G4 on loopback moto loads ~1 ms per 32 KiB block; the tiny model recomputes a block in less, so the
# cost model (rightly) recomputes; "always" makes the G4 path run. test_cost_model covers the choice.
ONLY = {
    "G2": lambda tmp, s3: TierConfig(host_bytes=8 << 20, disk_dir="off"),
    "G3": lambda tmp, s3: TierConfig(host_bytes=0, disk_dir=str(tmp / "g3"), disk_bytes=16 << 20),
    "G4": lambda tmp, s3: TierConfig(host_bytes=0, disk_dir="off", object_store=s3.store_url(s3.new_bucket()),
                                     object_bytes=16 << 20, onboard="always"),
    # Through the lossless codec (kvbm/codecs): bit-identical KV, so the same tokens as cold.
    "G3-lossless": lambda tmp, s3: TierConfig(host_bytes=0, disk_dir=str(tmp / "g3"), disk_bytes=16 << 20,
                                              compress_g3="lossless"),
    "G4-lossless": lambda tmp, s3: TierConfig(host_bytes=0, disk_dir="off", object_bytes=16 << 20,
                                              object_store=s3.store_url(s3.new_bucket()), onboard="always",
                                              compress_g4="lossless"),
}


@pytest.mark.parametrize("case", ["G2", "G3", "G4", "G3-lossless", "G4-lossless"])
def test_evicted_prompt_is_onboarded_with_identical_tokens(case, tmp_path, s3):
    p = prompt(300, seed=7)  # 18 full blocks; G1 holds 48
    name = case.split("-")[0]

    async def main():
        cold_eng = engine(None)
        await cold_eng.start()
        cold, _ = await generate(cold_eng, p)
        await cold_eng.close()

        eng = engine(ONLY[case](tmp_path, s3))
        await eng.start()
        try:
            assert [t.tier for t in eng.stats().tiers] == [name]
            if "-" in case:  # the tier stores through its codec
                assert type(eng.loops.get("tiers").tiers.stores[0]).__name__ == "CodecStore"
            first, hit = await generate(eng, p)
            assert first == cold and hit == 0
            await settle(eng)
            await flush_g1(eng)
            hashes = block_hashes(eng, p)
            snap = eng.core.kv_snapshot()
            assert not set(hashes) & set(snap.tiers["G1"])  # evicted from G1 ...
            assert set(hashes[:18]) <= set(snap.tiers[name])  # ... and held by the tier
            before = eng.stats()
            again, hit = await generate(eng, p)
            after = eng.stats()
            assert again == cold
            assert hit == 18 * 16  # every full prompt block but none covering the last token
            assert after.onboarded_blocks - before.onboarded_blocks == 18
            t = tier(eng, name)
            assert t.onboard_blocks >= 18 and t.onboard_bytes >= 18 * eng.kv_layout().block_bytes
            assert t.hits >= 18
        finally:
            await eng.close()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["G3", "G3-lossless"])
def test_flipped_byte_in_g3_is_a_miss_and_a_recompute(case, tmp_path):
    """Raw, and compressed (a lossless frame at its own length in the sparse G3): the flipped byte fails
    G3's checksum before the frame is ever decoded."""
    p = prompt(300, seed=8)

    async def main():
        eng = engine(ONLY[case](tmp_path, None))
        await eng.start()
        try:
            cold = await serve_then_evict(eng, p)
            store = eng.loops.get("tiers").tiers.stores[0]
            disk = store.inner if case == "G3-lossless" else store
            if case == "G3-lossless":
                assert disk.variable and disk._book is not None  # frames charged by their pages
            h5 = block_hashes(eng, p)[5]
            slot = disk._slots.map[h5]
            with open(tmp_path / "g3" / eng.core.fingerprint[:16] / "slot-0" / "blocks.dat", "r+b") as f:
                f.seek(slot * disk.slot_bytes + 234)  # past the frame header, inside the zstd payload
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x40]))
            again, hit = await generate(eng, p)
            assert again == cold
            assert hit == 5 * 16  # blocks 0-4 onboarded, 5 failed its checksum: 5.. recomputed
            t = tier(eng, "G3")
            assert t.checksum_failures == 1
            assert eng.stats().onboarded_blocks == 5
        finally:
            await eng.close()

    asyncio.run(main())


@pytest.mark.parametrize("codec", ["none", "lossless"])
def test_truncated_g4_object_is_a_miss_and_a_recompute(codec, tmp_path, s3):
    p = prompt(300, seed=9)

    async def main():
        bucket = s3.new_bucket()
        cfg = TierConfig(host_bytes=0, disk_dir="off", object_store=s3.store_url(bucket), onboard="always",
                         compress_g4=codec)
        eng = engine(cfg)
        await eng.start()
        try:
            cold = await serve_then_evict(eng, p)
            key = object_key(eng.core.fingerprint, block_hashes(eng, p)[3], "" if codec == "none" else codec)
            client = s3.client()
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            client.put_object(Bucket=bucket, Key=key, Body=body[:len(body) // 2])
            again, hit = await generate(eng, p)
            assert again == cold
            assert hit == 3 * 16
            assert tier(eng, "G4").checksum_failures == 1
        finally:
            await eng.close()

    asyncio.run(main())


def _dead_g4(tmp_path, monkeypatch):
    """(config, fault to inject once the engine has started)."""
    from tests.servers import free_port

    dead = f"s3://nowhere?endpoint=http://127.0.0.1:{free_port()}"
    return TierConfig(host_bytes=4 << 20, disk_dir="off", object_store=dead, onboard="always"), lambda: None


def _full_disk(tmp_path, monkeypatch):
    import errno
    import os

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def fill_disk() -> None:  # after the store opened: every block write fails from now on
        monkeypatch.setattr(os, "pwritev", full)
        monkeypatch.setattr(os, "pwrite", full)

    return TierConfig(host_bytes=4 << 20, disk_dir=str(tmp_path / "g3"), disk_bytes=16 << 20), fill_disk


@pytest.mark.parametrize(("name", "failing"), [("G4", _dead_g4), ("G3", _full_disk)],
                         ids=["unreachable-G4", "disk-full-G3"])
def test_failing_tier_is_disabled_and_serving_goes_on(name, failing, tmp_path, monkeypatch, caplog):
    p = prompt(300, seed=10)

    async def main():
        cfg, inject = failing(tmp_path, monkeypatch)
        eng = engine(cfg)
        await eng.start()
        inject()
        try:
            cold = await serve_then_evict(eng, p)
            again, hit = await generate(eng, p)
            assert again == cold and hit == 18 * 16  # G2 still serves
            assert not tier(eng, name).enabled and tier(eng, "G2").onboard_blocks == 18
        finally:
            await eng.close()

    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert f"KV tier {name} disabled, serving continues without it" in caplog.text


def test_client_leaving_mid_onboard_frees_every_block_and_hangs_nothing(tmp_path, monkeypatch):
    """Dynamo #5012's class of bug: a request cancelled while its blocks are being loaded. The tier copy
    finishes (it cannot be interrupted), the engine hears back, frees the blocks; the next request runs."""
    from kvrelay.kvbm.tiered_kv import TieredKv

    p = prompt(300, seed=12)
    started = asyncio.Event()
    real = TieredKv.onboard

    async def slow_onboard(self, plan):
        started.set()
        await asyncio.sleep(0.5)  # a slow tier: the client gives up meanwhile
        return await real(self, plan)

    async def main():
        eng = engine(ONLY["G2"](tmp_path, None))
        await eng.start()
        try:
            cold = await serve_then_evict(eng, p)
            monkeypatch.setattr(TieredKv, "onboard", slow_onboard)
            task = asyncio.create_task(generate(eng, p))
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await settle(eng)
            s = eng.stats()
            assert s.running == s.waiting == 0 and not eng.core.seqs and not eng.core.loading_aborted
            assert s.free_blocks == s.total_blocks
            monkeypatch.setattr(TieredKv, "onboard", real)
            again, hit = await asyncio.wait_for(generate(eng, p), 30)
            assert again == cold and hit == 18 * 16
        finally:
            await eng.close()

    asyncio.run(main())

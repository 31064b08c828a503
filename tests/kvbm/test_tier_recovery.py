"""Issue 29, tier recovery: a tier disabled by an outage is probed again (half-open, on traffic) once its
cool-down passed and re-enabled when the probe works, with a log line both ways. The probe found
G4 (S3 killed and restarted under load) stuck off for 7 minutes: the owner skipped disabled stores, so
their probe never ran."""

from __future__ import annotations

import asyncio
import errno
import os
import time

from kvrelay.kvbm.tier_config import TierConfig
from tests.kvbm.helpers import S3
from tests.kvbm.tiered_helpers import engine, generate, prompt, settle, tier

RETRY_S = 1.0


class Load:
    """Distinct prompts back to back on a few concurrent streams; counts requests and failures."""

    def __init__(self, eng, streams: int = 3):
        self.eng, self.done, self.failed, self.stop = eng, 0, [], asyncio.Event()
        self.tasks = [asyncio.create_task(self._run(k)) for k in range(streams)]

    async def _run(self, k: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                await generate(self.eng, prompt(64, seed=100_000 * k + n), n=4)
                self.done += 1
            except Exception as e:  # noqa: BLE001 - a failed request is what this test counts
                self.failed.append(repr(e))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def _until(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what} not within {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def _objects(s3: S3, bucket: str) -> int:
    return s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0)


def test_g4_comes_back_after_s3_restarts_under_load(tmp_path, caplog):
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    s3 = S3(tmp_path / "a")
    (tmp_path / "a").mkdir()
    s3.proc.start()
    bucket = s3.new_bucket()
    cfg = TierConfig(host_bytes=4 << 20, disk_dir="off", object_store=s3.store_url(bucket),
                     offload="write-through", tier_retry_s=RETRY_S)

    async def main() -> None:
        eng = engine(cfg)
        await eng.start()
        load = Load(eng)
        try:
            await _until(lambda: _objects(s3, bucket) > 0, 30, "blocks in the bucket")
            s3.proc.stop()  # S3 goes away under load
            await _until(lambda: not tier(eng, "G4").enabled, 30, "G4 disabled")
            await asyncio.sleep(2 * RETRY_S)  # probes fail meanwhile: it stays off
            assert not tier(eng, "G4").enabled
            again = S3(tmp_path / "b", port=s3.port)  # back on the same address, empty
            (tmp_path / "b").mkdir()
            again.proc.start()
            again.client().create_bucket(Bucket=bucket)
            took = await _until(lambda: tier(eng, "G4").enabled, 10 * RETRY_S, "G4 re-enabled")
            # one probe interval after the server is back, plus the next offload's time (a loaded machine)
            assert took < RETRY_S + 3.0, took
            await _until(lambda: _objects(again, bucket) > 0, 30, "new blocks in the restarted bucket")
            await load.finish()
            await settle(eng)
            assert load.done > 0 and not load.failed, load.failed[:3]
            again.proc.stop()
        finally:
            if not load.stop.is_set():
                await load.finish()
            await eng.close()

    with caplog.at_level("WARNING", logger="kvrelay.kvbm.tiers"):
        asyncio.run(main())
    assert "KV tier G4 disabled" in caplog.text and "KV tier G4 re-enabled" in caplog.text


def test_g3_comes_back_after_a_disk_error(tmp_path, monkeypatch, caplog):
    cfg = TierConfig(host_bytes=0, disk_dir=str(tmp_path / "g3"), disk_bytes=16 << 20, offload="write-through",
                     tier_retry_s=RETRY_S)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        eng = engine(cfg)
        await eng.start()
        load = Load(eng, streams=2)
        try:
            await _until(lambda: tier(eng, "G3").blocks > 0, 30, "blocks in G3")
            with monkeypatch.context() as m:  # the disk fills up ...
                m.setattr(os, "pwritev", full)
                m.setattr(os, "pwrite", full)
                await _until(lambda: not tier(eng, "G3").enabled, 30, "G3 disabled")
                await asyncio.sleep(2 * RETRY_S)
                assert not tier(eng, "G3").enabled
                stored = tier(eng, "G3").offload_blocks
            took = await _until(lambda: tier(eng, "G3").enabled, 10 * RETRY_S, "G3 re-enabled")  # ... and has room
            assert took < RETRY_S + 3.0, took
            await _until(lambda: tier(eng, "G3").offload_blocks > stored, 30, "new blocks in G3")
            await load.finish()
            assert load.done > 0 and not load.failed, load.failed[:3]
        finally:
            if not load.stop.is_set():
                await load.finish()
            await eng.close()

    with caplog.at_level("WARNING", logger="kvrelay.kvbm.tiers"):
        asyncio.run(main())
    assert "KV tier G3 disabled" in caplog.text and "KV tier G3 re-enabled" in caplog.text

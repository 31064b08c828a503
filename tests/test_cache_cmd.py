"""Issue 14, the user's disk: G3's size is bounded by free space (and says so), and `kvrelay cache
list|clean` shows and removes G3 slots, model cards and stale `kvrelay serve` run directories, never
what a live process uses."""

from __future__ import annotations

import collections
import logging
import os
import shutil

import pytest
import torch

from kvrelay.cli.main import main
from kvrelay.kvbm.tier_config import DISK_FREE_SHARE, TierConfig, open_tiers

Usage = collections.namedtuple("Usage", "total used free")
FREE = 200 << 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KVRELAY_KV_DISK_DIR", raising=False)
    return tmp_path


async def test_g3_takes_at_most_a_share_of_free_space(cache, monkeypatch, caplog):
    # The filesystem reports 200 MiB free (a fake: the real disk must not be filled by a test).
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 40, 0, FREE))
    caplog.set_level(logging.INFO, logger="kvrelay.kvbm.tier_config")
    stores = await open_tiers(TierConfig(host_bytes=0, disk_bytes=4 << 30), 4096, "f" * 32, {})
    try:
        (g3,) = stores
        assert 0 < g3.stats.capacity_bytes <= DISK_FREE_SHARE * FREE
        assert (cache / "kv" / ("f" * 16) / "slot-0" / "blocks.dat").stat().st_size <= DISK_FREE_SHARE * FREE
        assert "instead of --kv-disk-bytes 4.00 GiB (10% of 0.2 GiB free)" in caplog.text
    finally:
        for s in stores:
            await s.close()


async def test_cache_list_and_clean_spare_what_is_in_use(cache, capsys):
    stores = await open_tiers(TierConfig(host_bytes=0, disk_bytes=1 << 20), 4096, "a" * 32, {})  # held open
    closed = await open_tiers(TierConfig(host_bytes=0, disk_bytes=1 << 20), 4096, "b" * 32, {})
    for s in closed:
        await s.put([1], [torch.zeros(4096, dtype=torch.uint8)])  # an empty slot would be removed on close
        await s.close()
    (cache / "model-cards" / "abc-123").mkdir(parents=True)
    (cache / "model-cards" / "abc-123" / "tokenizer.json").write_text("{}")
    dead, live = cache / "run" / "serve-999999999-x", cache / "run" / f"serve-{os.getpid()}-y"
    for d in (dead, live):
        d.mkdir(parents=True)
    try:
        assert main(["cache", "list"]) == 0
        out = capsys.readouterr().out
        rows = {line.split()[-1]: line for line in out.splitlines() if not line.startswith("total")}
        assert "in use" in rows[str(cache / "kv" / ("a" * 16) / "slot-0")]
        assert "free" in rows[str(cache / "kv" / ("b" * 16) / "slot-0")]
        assert "stale" in rows[str(dead)] and "in use" in rows[str(live)]
        assert rows[str(cache / "model-cards" / "abc-123")].startswith("model-card")
        assert main(["cache", "clean"]) == 0
        assert (cache / "kv" / ("a" * 16) / "slot-0" / "blocks.dat").exists()
        assert not (cache / "kv" / ("b" * 16)).exists()
        assert not (cache / "model-cards" / "abc-123").exists()
        assert not dead.exists() and live.exists()
    finally:
        for s in stores:
            await s.close()

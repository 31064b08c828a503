"""Issue 29: G3's files hold other users' prompt KV. They are 0600 in 0700 directories, also when an
older version left a slot readable (the probe found 0644 files in 0755 directories)."""

from __future__ import annotations

import asyncio
import os
import stat

import torch

from kvrelay.kvbm.tier_config import TierConfig, open_tiers


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_g3_files_are_private(tmp_path):
    base = tmp_path / "kv"

    async def main() -> None:
        cfg = TierConfig(host_bytes=0, disk_dir=str(base), disk_bytes=1 << 20)
        (store,) = await open_tiers(cfg, 4096, "f" * 32, {})
        assert await store.put([1, 2], [torch.ones(4096, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8)])
        await store.close()

    old = os.umask(0o022)  # a usual umask: what the probe ran with
    try:
        asyncio.run(main())
    finally:
        os.umask(old)
    slot = base / ("f" * 16) / "slot-0"
    files = sorted(p.name for p in slot.iterdir())
    assert {"blocks.dat", "index.log", "lock"} <= set(files), files
    for name in files:
        assert _mode(slot / name) == 0o600, (name, oct(_mode(slot / name)))
    assert _mode(slot) == 0o700 and _mode(slot.parent) == 0o700
    # a slot an older version left readable is tightened when it is opened again
    for p in (slot.parent, slot):
        os.chmod(p, 0o755)
    for name in files:
        os.chmod(slot / name, 0o644)
    asyncio.run(main())
    assert _mode(slot) == 0o700 and _mode(slot.parent) == 0o700
    for name in ("blocks.dat", "index.log", "lock"):
        assert _mode(slot / name) == 0o600, name

"""The mocker gets the lower tiers from the engine core: a prompt evicted from its G1 is onboarded from
G2 (or G3) like on the native engine, with the same tokens and the same KV events."""

from __future__ import annotations

import asyncio

from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.engines.mocker import MockerEngine
from kvrelay.workers.models.tiny import ensure_tiny_model
from kvrelay.workers.worker import build_engine
from tests.kvbm.tiered_helpers import block_hashes, flush_g1, generate, prompt, settle, tier
from tests.kvbm.worker_proc import WorkerProcess, stats, wait_offloaded
from tests.kvbm.worker_proc import generate as generate_rpc

MODEL = str(ensure_tiny_model())
P = prompt(300, seed=7)  # 18 full blocks; the mocker's G1 holds 48


def test_evicted_prompt_is_onboarded_from_g2_with_g2_events():
    cfg = WorkerConfig(engine="mocker", mocker_kv_tiers=True, kv_host_bytes=8 << 20, kv_disk_dir="off",
                       mocker_num_blocks=48, mocker_speedup=0)

    async def main():
        eng = build_engine(cfg, MODEL)
        assert isinstance(eng, MockerEngine)
        events = []
        eng.subscribe_kv_events(events.extend)
        await eng.start()
        try:
            assert [t.tier for t in eng.stats().tiers] == ["G2"]
            first, hit = await generate(eng, P)
            assert hit == 0
            await settle(eng)
            await flush_g1(eng)
            hashes = block_hashes(eng, P)[:18]
            snap = await eng.kv_snapshot()
            assert not set(hashes) & set(snap.tiers["G1"])  # evicted from G1 ...
            assert set(hashes) <= set(snap.tiers["G2"])  # ... and held by G2
            g2_stored = {h for e in events if e.tier == "G2" and e.kind == "stored" for h in e.seq_hashes}
            assert set(hashes) <= g2_stored, "G2 events name the offloaded blocks"
            assert [e.event_id for e in events] == list(range(1, len(events) + 1))  # one log, every tier
            before, seen = eng.stats(), len(events)
            again, hit = await generate(eng, P)
            after = eng.stats()
            assert again == first  # the mocker's tokens depend on the tokens only: onboarding changes none
            assert hit == 18 * 16  # every full prompt block, none covering the last token
            assert after.onboarded_blocks - before.onboarded_blocks == 18
            assert tier(eng, "G2").onboard_blocks >= 18
            g1_back = {h for e in events[seen:] if e.tier == "G1" and e.kind == "stored" for h in e.seq_hashes}
            assert set(hashes) <= g1_back  # the onboarded blocks are published in G1 again
        finally:
            await eng.close()
        assert eng.stats().used_blocks == 0

    asyncio.run(main())


def test_mocker_worker_process_onboards_from_g3(tmp_path):
    """The same through `kvrelay worker` flags: --mocker-kv-tiers --kv-host-bytes 0 --kv-disk-dir DIR."""
    w = WorkerProcess(tmp_path, "--engine", "mocker", "--model", MODEL, "--mocker-kv-tiers", "--mocker-speedup",
                      "0", "--mocker-num-blocks", "48", "--kv-host-bytes", "0", "--kv-disk-dir",
                      str(tmp_path / "g3"), "--kv-disk-bytes", "16MiB", "--kv-onboard", "always")
    try:
        async def main():
            first, hit = await generate_rpc(w.address, P)
            assert hit == 0
            await wait_offloaded(w.address, "G3", 18)
            for i in range(3):  # fill G1 with other prompts until the first one's blocks are evicted
                await generate_rpc(w.address, prompt(48 * 16 // 2, seed=1000 + i), n=1)
            again, hit = await generate_rpc(w.address, P)
            assert again == first and hit == 18 * 16
            s = await stats(w.address)
            assert s.onboarded_blocks >= 18 and next(t for t in s.tiers if t.tier == "G3").onboard_blocks >= 18

        asyncio.run(main())
        assert "mocker KV tiers: G1 stand-in of 48 blocks" in w.log()
    finally:
        w.stop()

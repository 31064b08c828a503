"""The vLLM-free parts of kvrelay's tier connector (workers/engines/vllm/tier_*.py), without vLLM:

- the scheduler half's decisions (which blocks to load and save, kvrelay hashes) against a scripted
  lookup client (logic only);
- the worker half on real tier stores (G2 in memory, G3 on disk) and tensors shaped like vLLM's CPU
  cache: a save then a load into other blocks restores every byte, rows all come back;
- the lookup question over its real ZMQ socket, answered from real stores by kvbm's cost model;
- the worker's config: which connector vLLM is given for each role;
- the tier events' mapping back to kvrelay events and the stats snapshot's place in vLLM's stats.

The real thing, in real vLLM, is tests/vllm/test_vllm_tiers.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.core.kv_events import KvEventLog
from kvrelay.workers.core.kv_sources.tiers import TierLoad, TierSave
from kvrelay.workers.engines.vllm.config import VllmEngineConfig
from kvrelay.workers.engines.vllm.kv_events import VllmEventMapper
from kvrelay.workers.engines.vllm.stats import tier_snapshot
from kvrelay.workers.engines.vllm.tier_lookup import LookupClient
from kvrelay.workers.engines.vllm.tier_runtime import TierRuntime, TierSettings
from kvrelay.workers.engines.vllm.tier_scheduler import TierScheduler
from kvrelay.workers.engines.vllm.tier_worker import TierWorker

BS, FP = 32, "vllm-test"
NUM_BLOCKS = 16


class ScriptedLookups:
    """Answers what the test says, when it says (the real client is tested below, over its socket)."""

    def __init__(self):
        self.asked: list[tuple[str, list[int], int]] = []
        self.peer_blocks: dict[str, int] = {}  # the last ask's leased peer blocks, by request
        self.answers: dict[str, list[str]] = {}

    def ask(self, request_id, hashes, local, peer=0):
        self.asked.append((request_id, list(hashes), local))
        self.peer_blocks[request_id] = peer

    def result(self, request_id, wait_s):
        return self.answers.pop(request_id, None)

    def forget(self, request_id):
        self.answers.pop(request_id, None)


def test_scheduler_waits_for_the_answer_then_plans_the_load_into_vllms_blocks():
    lookups = ScriptedLookups()
    sched = TierScheduler(BS, FP, lookups)
    prompt = list(range(1000, 1000 + 5 * BS + 7))  # 5 full blocks; all loadable (the last token is computed)
    ours = block_hashes(prompt, BS, root_hash(FP, "salt"), b"lora-a")
    assert sched.matched("r1", prompt, "salt", "lora-a", num_computed=BS) == (None, False)  # not answered yet
    key, hashes, local = lookups.asked[-1]
    assert hashes == ours and local == 1  # kvrelay hashes (salt, LoRA), vLLM's own hit: block 0
    lookups.answers[key] = [None, "G2", "G2", "G3"]  # blocks 1-3 worth loading (block 0 is vLLM's)
    assert sched.matched("r1", prompt, "salt", "lora-a", num_computed=BS) == (3 * BS, True)
    sched.allocated("r1", [40, 41, 42, 43, 44, 45], 3 * BS)
    loads, saves = sched.step([])
    assert loads == [TierLoad("r1", ours[1:4], [41, 42, 43], ["G2", "G2", "G3"])]
    assert sched.hit_sources("r1") == {"G2": 2 * BS, "G3": BS}


def test_scheduler_saves_each_new_full_block_once_and_only_with_known_tokens():
    lookups = ScriptedLookups()
    sched = TierScheduler(BS, FP, lookups)
    prompt = list(range(2 * BS + 10))
    ours = block_hashes(prompt + [7] * BS, BS, root_hash(FP))
    assert sched.matched("r", prompt, "", "", 0) == (None, False)
    lookups.answers[lookups.asked[-1][0]] = []
    assert sched.matched("r", prompt, "", "", 0) == (0, False)
    ids = [5, 6, 7, 8]
    _, saves = sched.step([("r", 0, 2 * BS + 10, prompt, lambda: ids)])  # the prompt's two full blocks
    assert saves == [TierSave(ours[:2], [5, 6])]
    tokens = prompt + [7] * (BS - 10)  # decode fills block 2: saved once all its tokens are known
    _, saves = sched.step([("r", 2 * BS + 10, BS - 11, tokens[:-1], lambda: ids)])
    assert saves == []  # computed through 3 * BS - 1: block 2 is not full yet
    _, saves = sched.step([("r", 3 * BS - 1, 1, tokens[:-1], lambda: ids)])
    assert saves == []  # full after this step, but its last token is not in all_token_ids yet (async)
    _, saves = sched.step([("r", 3 * BS, 1, tokens, lambda: ids)])
    assert saves == [TierSave([ours[2]], [7])]
    _, saves = sched.step([("r", 3 * BS + 1, 1, tokens + [9], lambda: ids)])
    assert saves == []
    sched.finished("r")
    assert "r" not in sched.reqs and not sched.source.asked


def test_a_lookup_asked_with_a_larger_local_hit_is_asked_again():
    lookups = ScriptedLookups()
    sched = TierScheduler(BS, FP, lookups)
    prompt = list(range(4 * BS + 1))
    sched.matched("r", prompt, "", "", 2 * BS)
    sched.matched("r", prompt, "", "", BS)  # vLLM lost block 1 meanwhile: the question changed
    assert [a[2] for a in lookups.asked] == [2, 1]
    lookups.answers[lookups.asked[-1][0]] = [None, "G2", "G2", "G2"]
    assert sched.matched("r", prompt, "", "", 2 * BS) == (2 * BS, True)  # it grew back: blocks 2-3


def caches() -> list[torch.Tensor]:
    return [torch.randn(NUM_BLOCKS, 2, BS, 16) for _ in range(3)]  # vLLM's CPU layout, 3 layers


@pytest.fixture
def runtime(tmp_path):
    tiers = TierConfig(host_bytes=4 << 20, disk_dir=str(tmp_path / "g3"), disk_bytes=32 << 20)
    rt = TierRuntime(TierSettings(key=str(tmp_path), fingerprint=FP, block_size=BS, tiers=tiers,
                                  staging_bytes=2 << 20))
    yield rt
    rt.close()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_worker_saves_blocks_then_loads_them_into_other_blocks_byte_for_byte(runtime, tmp_path):
    kv = caches()
    worker = TierWorker(runtime, NUM_BLOCKS)
    worker.register({f"model.layers.{i}.self_attn": t for i, t in enumerate(kv)})
    assert worker.enabled and runtime.tiered.tiers == ["G2", "G3"]
    hashes = [11, 12, 13]
    worker.save([TierSave(hashes, [2, 3, 9])])
    wait_for(lambda: runtime.rows_in_use == 0 and {11, 12, 13} <= runtime.known)
    events = runtime.take_events()
    assert {(t, k) for t, k, _ in events} == {("G2", "stored"), ("G3", "stored")}
    worker.save([TierSave(hashes, [2, 3, 9])])  # already in a tier: nothing gathered, nothing held
    assert runtime.rows_in_use == 0

    worker.start_loads([TierLoad("r", hashes + [99], [5, 6, 7, 8], ["G2", "G2", "G3", "G2"])])
    wait_for(lambda: bool(worker._loads) and all(f is None or f.done() for _, _, f in worker._loads.values()))
    assert worker.finished_loads() == {"r"}
    for t in kv:
        assert torch.equal(t[[5, 6, 7]], t[[2, 3, 9]])
    assert worker.take_errors() == {8}  # 99 is in no tier: its block is vLLM's to recompute
    assert runtime.onboarded == 3 and runtime.rows_in_use == 0
    assert worker.finished_loads() == set()  # reported once


@pytest.mark.parametrize("codec", ["lossless", "int8", "int7z"])
def test_a_g3_codec_under_vllm_restores_every_byte_or_is_left_out(codec, tmp_path, caplog):
    """vLLM's rows are words of its cache dtype in its backend's order: lossless splits them into byte
    planes (and restores every byte); the lossy codecs need the engine's channel layout, so under vLLM
    the tier is left out with a WARNING rather than quantizing the wrong lanes."""
    tiers = TierConfig(host_bytes=0, disk_dir=str(tmp_path / "g3"), disk_bytes=32 << 20, compress_g3=codec)
    rt = TierRuntime(TierSettings(key=str(tmp_path), fingerprint=FP, block_size=BS, tiers=tiers,
                                  staging_bytes=2 << 20))
    try:
        kv = caches()
        worker = TierWorker(rt, NUM_BLOCKS)
        with caplog.at_level("WARNING"):
            worker.register({f"model.layers.{i}.self_attn": t for i, t in enumerate(kv)})
        if codec != "lossless":
            assert not worker.enabled and rt.tiered.tiers == []
            assert f"--kv-compress-g3 {codec}" in caplog.text
            return
        store = rt.tiered.stores[0]
        assert type(store).__name__ == "CodecStore" and store.codec.shape.dtype == "float32"
        worker.save([TierSave([31, 32, 33], [1, 4, 5])])
        wait_for(lambda: rt.rows_in_use == 0 and {31, 32, 33} <= rt.known)
        assert store.stats.used_bytes < 3 * store.block_bytes  # the planes compressed
        worker.start_loads([TierLoad("r", [31, 32, 33], [10, 11, 12], ["G3"] * 3)])
        wait_for(lambda: all(f is None or f.done() for _, _, f in worker._loads.values()))
        assert worker.finished_loads() == {"r"} and worker.take_errors() == set()
        for t in kv:
            assert torch.equal(t[[10, 11, 12]], t[[1, 4, 5]])
    finally:
        rt.close()


def test_lookup_over_its_socket_is_answered_by_the_stores_and_the_cost_model(runtime, tmp_path):
    worker = TierWorker(runtime, NUM_BLOCKS)
    worker.register({"layer.0": caches()[0]})
    worker.save([TierSave([21, 22, 23], [0, 1, 2])])
    wait_for(lambda: {21, 22, 23} <= runtime.known)
    client = LookupClient(str(tmp_path))
    try:
        client.ask("a", [21, 22, 23, 24], 1)
        deadline = time.monotonic() + 10
        while (got := client.result("a", 0.05)) is None:
            assert time.monotonic() < deadline
        assert got == [None, "G2", "G2"]  # blocks 1 and 2 (0 is vLLM's; 24 is in no tier)
    finally:
        client.close()


def test_connector_config_per_role():
    tiers = TierConfig(host_bytes=1 << 20, disk_dir="off")
    agg = VllmEngineConfig(model="m", socket_dir="/tmp/x", tiers=tiers, fingerprint=FP).kv_transfer_config()
    assert agg["kv_connector"] == "KvrelayTierConnector" and agg["kv_load_failure_policy"] == "recompute"
    assert agg["kv_connector_extra_config"]["kvrelay"]["fingerprint"] == FP
    pd = VllmEngineConfig(model="m", role="prefill", socket_dir="/tmp/x", tiers=tiers).kv_transfer_config()
    assert pd["kv_connector"] == "MultiConnector"
    assert [c["kv_connector"] for c in pd["kv_connector_extra_config"]["connectors"]] == [
        "NixlConnector", "KvrelayTierConnector"]
    assert VllmEngineConfig(model="m").kv_transfer_config() is None
    off = TierConfig(host_bytes=0, disk_dir="off")
    assert VllmEngineConfig(model="m", role="decode", tiers=off).kv_transfer_config()["kv_connector"] == "NixlConnector"


def test_tier_events_map_to_kvrelay_tier_events_and_others_are_ignored():
    log = KvEventLog()
    m = VllmEventMapper(FP, BS, log)
    m.apply([{"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None, "token_ids": [],
              "block_size": BS, "medium": "CPU", "locality": "LOCAL", "ownership": "kvrelay"},
             {"type": "BlockStored", "block_hashes": [3], "medium": "STORAGE", "locality": "REMOTE",
              "ownership": "kvrelay", "token_ids": [], "block_size": BS},
             {"type": "BlockStored", "block_hashes": [b"\x01"], "medium": "CPU", "token_ids": [0] * BS,
              "block_size": BS},  # vLLM's own offloading: vLLM hashes, not ours
             {"type": "BlockRemoved", "block_hashes": [2], "medium": "CPU", "locality": "LOCAL",
              "ownership": "kvrelay"}])
    got = [(e.tier, e.kind, e.seq_hashes) for e in log.drain()]
    assert got == [("G2", "stored", [1, 2]), ("G4", "stored", [3]), ("G2", "removed", [2])]
    assert log.snapshot([]).tiers == {"G1": [], "G2": [1], "G4": [3]}


def test_tier_stats_are_found_alone_or_under_multiconnector():
    ours = {"kvrelay_tiers": [], "onboarded": 3}
    assert tier_snapshot(ours) is ours
    assert tier_snapshot({"NixlConnector": {"x": 1}, "KvrelayTierConnector": ours}) is ours
    assert tier_snapshot({"NixlConnector": {"x": 1}}) is None and tier_snapshot(None) is None


def test_a_save_larger_than_the_free_rows_saves_its_leading_blocks_and_counts_the_rest(tmp_path):
    block = 3 * 2 * BS * 16 * 4
    rt = TierRuntime(TierSettings(key=str(tmp_path), fingerprint=FP, block_size=BS, staging_bytes=4 * block,
                                  tiers=TierConfig(host_bytes=4 << 20, disk_dir="off")))
    try:
        worker = TierWorker(rt, NUM_BLOCKS)
        worker.register({f"l.{i}": t for i, t in enumerate(caches())})
        assert rt.num_rows == 4  # saves may hold 2
        worker.save([TierSave([1, 2, 3, 4, 5], [0, 1, 2, 3, 4])])
        assert rt.save_skipped == 3
        wait_for(lambda: rt.rows_in_use == 0 and {1, 2} <= rt.known)
        assert 3 not in rt.known
    finally:
        rt.close()
    sized = TierRuntime(TierSettings(key=str(tmp_path / "b"), fingerprint=FP, block_size=BS, staging_bytes=1,
                                     tiers=TierConfig(host_bytes=0, disk_dir="off")))
    try:
        (tmp_path / "b").mkdir()
        w = TierWorker(sized, NUM_BLOCKS)
        w.register({"l.0": caches()[0]}, step_blocks=8)
        assert sized.num_rows == 16  # two steps of 8 new blocks each
    finally:
        sized.close()


def test_a_preempted_request_asks_the_tiers_again_for_the_blocks_it_had_saved():
    lookups = ScriptedLookups()
    sched = TierScheduler(BS, FP, lookups)
    prompt = list(range(3 * BS + 1))
    assert sched.matched("r", prompt, "", "", 0) == (None, False)
    lookups.answers[lookups.asked[-1][0]] = []  # nothing in any tier yet
    assert sched.matched("r", prompt, "", "", 0) == (0, False)
    sched.allocated("r", [1, 2, 3, 4], 0)
    _, saves = sched.step([("r", 0, 3 * BS + 1, prompt, lambda: [1, 2, 3, 4])])
    assert len(saves) == 1 and len(saves[0].hashes) == 3
    # vLLM preempted it and freed its blocks: asked again with no hit, the source asks the tiers again
    assert sched.matched("r", prompt, "", "", 0) == (None, False)
    assert len(lookups.asked) == 2 and lookups.asked[-1][2] == 0
    lookups.answers[lookups.asked[-1][0]] = ["G2", "G2", "G2"]
    assert sched.matched("r", prompt, "", "", 0) == (3 * BS, True)

"""kvrelay's G2/G3/G4 under vLLM (issue 16): `KvrelayTierConnector` in real vLLM, behind `kvrelay serve`.

vLLM's own KV cache is kept small (72 blocks of 32 tokens), so a prompt of 26 blocks is evicted from it
by two others. Every comparison is greedy tokens against a cold run of the same prompt on the same
configuration; `cached_tokens` is what the OpenAI client sees, the tier counters are the worker's
(the ones its /metrics exports).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest

from kvrelay.kvbm.fingerprint import model_fingerprint
from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.kvbm.tiers import disk_index
from kvrelay.kvbm.tiers.object_format import object_key
from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from tests.e2e.serve import worker_stats
from tests.e2e.test_serve_disagg import _metric, _wait_all_workers
from tests.models.smollm2 import model_dir
from tests.vllm.conftest import MODEL, vllm_serve

BS = 32
TOKEN_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M in float32: layers * (K, V) * kv heads * head dim * 4 B
BLOCK_BYTES = BS * TOKEN_BYTES  # 1.4 MiB
SMALL_G1 = ("--max-model-len", "2048", "--kv-cache-bytes", str(2304 * TOKEN_BYTES))  # 72 blocks
_rng = random.Random(16)


def tokens(n: int) -> list[int]:
    return [_rng.randrange(3, 49000) for _ in range(n)]


# 26 loadable blocks each ((840 - 1) // 32). A, B: G2 then G3, and disaggregated; C: a flipped G3 byte;
# E: G3 after a restart; F: G4 across workers; D: a truncated G4 object.
A, B, C, D, E, F = (tokens(840) for _ in range(6))
OTHERS = [tokens(840) for _ in range(8)]
FULL = (len(A) - 1) // BS
G2_BLOCKS = 120  # A, B and two others fit; six more push A out


def complete(srv, prompt: list[int], max_tokens: int = 16) -> tuple[list[int], int]:
    """(greedy token ids, cached_tokens) of one completion."""
    r = httpx.post(f"{srv.base_url}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["logprobs"]["tokens"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def stats(srv):
    discovery = DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir)
    return asyncio.run(worker_stats(discovery, token=srv.internal_token))


def worker_metrics_url(srv) -> str:
    """The worker's own /metrics (its discovery label `metrics`)."""
    async def find():
        disc = make_discovery(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir))
        await disc.start()
        try:
            (inst,) = await list_instances(disc, "default")
            return f"http://{inst.labels['metrics']}"
        finally:
            await disc.close()

    return asyncio.run(find())


def one_worker(srv):
    (_, s), = stats(srv).values()
    return s


def tier(s, name: str):
    return next(t for t in s.tiers if t.tier == name)


def onboarded(srv) -> dict[str, int]:
    return {t.tier: t.onboard_blocks for t in one_worker(srv).tiers}


def wait_saved(srv, name: str, blocks: int, timeout: float = 60.0) -> None:
    """Tier stats ride vLLM's engine steps: poke with a one-token request until the tier has the blocks."""
    deadline = time.monotonic() + timeout
    while tier(one_worker(srv), name).blocks < blocks:
        assert time.monotonic() < deadline, one_worker(srv).tiers
        complete(srv, [5, 6, 7], max_tokens=1)
        time.sleep(0.2)


def _metric_of(text: str, name: str, tier: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'tier="{tier}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {tier} not exported")


def subdir(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def hashes(prompt: list[int]) -> list[int]:
    root = root_hash("vllm-" + model_fingerprint(str(model_dir())))
    return block_hashes(prompt[:FULL * BS], BS, root)


def flip_g3_byte(disk_dir: Path, h: int) -> None:
    """Flip one byte of block `h` in a stopped worker's G3, found through G3's own index log format."""
    for log in disk_dir.rglob("index.log"):
        data = log.read_bytes()
        slot_bytes = disk_index._HEADER.unpack_from(data)[4]
        slot = None
        for off in range(disk_index.HEADER_BYTES, len(data) - disk_index.RECORD_BYTES + 1, disk_index.RECORD_BYTES):
            op, s, seq_hash, *_ = disk_index._RECORD.unpack_from(data, off)
            if seq_hash == h:
                slot = s if op == disk_index.PUT else None
        if slot is not None:
            with open(log.parent / "blocks.dat", "r+b") as f:
                f.seek(slot * slot_bytes + 4321)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x20]))
            return
    raise AssertionError(f"block {h:x} is in no G3 index under {disk_dir}")


@pytest.fixture(scope="module")
def g3_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("g3")


@pytest.fixture(scope="module")
def tiered(tmp_path_factory, g3_dir):
    """One vLLM worker with G2 (120 blocks) and G3 (its own directory, kept for the restart test)."""
    srv = vllm_serve(tmp_path_factory.mktemp("vllm-tiers"), *SMALL_G1, "--kv-host-bytes", str(G2_BLOCKS * BLOCK_BYTES),
                     "--kv-disk-dir", str(g3_dir), "--kv-disk-bytes", "512MiB")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cold(tiered) -> dict[str, list[int]]:
    """Greedy tokens of A and B, computed from scratch (nothing cached yet) on the tiered worker."""
    out = {}
    for name, p in (("A", A), ("B", B)):
        out[name], hit = complete(tiered, p)
        assert hit == 0
    return out


def test_an_evicted_prompt_is_served_from_g2_then_from_g3(tiered, cold):
    for p in OTHERS[:2]:  # 52 more blocks: A's are evicted from vLLM's 72
        complete(tiered, p)
    before = onboarded(tiered)
    warm, hit = complete(tiered, A)
    after = onboarded(tiered)
    assert warm == cold["A"]
    assert hit == FULL * BS, hit
    assert after["G2"] - before["G2"] == FULL and after["G3"] == before["G3"], (before, after)

    for p in OTHERS[2:]:  # 156 more blocks: A is evicted from G2 too, G3 keeps it
        complete(tiered, p)
    before = onboarded(tiered)
    again, hit = complete(tiered, A)
    after = onboarded(tiered)
    assert again == cold["A"]
    assert hit == FULL * BS, hit
    assert after["G3"] - before["G3"] == FULL and after["G2"] == before["G2"], (before, after)
    s = one_worker(tiered)
    assert s.onboarded_blocks == sum(after.values())


def test_tier_bounds_hold_under_200_prompts_and_nothing_leaks(tiered):
    start = one_worker(tiered)
    prefixes = [tokens(BS * k) for k in (2, 5, 9)]
    rng = random.Random(7)
    prompts = [rng.choice(prefixes) + tokens(rng.randrange(1, 200)) for _ in range(200)]
    worst: dict[str, float] = {}
    metrics = worker_metrics_url(tiered)

    async def run() -> None:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(p: list[int]) -> None:
                async with sem:
                    r = await client.post(f"{tiered.base_url}/v1/completions", json={
                        "model": MODEL, "prompt": p, "max_tokens": 4, "temperature": 0})
                    assert r.status_code == 200, r.text

            async def sample() -> None:  # the worker's Prometheus metrics, as an operator sees them
                while True:
                    text = (await client.get(f"{metrics}/metrics")).text
                    for t in ("G2", "G3"):
                        footprint = _metric_of(text, "kvrelay_kv_tier_footprint_bytes", t)
                        capacity = _metric_of(text, "kvrelay_kv_tier_capacity_bytes", t)
                        used, blocks = _metric_of(text, "kvrelay_kv_tier_used_bytes", t), _metric_of(
                            text, "kvrelay_kv_tier_blocks", t)
                        assert footprint <= capacity and used == blocks * BLOCK_BYTES, (t, footprint, capacity)
                        worst[t] = max(worst.get(t, 0.0), footprint / capacity)
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample())
            try:
                await asyncio.gather(*(one(p) for p in prompts))
            finally:
                sampler.cancel()

    asyncio.run(run())
    assert set(worst) == {"G2", "G3"}, "the tiers were never sampled"
    complete(tiered, [5, 6, 7], max_tokens=1)  # one more engine step carries the last tier stats and events
    time.sleep(1.0)
    complete(tiered, [5, 6, 7], max_tokens=1)
    end = one_worker(tiered)
    assert end.offload_pinned == 0  # no staging row is held by a load or a save
    assert end.running == end.waiting == 0 and end.used_blocks <= start.used_blocks + 2, (start, end)
    for t in end.tiers:
        assert t.footprint_bytes <= t.capacity_bytes and t.used_bytes == t.blocks * BLOCK_BYTES, t
        # The router's index learned each tier's blocks from the KV events alone: it agrees with the tier.
        assert _metric(tiered.base_url, f'kvrelay_router_index_blocks{{tier="{t.tier}"}}') == t.blocks, t
    assert tier(end, "G2").evictions > tier(start, "G2").evictions  # the bound was reached, not avoided


def test_g3_is_reused_after_a_restart_and_g4_is_shared_between_workers(tiered, cold, g3_dir, s3, tmp_path):
    cold_c, _ = complete(tiered, C)
    cold_e, _ = complete(tiered, E)
    wait_saved(tiered, "G3", 1)
    tiered.stop()  # the restarted worker takes the stopped one's G3 slot, blocks included
    flip_g3_byte(g3_dir, hashes(C)[5])
    bucket = s3.new_bucket()
    g4 = ("--kv-object-store", s3.store_url(bucket))
    restarted = vllm_serve(subdir(tmp_path, "restarted"), *SMALL_G1, "--kv-host-bytes", "16MiB", "--kv-disk-dir",
                           str(g3_dir), "--kv-disk-bytes", "512MiB", *g4)
    try:
        warm_e, hit_e = complete(restarted, E)  # all from the first worker's G3
        again_c, hit_c = complete(restarted, C)  # blocks 0-4 from G3, 5 fails its checksum: 5.. recomputed
        s = one_worker(restarted)
        cold_f, _ = complete(restarted, F)  # computed here: stored in G2, G3 and G4
        cold_d, _ = complete(restarted, D)
        wait_saved(restarted, "G4", 2 * FULL)
    finally:
        restarted.stop()
    assert warm_e == cold_e and hit_e == FULL * BS, hit_e
    # C: its blocks up to the flipped one were used, the rest recomputed. (cached_tokens is vLLM's count,
    # made when it allocated for the load, before block 5 failed: it still says 26 blocks.)
    assert again_c == cold_c and hit_c >= 5 * BS, hit_c
    assert tier(s, "G3").checksum_failures == 1 and s.onboarded_blocks == FULL + 5, s

    key = object_key("vllm-" + model_fingerprint(str(model_dir())), hashes(D)[3])
    client = s3.client()
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=body[:len(body) // 2])
    fresh = vllm_serve(subdir(tmp_path, "fresh"), *SMALL_G1, "--kv-host-bytes", "64MiB", "--kv-disk-dir",
                       str(tmp_path / "fresh-g3"), *g4, "--kv-onboard", "always")
    try:
        warm_f, hit_f = complete(fresh, F)  # another worker process's blocks, from G4
        warm_d, hit_d = complete(fresh, D)  # blocks 0-2 from G4, 3 is truncated: 3.. recomputed
        s = one_worker(fresh)
    finally:
        fresh.stop()
    assert warm_f == cold_f and hit_f == FULL * BS, hit_f
    assert warm_d == cold_d and hit_d >= 3 * BS, hit_d
    assert s.onboarded_blocks == FULL + 3 and tier(s, "G4").checksum_failures == 1, s
    assert tier(s, "G2").onboard_blocks == tier(s, "G3").onboard_blocks == 0  # its own tiers were empty


def test_disaggregated_with_tiers_matches_aggregated_and_reuses_prefill_blocks(tmp_path, cold):
    srv = vllm_serve(subdir(tmp_path, "pd"), *SMALL_G1, "--prefill-workers", "1", "--decode-workers", "1",
                     "--kv-host-bytes", str(G2_BLOCKS * BLOCK_BYTES), "--kv-disk-dir", str(tmp_path / "pd-g3"),
                     workers=None, env={"KVRELAY_DISAGG_MIN_TOKENS": "1"})
    try:
        _wait_all_workers(srv, 2, timeout=600)
        assert complete(srv, A)[0] == cold["A"]
        assert complete(srv, B)[0] == cold["B"]
        for p in OTHERS[:2]:  # evict A from the prefill worker's vLLM cache
            complete(srv, p)
        before = prefill_worker(srv)
        again, _ = complete(srv, A)
        after = prefill_worker(srv)
        assert again == cold["A"]
        loaded = sum(t.onboard_blocks for t in after.tiers) - sum(t.onboard_blocks for t in before.tiers)
        assert loaded >= FULL // 2, (before.tiers, after.tiers)  # the prefill worker loaded its own offload
    finally:
        srv.stop()


def prefill_worker(srv):
    async def find():
        disc = make_discovery(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir))
        await disc.start()
        try:
            return {i.instance_id: i.role for i in await list_instances(disc, "default")}
        finally:
            await disc.close()

    roles = asyncio.run(find())
    (s,) = [s for iid, (_, s) in stats(srv).items() if roles.get(iid) == "prefill"]
    return s

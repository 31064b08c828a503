"""On the real model, every way a prompt's KV can be reused gives the tokens of a cold aggregated
run: a prefix-cache hit in G1, a load back from G2 (host) and from G3 (disk) after G1 evicted it, and
a disaggregated prefill -> decode handoff over NIXL."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig
from tests.disagg.cluster import Cluster
from tests.disagg.test_disagg_identity import _transfer_kinds
from tests.kvbm.tiered_helpers import flush_g1, generate, settle
from tests.models.smollm2 import chat_prompt, model_dir, raw_prompt

NEW_TOKENS = 24


def _prompts() -> list[list[int]]:
    tok = Tokenizer(model_dir())
    return [chat_prompt(tok, "Explain what a KV cache is in two sentences."), raw_prompt(tok, 300, seed=5)]


def _engine(tiers: TierConfig | None, num_blocks: int) -> NativeEngine:
    return NativeEngine(NativeEngineConfig(model=str(model_dir()), num_blocks=num_blocks, tiers=tiers))


@pytest.fixture(scope="module")
def cold() -> list[list[int]]:
    async def run():
        eng = _engine(None, 256)
        await eng.start()
        try:
            return [(await generate(eng, p, n=NEW_TOKENS))[0] for p in _prompts()]
        finally:
            await eng.close()

    return asyncio.run(run())


def test_prefix_cached_equals_cold(cold):
    async def run():
        eng = _engine(None, 256)
        await eng.start()
        try:
            out = []
            for p in _prompts():
                first, _ = await generate(eng, p, n=NEW_TOKENS)
                again, hit = await generate(eng, p, n=NEW_TOKENS)
                assert hit == (len(p) - 1) // 16 * 16  # every full block but the one with the last token
                out.append((first, again))
            return out
        finally:
            await eng.close()

    for (first, again), want in zip(asyncio.run(run()), cold, strict=True):
        assert first == want and again == want


@pytest.mark.parametrize("name", ["G2", "G3"])
def test_onboarded_from_lower_tier_equals_cold(name, cold, tmp_path):
    tiers = {"G2": TierConfig(host_bytes=64 << 20, disk_dir="off"),
             "G3": TierConfig(host_bytes=0, disk_dir=str(tmp_path / "g3"), disk_bytes=64 << 20)}[name]

    async def run():
        eng = _engine(tiers, 48)  # 768 tokens: flush_g1 evicts everything
        await eng.start()
        try:
            out = []
            for p in _prompts():
                await generate(eng, p, n=NEW_TOKENS)
                await settle(eng, timeout=30)
                await flush_g1(eng)
                before = eng.stats().onboarded_blocks
                again, hit = await generate(eng, p, n=NEW_TOKENS)
                onboarded = eng.stats().onboarded_blocks - before
                assert hit == (len(p) - 1) // 16 * 16 and onboarded == hit // 16, (name, hit, onboarded)
                out.append(again)
            return out
        finally:
            await eng.close()

    assert asyncio.run(run()) == cold


@pytest.mark.parametrize("kind", [k for k in _transfer_kinds() if getattr(k, "values", (k,))[0] == "nixl"])
def test_disaggregated_over_nixl_equals_aggregated(kind, cold):
    cfg = WorkerConfig(model=str(model_dir()), kv_transfer=kind, kv_cache_bytes=96 << 20, kv_host_bytes=0,
                       kv_disk_dir="off")

    async def run():
        async with Cluster(["prefill", "decode"], cfg) as c:
            got = [await c.generate(p, max_tokens=NEW_TOKENS) for p in _prompts()]
            await c.settle()
            decode = c.by_role("decode")[0].engine.stats()
            return got, decode

    got, decode = asyncio.run(run())
    assert got == cold
    assert decode.remote_prefills == len(cold) and decode.pull_failures == 0

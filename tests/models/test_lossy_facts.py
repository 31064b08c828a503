"""Acceptance (issue 32): the default model's factual answers do not change when its KV comes back from a
lossy G3 codec. SmolLM2-135M-Instruct on the native engine answers questions after a ~700-token system
context (kvrelay's corpus); each question is served once on an engine with G3 = the codec, G1's prefix
cache is reset, and it is served again with its KV loaded from G3 (checked: cached tokens): the greedy
answer must equal a cold engine's, word for word."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig
from tests.models.smollm2 import model_dir, raw_prompt

QUESTIONS = ["What is the capital of France?", "What is the largest planet in our solar system?",
             "Who wrote Romeo and Juliet?"]
TOKENS = 24


async def answer(eng: NativeEngine, ids: list[int]) -> tuple[list[int], int]:
    req = EngineRequest(request_id=f"f{id(ids)}{asyncio.get_running_loop().time()}", prompt_token_ids=ids,
                        sampling=SamplingParams(max_tokens=TOKENS, temperature=0.0))
    out, cached = [], 0
    async for o in eng.generate(req):
        out += o.token_ids
        cached = max(cached, o.num_cached_tokens)
    return out, cached


async def settle(eng: NativeEngine) -> None:
    tiers = eng.loops.get("tiers")
    for _ in range(400):
        await tiers.drain()
        await asyncio.sleep(0.05)
        if eng.stats().offload_pinned == 0:
            return
    raise AssertionError("offloads did not settle")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_factual_answers_are_unchanged_from_a_lossy_g3(codec, tmp_path):
    tok = Tokenizer(model_dir())
    context = "Background notes: " + tok.decode(raw_prompt(tok, 700, seed=11))
    prompts = [tok.chat_prompt_ids([{"role": "system", "content": context}, {"role": "user", "content": q}])
               for q in QUESTIONS]
    base = dict(model=str(model_dir()), num_blocks=128, limits=EngineLimits(max_num_batched_tokens=1024))

    async def main():
        cold_eng = NativeEngine(NativeEngineConfig(**base))
        await cold_eng.start()
        cold = []
        try:
            for p in prompts:
                cold_eng.core.pool.reset_prefix_cache()
                cold.append((await answer(cold_eng, p))[0])
        finally:
            await cold_eng.close()
        assert "Paris" in tok.decode(cold[0])  # the model knows it, cold

        eng = NativeEngine(NativeEngineConfig(**base, tiers=TierConfig(
            host_bytes=0, disk_dir=str(tmp_path / "g3"), disk_bytes=1 << 30, onboard="always",
            compress_g3=codec)))
        await eng.start()
        try:
            assert type(eng.loops.get("tiers").tiers.stores[0]).__name__ == "CodecStore"
            for p, want in zip(prompts, cold, strict=True):
                await answer(eng, p)
                await settle(eng)  # released: written back into G3 through the codec
                eng.core.pool.reset_prefix_cache()  # nothing left in G1: the next run loads from G3
                got, cached = await answer(eng, p)
                assert cached >= (len(p) // 16 - 1) * 16  # every full block but the last came from G3
                assert tok.decode(got) == tok.decode(want), (codec, tok.decode(got), tok.decode(want))
                await settle(eng)
                eng.core.pool.reset_prefix_cache()
        finally:
            await eng.close()

    asyncio.run(main())

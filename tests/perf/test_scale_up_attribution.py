"""scale_up_bench tells which worker served a request by the mocker's first-token logprob, a hash of
(seed, prompt): the bench's own computation must agree with what mocker engines of each seed emit, for
both seeds it uses, and tell them apart."""

from __future__ import annotations

import random

from kvrelay.perf.scale_up_bench import NEW_SEED, first_logprob
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.mocker import MockerConfig, MockerEngine
from kvrelay.workers.engines.mocker.config import DEFAULT_MAX_MODEL_LEN
from kvrelay.workers.models.tiny import ensure_tiny_model


async def _first_logprob_emitted(engine: MockerEngine, prompt: list[int]) -> float:
    req = EngineRequest(request_id="p", prompt_token_ids=prompt,
                        sampling=SamplingParams(max_tokens=1, ignore_eos=True, logprobs=True))
    async for out in engine.generate(req):
        assert out.logprobs
        return out.logprobs[0]
    raise AssertionError("no output")


async def test_first_logprob_names_the_seed_that_served():
    limits = EngineLimits().for_model(DEFAULT_MAX_MODEL_LEN)
    engines = {seed: MockerEngine(MockerConfig(model=str(ensure_tiny_model()), limits=limits, speedup=0.0, seed=seed))
               for seed in (0, NEW_SEED)}
    for e in engines.values():
        await e.start()
    try:
        rng = random.Random(3)
        for n in (1, 17, 300):
            prompt = [rng.randrange(3, 2000) for _ in range(n)]
            emitted = {seed: await _first_logprob_emitted(e, prompt) for seed, e in engines.items()}
            assert emitted[0] != emitted[NEW_SEED]
            for seed, lp in emitted.items():
                assert abs(lp - first_logprob(seed, prompt)) < 1e-6
    finally:
        for e in engines.values():
            await e.close()

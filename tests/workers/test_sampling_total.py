"""Sampling is total (issue 14): parameters that used to make `torch.multinomial` raise inside a step
(a temperature of 1e-300 divides logits to inf; a top_p of 1e-300 rounds to 0 in float32 and dropped
every token) neither fail nor disturb the other requests of the batch, and a row whose sampling does
fail ends only that request."""

from __future__ import annotations

import asyncio

import pytest

import kvrelay.workers.engines.native.sampler as sampler
from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig
from tests.workers.hf_models import build_hf_model
from tests.workers.test_native_engine import prompts

STREAM_TOKENS = 60
POISON = {"temp": SamplingParams(max_tokens=40, temperature=1e-300, ignore_eos=True),
          "nucleus": SamplingParams(max_tokens=40, temperature=2.0, top_p=1e-300, seed=3, ignore_eos=True)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(build_hf_model("llama", tmp_path_factory.mktemp("m") / "llama"))


def streams() -> list[EngineRequest]:
    return [EngineRequest(request_id=f"s{i}", prompt_token_ids=p,
                          sampling=SamplingParams(max_tokens=STREAM_TOKENS, ignore_eos=True))
            for i, p in enumerate(prompts(6, 40, seed=21))]


async def run(model: str, requests: list[EngineRequest]) -> dict[str, list[int] | Exception]:
    engine = NativeEngine(NativeEngineConfig(model=model, num_blocks=256))
    await engine.start()
    try:
        async def collect(r: EngineRequest) -> list[int] | Exception:
            try:
                return [t async for o in engine.generate(r) for t in o.token_ids]
            except EngineError as e:
                return e

        got = await asyncio.gather(*(collect(r) for r in requests))
        stats = engine.stats()
        assert stats.running == 0 and stats.free_blocks == stats.total_blocks  # nothing leaked
        return {r.request_id: g for r, g in zip(requests, got, strict=True)}
    finally:
        await engine.close()


async def test_poisonous_parameters_leave_every_stream_intact(llama):
    alone = await run(llama, streams())
    p = prompts(1, 30, seed=4)[0]
    mixed = await run(llama, streams() + [EngineRequest(request_id=k, prompt_token_ids=p, sampling=s)
                                          for k, s in POISON.items()])
    for rid, tokens in alone.items():
        assert mixed[rid] == tokens, rid
    greedy = (await run(llama, [EngineRequest(request_id="g", prompt_token_ids=p,
                                              sampling=SamplingParams(max_tokens=40, ignore_eos=True))]))["g"]
    assert mixed["temp"] == greedy  # below SAMPLING_EPS a temperature is greedy
    assert mixed["nucleus"] == greedy  # the nucleus keeps at least the top token


async def test_a_failing_row_fails_only_its_request(llama, monkeypatch):
    real = sampler._sample_row

    def flaky(logits, p, generator):
        if p.seed == 666:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, p, generator)

    monkeypatch.setattr(sampler, "_sample_row", flaky)
    sampled = [EngineRequest(request_id=f"r{i}", prompt_token_ids=r.prompt_token_ids,
                             sampling=SamplingParams(max_tokens=STREAM_TOKENS, temperature=0.8, seed=i,
                                                     ignore_eos=True))
               for i, r in enumerate(streams())]
    alone = await run(llama, sampled)
    bad = EngineRequest(request_id="bad", prompt_token_ids=prompts(1, 30, seed=4)[0],
                        sampling=SamplingParams(max_tokens=40, temperature=1.0, seed=666))
    mixed = await run(llama, sampled + [bad])
    assert isinstance(mixed.pop("bad"), EngineError)
    assert mixed == alone

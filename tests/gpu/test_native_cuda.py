"""The native engine on CUDA equals `transformers.generate` on CUDA, token for token (greedy), for tiny
random Llama/Qwen2/Qwen3 checkpoints: the compiled Triton attention kernels on the real device, with
batching, chunked prefill and paged decode. Same comparison rule as the CPU test (near-ties only)."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from tests.workers.hf_models import FAMILIES, build_hf_model
from tests.workers.test_native_vs_hf import NEW_TOKENS, PROMPT_LENS, ROPES, compare, run_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_on_cuda_matches_transformers_on_cuda(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_hf_model(family, tmp_path / family, rope=ROPES[family])
    rng = random.Random(4321)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]
    engine = LLMEngine(NativeEngineConfig(model=str(path), device="cuda", limits=EngineLimits(max_num_batched_tokens=300),
                                          num_blocks=512))
    assert engine.kv_cache.is_cuda
    ours = run_engine(engine, prompts, NEW_TOKENS)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    matched = total = 0
    for p, o in zip(prompts, ours, strict=True):
        out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                          pad_token_id=0)
        ref = out.sequences[0, len(p):].tolist()
        m, _, _ = compare(o, ref, torch.stack(out.logits, dim=1)[0].float().cpu())
        matched, total = matched + m, total + len(ref)
    print(f"{family} on {torch.cuda.get_device_name()}: {matched}/{total} positions identical")
    assert matched >= total * 0.9
    assert engine.pool.num_free == engine.pool.num_blocks

"""Native engine vs `transformers.generate`, token for token, for tiny random Llama/Qwen2/Qwen3.

Prompts of mixed lengths (1..1000) run together in one engine, so batching, chunked prefill (the
token budget is smaller than the longest prompt) and paged decode are all exercised. Random weights
can leave near-ties: a position may differ from transformers only where transformers' own top-2 logit
margin is below MARGIN_TOL, and the test reports every such margin. After such a tie the sequences
legitimately diverge, so comparison of that prompt stops there.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from tests.workers.hf_models import FAMILIES, build_hf_model

MARGIN_TOL = 1e-3
PROMPT_LENS = (1, 7, 16, 17, 64, 250, 513, 1000)
NEW_TOKENS = 12

ROPES = {
    "llama": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    "qwen2": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 2048},
    "qwen3": None,
}


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(request_id=str(i), prompt_token_ids=p,
                                         sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id] += o.token_ids
    return [outs[str(i)] for i in range(len(prompts))]


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits, dim=1)[0].float()


def compare(ours: list[int], ref: list[int], logits: torch.Tensor) -> tuple[int, list[float], float]:
    """(positions matched, margins at accepted ties, smallest margin among matched positions)."""
    ties, min_margin = [], float("inf")
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        top2 = torch.topk(logits[i], 2).values
        margin = float(top2[0] - top2[1])
        if a != b:
            assert margin < MARGIN_TOL, f"position {i}: ours {a} vs transformers {b} with margin {margin:.2e}"
            ties.append(margin)
            return i, ties, min_margin
        min_margin = min(min_margin, margin)
    return len(ref), ties, min_margin


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_hf_model(family, tmp_path / family, rope=ROPES[family])
    rng = random.Random(1234)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]
    engine = LLMEngine(NativeEngineConfig(model=str(path), limits=EngineLimits(max_num_batched_tokens=300), num_blocks=512))
    ours = run_engine(engine, prompts, NEW_TOKENS)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    matched = total = 0
    all_ties, min_margin = [], float("inf")
    for p, o in zip(prompts, ours, strict=True):
        ref, logits = hf_greedy(hf, p, NEW_TOKENS)
        m, ties, mm = compare(o, ref, logits)
        matched, total = matched + m, total + len(ref)
        all_ties += ties
        min_margin = min(min_margin, mm)
    print(f"{family}: {matched}/{total} positions identical; accepted near-ties {all_ties}; "
          f"smallest margin among identical positions {min_margin:.3e}")
    assert matched >= total * 0.9, "too many near-ties: the test would not be checking anything"
    assert engine.pool.num_free == engine.pool.num_blocks

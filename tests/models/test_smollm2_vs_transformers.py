"""The native engine on SmolLM2 (converted from its GGUF) against transformers' greedy generate on
the same GGUF, loaded by transformers' own GGUF loader: 64 new tokens for each of 8 prompts (chat
and raw, 5 to 1,500 tokens), batched together in one engine, identical at every position."""

from __future__ import annotations

import pytest
import torch

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from tests.models.smollm2 import chat_prompt, gguf_path, model_dir, raw_prompt
from tests.workers.test_native_vs_hf import run_engine

NEW_TOKENS = 64


def _prompts(tok: Tokenizer) -> list[list[int]]:
    chats = [chat_prompt(tok, "What is the capital of France?"),
             chat_prompt(tok, "Tell me a story about a cat."),
             tok.chat_prompt_ids([{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "List three colors."}]),
             chat_prompt(tok, "Summarize this text: " + tok.decode(raw_prompt(tok, 350, seed=3)))]
    raws = [raw_prompt(tok, n, seed=n) for n in (5, 100, 700, 1500)]
    return chats + raws


# ~70 s on a quiet 2-core machine (two 135M-parameter models, 8 x 64 greedy tokens each); 170 s at load 9.
@pytest.mark.timeout(600)
def test_greedy_tokens_equal_transformers_on_the_same_gguf():
    from transformers import AutoModelForCausalLM

    tok = Tokenizer(model_dir())
    prompts = _prompts(tok)
    assert min(map(len, prompts)) == 5 and max(map(len, prompts)) == 1500
    engine = LLMEngine(NativeEngineConfig(model=str(model_dir()), num_blocks=1024,
                                          limits=EngineLimits(max_num_batched_tokens=1024)))
    ours = run_engine(engine, prompts, NEW_TOKENS)
    assert "Paris" in tok.decode(ours[0])

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path().parent), gguf_file=gguf_path().name,
                                              dtype=torch.float32).eval()
    for prompt, got in zip(prompts, ours, strict=True):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        ref = out[0, len(prompt):].tolist()
        first = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)
        assert first is None, f"prompt of {len(prompt)} tokens: first difference at position {first}"

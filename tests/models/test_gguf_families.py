"""GGUF loading for each family (Llama, Qwen2, Qwen3) and each tensor type, against transformers.

A tiny random checkpoint of each family is written as a GGUF the way llama.cpp's converter writes
one (tests/models/gguf_writer.py): Llama's q/k rows permuted, Qwen2's q/k/v biases, Qwen3's q/k norms
and tied embeddings, the tiny model's byte-level BPE as a gpt2-type tokenizer with a chat template.
Its 2-D weights take the types F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, Q2_K, Q3_K, Q4_K, Q5_K
and Q6_K in turn (each type at least once per file, on different tensors in each family); norms and
biases stay F32, as llama.cpp keeps them.

kvrelay converts the file (ensure_converted) and the native engine runs the conversion; transformers
loads the same file with its own GGUF loader. Greedy tokens must be identical, allowing near-ties
exactly as tests/workers/test_native_vs_hf.py does; the converted tensors must equal the checkpoint's
(F32 bit for bit, the rest within their type's rounding); and the converted tokenizer must encode,
decode and apply the chat template as transformers' GGUF tokenizer does.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from kvrelay.workers.models.gguf_convert import ensure_converted
from kvrelay.workers.models.gguf_file import GgufFile
from kvrelay.workers.models.tiny import CHAT_TEMPLATE, ensure_tiny_model
from tests.models.gguf_writer import QK_K, ROUND_TRIP_TOL, tokenizer_fields, write_gguf
from tests.workers.hf_models import FAMILIES, build_hf_model
from tests.workers.test_native_vs_hf import MARGIN_TOL, compare, run_engine

TYPES = tuple(ROUND_TRIP_TOL)  # F32 F16 BF16 Q8_0 Q5_0 Q5_1 Q4_0 Q4_1 and the K-quants Q2_K..Q6_K
HIDDEN = QK_K  # every row length (hidden, heads * head_dim, 3 * hidden) is whole K-quant super-blocks
VOCAB = 2048  # the tiny model's tokenizer (checked below)
PROMPT_LENS = (1, 6, 33, 190)
NEW_TOKENS = 10
BOS, EOS, IM_START, IM_END = 0, 1, 2, 3  # the tiny tokenizer's special tokens, in this order
USER_DEFINED = 4  # llama.cpp's token type for added tokens that are not special (Qwen3's <think>)

# What llama.cpp writes for models of each family: Llama 3's tokenizer adds BOS and ends at EOS,
# Qwen's adds none and ends turns at <|im_end|>. Qwen3 as released has head_dim 128 != hidden / heads,
# so its file carries attention.key_length (the others leave head_dim to be derived). transformers'
# GGUF loader ignores key_length for qwen3 and keeps Qwen3Config's default head_dim, 128: it is a valid
# reference only because that is the head_dim chosen here.
FAMILY = {
    "llama": {"pre": "llama-bpe", "add_bos": True, "eos": EOS, "rope_theta": 500000.0, "head_dim": None},
    "qwen2": {"pre": "qwen2", "add_bos": False, "eos": IM_END, "rope_theta": 1000000.0, "head_dim": None},
    "qwen3": {"pre": "qwen2", "add_bos": False, "eos": IM_END, "rope_theta": 1000000.0, "head_dim": 128},
}
TEXTS = ["In 2024 I had 12345 apples", "Hello,   world!\n\n  Indented\tcode()", "naïve café 東京 🙂",
         "<|im_start|>user\nhi<|im_end|>", "  leading spaces and trailing  ", "don't you're I'll WE'VE"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    d = ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    tokens, token_type, merges = tokenizer_fields(d)
    assert len(tokens) == VOCAB and tokens[BOS] == "<|begin_of_text|>" and tokens[IM_END] == "<|im_end|>"
    return {"tokens": tokens, "token_type": token_type, "merges": merges, "chat_template": CHAT_TEMPLATE}


def _checkpoint(family: str, out) -> tuple[dict, dict]:
    """(config.json, HF state as float32 numpy) of a tiny random model of `family`."""

    spec = FAMILY[family]
    path = build_hf_model(family, out, hidden=HIDDEN, vocab=VOCAB, head_dim=spec["head_dim"],
                          rope={"rope_type": "default", "rope_theta": spec["rope_theta"]})
    config = json.loads((path / "config.json").read_text())
    return config, load_file(str(path / "model.safetensors"))  # tied Qwen3 has no lm_head: no `output`


def _hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """test_native_vs_hf.hf_greedy with an explicit attention mask: these prompts hold BOS (id 0), and
    generate() would take a pad id found in the prompt for padding and mask it out."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                         pad_token_id=EOS)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits, dim=1)[0].float()


def _types(family: str, state: dict) -> dict:
    """Each 2-D weight's type: TYPES in turn, starting at a different type in each family."""
    mats = [n for n, t in state.items() if t.ndim == 2]
    start = FAMILIES.index(family) * 3
    return {n: TYPES[(start + i) % len(TYPES)] for i, n in enumerate(mats)}


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_family_matches_transformers_gguf_loader(family, tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path / "cache"))
    spec = FAMILY[family]
    config, state = _checkpoint(family, tmp_path / "hf")
    assert config["vocab_size"] == len(tiny_tokenizer["tokens"])
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    types = _types(family, state)
    token_type = list(tiny_tokenizer["token_type"])
    if family == "qwen3":  # an added token that is not special: kept whole, and kept by decode
        token_type[IM_START] = USER_DEFINED
    path = write_gguf(gguf_dir / f"tiny-{family}.gguf", family, config, state, types,
                      {**tiny_tokenizer, "token_type": token_type, "pre": spec["pre"], "bos": BOS,
                       "eos": spec["eos"], "pad": EOS, "add_bos": spec["add_bos"]})
    written = {t.type_name for t in GgufFile(path).tensors()}
    assert written == {t.name for t in TYPES}, "the file does not hold every type under test"

    out = ensure_converted(path, progress=lambda _msg: None)
    assert out.parent == tmp_path / "cache" / "models"
    converted = json.loads((out / "config.json").read_text())
    assert converted["head_dim"] == (spec["head_dim"] or HIDDEN // config["num_attention_heads"])
    assert converted["tie_word_embeddings"] == (family == "qwen3")
    # Against the checkpoint itself (so a mistake transformers shares cannot pass): F32 tensors come
    # back bit for bit, the others within their type's rounding, every one in HF's row order.
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == state.keys()
    for name, w in state.items():
        qtype = types.get(name, T.F32)
        err = float(abs(weights[name] - w).max())
        assert err <= ROUND_TRIP_TOL[qtype] * float(abs(w).max()), f"{name} ({qtype.name}): off by {err:.3g}"

    # Tokenizer: the converted tokenizer.json + chat template against transformers' GGUF tokenizer.
    ours = Tokenizer(out)
    hf_tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_tok(text).input_ids, text
        assert (ids[0] == BOS) == spec["add_bos"], text
        assert ours.decode(ids[1:] if spec["add_bos"] else ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    assert ours.chat_prompt_ids(chat) == hf_tok.apply_chat_template(chat, add_generation_prompt=True,
                                                                    tokenize=True, return_dict=False)
    assert ours.eos_token_ids >= {spec["eos"]}

    # Greedy tokens: native engine on the conversion vs transformers on the GGUF file itself.
    rng = random.Random(7)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in PROMPT_LENS]
    prompts[1] = ours.chat_prompt_ids(chat)
    engine = LLMEngine(NativeEngineConfig(model=str(out), limits=EngineLimits(max_num_batched_tokens=64), num_blocks=64))
    got = run_engine(engine, prompts, NEW_TOKENS)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=path.name, dtype=torch.float32).eval()
    matched = total = 0
    ties: list[float] = []
    for prompt, o in zip(prompts, got, strict=True):
        ref, logits = _hf_greedy(hf, prompt, NEW_TOKENS)
        m, t, _ = compare(o, ref, logits)
        matched, total, ties = matched + m, total + len(ref), ties + t
    print(f"{family}: {matched}/{total} positions identical; accepted near-ties (< {MARGIN_TOL}) {ties}")
    assert matched >= total * 0.9, "too many near-ties: the test would not be checking anything"

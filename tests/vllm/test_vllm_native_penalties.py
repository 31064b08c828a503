"""Issue 28: kvrelay's native engine, greedy, with each penalty, min_p and logit_bias, equals vLLM's own
server on SmolLM2 in float32 (8 prompts x 32 tokens each, EOS ignored). The penalties count what vLLM
counts: repetition_penalty the prompt's and the output's tokens, frequency and presence penalties the
output's only; a prompt that repeats words makes the difference visible."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from kvrelay.perf.serve_process import Serve
from tests.models.smollm2 import model_dir
from tests.vllm.conftest import MODEL, VllmServer
from tests.vllm.test_vllm_serve import PROMPTS

TOKENS = 32


def _settings() -> dict[str, dict]:
    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    ids = {w: tok.encode(w, add_special_tokens=False)[0] for w in (".", ",", " the", " a")}
    return {
        "none": {},
        "repetition_penalty": {"repetition_penalty": 1.3},
        "repetition_penalty_below_1": {"repetition_penalty": 0.9},
        "frequency_penalty": {"frequency_penalty": 1.0},
        "negative_frequency_penalty": {"frequency_penalty": -0.5},
        "presence_penalty": {"presence_penalty": 1.2},
        "all_penalties": {"repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.5},
        "min_p": {"min_p": 0.3},
        "logit_bias": {"logit_bias": {str(ids["."]): -100, str(ids[","]): -100, str(ids[" the"]): 2.5,
                                      str(ids[" a"]): -3}},
    }


SETTINGS = _settings()


def greedy_tokens(base_url: str, fields: dict) -> list[list[str]]:
    out = []
    for p in PROMPTS:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"{p} {p}"}], "temperature": 0,
                "max_tokens": TOKENS, "ignore_eos": True, "logprobs": True, **fields}
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        out.append([t["token"] for t in r.json()["choices"][0]["logprobs"]["content"]])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, list[list[str]]]]:
    """setting -> {"native": tokens, "vllm": tokens}; one server at a time (2 cores)."""
    tmp = tmp_path_factory.mktemp("penalties")
    out: dict[str, dict[str, list[list[str]]]] = {name: {} for name in SETTINGS}
    native = Serve(tmp, "--engine", "native", "--dtype", "float32", "--block-size", "32", workers=1,
                   model=str(model_dir()), env={"KVRELAY_SERVED_MODEL_NAME": MODEL}).start(timeout=300)
    try:
        for name, fields in SETTINGS.items():
            out[name]["native"] = greedy_tokens(native.base_url, fields)
    finally:
        native.stop()
    ref = VllmServer(tmp)
    try:
        for name, fields in SETTINGS.items():
            out[name]["vllm"] = greedy_tokens(ref.base_url, fields)
    finally:
        ref.stop()
    return out


@pytest.mark.parametrize("name", list(SETTINGS))
def test_native_greedy_equals_vllms_server(runs, name):
    native, vllm = runs[name]["native"], runs[name]["vllm"]
    assert all(len(t) == TOKENS for t in native + vllm)
    matched = sum(a == b for n, v in zip(native, vllm, strict=True) for a, b in zip(n, v, strict=True))
    print(f"{name}: {matched} of {len(PROMPTS) * TOKENS} tokens equal")
    assert native == vllm
    if name not in ("none", "min_p"):  # greedy keeps the top token whatever min_p says
        assert native != runs["none"]["native"]  # the field changed the output

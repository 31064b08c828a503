"""GGUF loading: what a bad file does (one line, exit 2, no cache entry), the llama.cpp name and row
order mapping, and the tokenizer built from GGUF metadata against transformers' own GGUF loader."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.workers.models.gguf_convert import _unpermute, converted_path, ensure_converted
from kvrelay.workers.models.gguf_file import GgufError, GgufFile
from tests.models.smollm2 import gguf_path, model_dir


def _kvrelay(*args: str, cache: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVRELAY_CACHE_DIR": cache}
    return subprocess.run([sys.executable, "-m", "kvrelay.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def truncated(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(gguf_path(), "rb") as src:
        path.write_bytes(src.read(50_000_000))  # about half: the header is whole, later tensors are cut
    return path


@pytest.fixture
def wrong_type(tmp_path):
    """A copy whose `blk.3.attn_v.weight` claims Q8_0 instead of its real Q4_1."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = tmp_path / "wrong-type.gguf"
    shutil.copy(gguf_path(), path)
    reader = GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.3.attn_v.weight")
    assert tensor.tensor_type == GGMLQuantizationType.Q4_1
    tensor.field.parts[4][0] = int(GGMLQuantizationType.Q8_0)
    reader.data.flush()
    del reader
    return path


@pytest.mark.parametrize("case, expect", [("truncated", "file is truncated: tensor 'blk."),
                                          ("wrong_type", "tensor 'blk.3.attn_v.weight': as Q8_0")])
def test_corrupt_gguf_is_one_line_exit_2_and_no_cache_entry(case, expect, request, tmp_path):
    path = request.getfixturevalue(case)
    cache = tmp_path / "cache"
    for argv in (("model", "convert", str(path)), ("serve", "--model", str(path), "--http-port", "0")):
        out = _kvrelay(*argv, cache=str(cache))
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], out.stderr
        assert "Traceback" not in out.stderr
    models = cache / "models"
    assert not models.exists() or list(models.iterdir()) == [], "a failed conversion left a cache entry"


def test_header_cut_short_is_a_clear_error(tmp_path):
    path = tmp_path / "short.gguf"
    with open(gguf_path(), "rb") as src:
        path.write_bytes(src.read(1000))
    with pytest.raises(GgufError, match="not a readable GGUF file"):
        GgufFile(path)


def test_unpermute_inverts_llama_cpp_permutation():
    def permute(w, n_head):  # what llama.cpp's converter does to Llama's q and k rows
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for heads in (1, 3, 6):
        assert np.array_equal(_unpermute(permute(w, heads), heads), w)
        assert not np.array_equal(permute(w, heads), w)


def test_conversion_is_reused_and_complete():
    d = model_dir()
    assert d == converted_path(gguf_path())
    assert {p.name for p in d.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                              "tokenizer.json", "tokenizer_config.json", "kvrelay-manifest.json"}
    assert ensure_converted(gguf_path(), progress=lambda m: pytest.fail(f"converted again: {m}")) == d


def test_tokenizer_and_chat_template_equal_transformers_gguf_tokenizer():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path().parent), gguf_file=gguf_path().name)
    ours = Tokenizer(model_dir())
    texts = ["In 2024 I had 12345 apples", "Hello,   world!\n\n  Indented\tcode()", "naïve café 東京 🙂 ẞ",
             "x=1+2*3; print(f'{x:>10}')", "<|im_start|>user\nhi<|im_end|>", "  leading spaces",
             "don't you're I'll WE'VE", "1,000,000.50 $ 3.14159"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    assert ours.chat_prompt_ids(chat) == hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False)
    assert ours.eos_token_ids == {2}  # <|im_end|>: chat turns end there

"""The embedded default model: byte-identical builds, loadable by transformers, usable tokenizer."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvrelay.cli import model_cmd
from kvrelay.cli.parser import Parser
from kvrelay.workers.models import tiny
from kvrelay.workers.models.cache_entry import MANIFEST

BUILD = "import sys; from pathlib import Path; from kvrelay.workers.models.tiny import build_tiny_model; " \
        "build_tiny_model(Path(sys.argv[1]))"


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(model_dir), info


def test_files_present(model_dir):
    assert set(digests(model_dir)) == {"config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json", MANIFEST}


def test_builds_are_byte_identical_in_process_and_across_processes(model_dir, tmp_path):
    expected = digests(model_dir)
    assert digests(tiny.build_tiny_model(tmp_path / "again")) == expected
    # Separate processes with different hash seeds and thread counts; two of them race on one dir.
    runs = [("a", "1", "1"), ("shared", "2", "2"), ("shared", "3", "1")]
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path / name)],
                         env={**os.environ, "PYTHONHASHSEED": seed, "RAYON_NUM_THREADS": threads},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name, seed, threads in runs
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    for name in ("a", "shared"):
        assert digests(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "again", "shared"]  # no temp dirs left


def test_transformers_loads_without_missing_or_unexpected_keys(hf):
    model, tok, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (2048, 128, 4, 2)
    assert len(tok) == cfg.vocab_size
    assert tok.bos_token_id == cfg.bos_token_id == 0
    assert list(model.generation_config.eos_token_id) == [tok.convert_tokens_to_ids(t)
                                                          for t in (tiny.EOS, tiny.IM_END)]


def test_greedy_generate_runs_and_is_deterministic(hf):
    model, tok, _ = hf
    inputs = tok("The keeper opened the ledger", return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert first.shape[1] > inputs["input_ids"].shape[1]
    assert first.tolist() == second.tolist()


@pytest.mark.parametrize("text", ["Hello, world!", "héllo 世界 🙂", "  two  spaces\n\ttabs\n", "x = {'a': 1}  # ok",
                                  "Καλημέρα — naïve café", ""])
def test_tokenizer_round_trips(hf, text):
    _, tok, _ = hf
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text)
    assert with_bos[0] == tok.bos_token_id and tok.decode(with_bos, skip_special_tokens=True) == text


def test_special_tokens_are_single_ids(hf):
    _, tok, _ = hf
    ids = tok.encode("".join(tiny.SPECIAL_TOKENS), add_special_tokens=False)
    assert ids == [0, 1, 2, 3]


def test_chat_template_ends_with_generation_prompt(hf):
    _, tok, _ = hf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWeather?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("Weather?<|im_end|>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[:1] == [tok.bos_token_id]  # exactly one BOS: the template's, not a second one
    with pytest.raises(Exception, match="unsupported chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}], tokenize=False)


def test_greedy_top2_margins_are_not_flat(hf):
    import torch

    model, tok, _ = hf
    text = tiny._corpus().decode("utf-8")[:2000]
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    assert margins.median().item() > 0.1
    assert (margins < 1e-3).float().mean().item() < 0.02


def test_ensure_builds_once_into_cache_and_repairs(monkeypatch, tmp_path):
    monkeypatch.setenv("KVRELAY_CACHE_DIR", str(tmp_path))
    path = tiny.default_model_dir()
    assert path == tmp_path / "models" / f"tiny-llama-{tiny.version_tag()}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    expected = digests(path)
    (path / "tokenizer.json").write_text("{}")  # damaged cache entry: rebuilt, not trusted
    assert tiny.ensure_tiny_model() == path and digests(path) == expected


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_model(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_builds_into_out_dir(model_dir, capsys):
    parser = Parser(prog="kvrelay")
    model_cmd.register(parser.add_subparsers(dest="command", parser_class=Parser))
    args: argparse.Namespace = parser.parse_args(["model", "tiny", "--out", str(model_dir)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(model_dir.absolute())

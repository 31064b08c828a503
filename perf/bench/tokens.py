"""Which token ids prompts are made of, and how a request's token ids become an OpenAI request body.

Workloads synthesise every prompt as token ids. `--prompt-format tokens` sends them as they are
(`/v1/completions` with `prompt: [ids]`: exact lengths; kvrelay, vLLM and SGLang accept it).
`--prompt-format text` sends `tokenizer.decode(ids)` (completions `prompt`, or chat `messages`): the
ids are drawn from "word" tokens (a space and letters) whose decoded text re-encodes to the same ids,
so lengths stay exact for the tokenizer given and approximately right for a similar one, and a shared
token prefix is a shared text prefix. The `tokenizers` library is used directly (no transformers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from kvrelay.perf.bench.config import BenchConfig
from kvrelay.perf.bench.workloads import RequestSpec

_WORD = re.compile(r" [A-Za-z]{2,}")
_PRINTABLE = re.compile(r"[ -~]+")
MIN_TEXT_POOL = 64


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))


def token_pool(tokenizer: Tokenizer, prompt_format: str) -> np.ndarray:
    """The ids prompts are drawn from: every non-special id (tokens), or round-trip-safe words (text)."""
    special = set(tokenizer.get_added_tokens_decoder())
    ids = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
    if prompt_format == "text":
        words = [i for i in ids if _WORD.fullmatch(tokenizer.decode([i]))]
        words = [i for i in words if tokenizer.encode(tokenizer.decode([i]), add_special_tokens=False).ids == [i]]
        if len(words) < MIN_TEXT_POOL:  # an unusual tokenizer: fall back to any printable piece
            words = [i for i in ids if _PRINTABLE.fullmatch(tokenizer.decode([i]) or "\0")]
        ids = words
    if not ids:
        raise ValueError("the tokenizer has no usable token ids")
    return np.asarray(ids, dtype=np.int64)


class Renderer:
    """RequestSpec -> JSON body for the endpoint, in the chosen prompt format."""

    def __init__(self, cfg: BenchConfig, model: str, tokenizer: Tokenizer | None):
        if cfg.prompt_format == "text" and tokenizer is None:
            raise ValueError("--prompt-format text needs a tokenizer")
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.cfg.endpoint == "chat" else "/v1/completions"

    def _text(self, ids: Sequence[int]) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": spec.output_len, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.cfg.endpoint == "chat":
            body["messages"] = self.messages(spec)
        elif self.cfg.prompt_format == "tokens":
            body["prompt"] = spec.prompt_tokens()
        else:
            body["prompt"] = self._text(spec.prompt_tokens())
        if self.cfg.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.cfg.extra_body)
        return body

    def messages(self, spec: RequestSpec) -> list[dict[str, str]]:
        """One message per run of same-role segments (a document and its question form one user turn)."""
        merged: list[tuple[str, list[int]]] = []
        for seg in spec.segments:
            if merged and merged[-1][0] == seg.role:
                merged[-1][1].extend(seg.tokens)
            else:
                merged.append((seg.role, list(seg.tokens)))
        return [{"role": role, "content": self._text(ids)} for role, ids in merged]

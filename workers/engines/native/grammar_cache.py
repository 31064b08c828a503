"""`GrammarCache`: the native engine's compiled grammars (llguidance, workers/api/structured.py), one per
distinct constraint for the model's tokenizer, least recently used out past `capacity`.

Where compiling happens: on the asyncio side, in a worker thread, before the request is posted to the
core (`NativeEngine._prepare`), so a new schema never stalls the step thread (llguidance drops the GIL
while it builds a grammar). The step thread then only takes a copy of the compiled prototype
(`matcher`, microseconds). A prototype evicted between the two (more than `capacity` new constraints
in that window) is compiled again on the step thread; `inline_compiles` counts that.

A grammar that does not compile for this tokenizer is the client's mistake: `EngineError` (a 400).
Thread-safety: `compile` runs on any thread, `matcher` on the step thread; the LRU is under a lock
and compiling is outside it (two threads compiling the same constraint at once both succeed).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.structured import StructuredOutput

DEFAULT_CAPACITY = 256


class GrammarCache:
    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: Iterable[int],
                 capacity: int = DEFAULT_CAPACITY):
        self.tokenizer_json, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, sorted(eos_ids)
        self.capacity = capacity
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # llguidance.LLTokenizer, built on first use (~0.2 s for a 49K vocab)
        self._compiled: OrderedDict[StructuredOutput, Any] = OrderedDict()  # -> a fresh llguidance.LLMatcher
        self.compiles = 0
        self.inline_compiles = 0

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build_tokenizer()
            return self._tokenizer

    def _build_tokenizer(self) -> Any:
        import llguidance

        if not self.tokenizer_json.is_file():
            raise EngineError("structured outputs need the model's tokenizer.json, which this model lacks")
        try:  # the logits' width, not the tokenizer's: the mask must cover every row of the logits
            return llguidance.LLTokenizer(self.tokenizer_json.read_text(), n_vocab=self.vocab_size,
                                          eos_token=self.eos_ids or None)
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"structured outputs: this model's tokenizer is not supported ({e})") from None

    def compile(self, s: StructuredOutput) -> Any:
        """The compiled prototype for `s` (cached). Raises EngineError when `s` does not compile."""
        with self._lock:
            proto = self._compiled.get(s)
            if proto is not None:
                self._compiled.move_to_end(s)
                return proto
        proto = self._compile(s)
        with self._lock:
            self._compiled[s] = proto
            self._compiled.move_to_end(s)
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
            self.compiles += 1
        return proto

    def _compile(self, s: StructuredOutput) -> Any:
        import llguidance

        problem = s.problem()
        if problem is not None:
            raise EngineError(f"structured: {problem}")
        try:
            grammar = s.grammar()
        except (ValueError, TypeError) as e:
            raise EngineError(f"structured: {e}") from None
        matcher = llguidance.LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise EngineError(f"structured: the {s.kind} constraint does not compile: {matcher.get_error()[:500]}")
        return matcher

    def cached(self, s: StructuredOutput) -> bool:
        with self._lock:
            return s in self._compiled

    def matcher(self, s: StructuredOutput) -> Any:
        """A fresh matcher for `s` (a copy of the compiled prototype; compiled here if evicted)."""
        with self._lock:
            proto = self._compiled.get(s)
        if proto is None:
            self.inline_compiles += 1
            proto = self.compile(s)
        return proto.deep_copy()

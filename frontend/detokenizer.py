"""Incremental detokenization with stop strings, one request at a time.

Text is produced from a sliding window of token ids, as vLLM's detokenizer does: `ids[prefix:read]`
decodes to `prefix_text`, a text that ends on a character boundary; each step decodes `ids[prefix:]`
and the new text is what follows `prefix_text`. Decoding a window rather than single tokens keeps
context-dependent decoders right (SentencePiece strips a leading space only at the start of a decode).
Per step the work is O(window) = O(new tokens + a few), never O(output so far).

Invariants of the emitted stream (what `step` and `finish` return, concatenated):
- it is a prefix of the full decode of the output ids (before `finish`), and equals it after `finish`
  unless a stop string ended it, in which case it is exactly the full decode up to the first stop
  string occurrence (the one that ends first), which is excluded (OpenAI semantics);
- it never contains an incomplete UTF-8 sequence: text whose window decode ends in U+FFFD (an
  incomplete multi-byte character split across byte-level tokens) is held back until completed;
- it never contains any part of a stop string that later completes: the longest suffix that is a
  proper prefix of some stop string is held back until it is ruled out or completes.

Fast path (issue 19): when the tokenizer `decodes_bytewise` (a lone ByteLevel decoder: decode(ids) is
the lossy UTF-8 decode of the ids' concatenated bytes), a step appends each id's cached bytes to an
incremental UTF-8 decoder instead of decoding a window: no tokenizer call per token. It emits the same
text overall; an incomplete character is held back by the UTF-8 decoder itself (at most 3 bytes), and
bytes that can never complete one become U+FFFD at once, exactly as the full decode has them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens kept as decode context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
MAX_HELD_TOKENS = 32  # past this many tokens of unfinished UTF-8 (only garbage output does that), give up waiting
_TRIM_AT = 256  # drop ids before the window once this many have piled up


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@runtime_checkable
class BytewiseDecoder(Decoder, Protocol):
    """A decoder that may take the fast path: when `decodes_bytewise`, `output_bytes` is what an id adds."""

    decodes_bytewise: bool

    def output_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Delta:
    text: str  # new text to send the client (may be "")
    stopped: bool = False  # a stop string was found: the caller ends the request (finish_reason "stop")
    stop_str: str | None = None  # which stop string (vLLM's `stop_reason`)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True,
                 stop: Iterable[str] = (), min_tokens: int = 0) -> None:
        """`min_tokens`: stop strings are looked for only in the text of output tokens after the first
        `min_tokens` (as vLLM: a request's min_tokens holds back stop strings as well as stop tokens)."""
        self._tok = tokenizer
        self._min_tokens = min_tokens
        self._skip = skip_special_tokens
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))  # "" would stop at once
        self._pending = ""  # decoded text not yet emitted: a possible start of a stop string
        self.stopped = False
        self.stop_str: str | None = None
        self.num_tokens = 0  # output tokens fed so far
        self._utf8 = None
        if isinstance(tokenizer, BytewiseDecoder) and tokenizer.decodes_bytewise:  # the prompt is not needed
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._bytes = tokenizer.output_bytes
            return
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        prefix_text = self._decode(self._ids)
        if prefix_text.endswith(REPLACEMENT):
            # The prompt ends inside a character; its bytes cannot serve as context. Start clean.
            self._ids, self._read, prefix_text = [], 0, ""
        self._done = len(prefix_text)  # chars of decode(ids[prefix:]) already taken (>= len(prefix_text))

    def step(self, new_ids: Sequence[int], *, stop_token: bool = False) -> Delta:
        """Feed the next output tokens; returns the text that is now safe to send.

        `stop_token=True` says the last id is the EOS / stop token id that ended generation: its text is
        not part of the output (as in vLLM), and the stream is flushed as by `finish()`.
        """
        if self.stopped:
            return Delta("", True, self.stop_str)
        cut = self._min_tokens - self.num_tokens
        if 0 < cut < len(new_ids):  # the text before the min_tokens boundary is searched by no stop string
            head = self.step(new_ids[:cut])
            rest = self.step(new_ids[cut:], stop_token=stop_token)
            return Delta(head.text + rest.text, rest.stopped, rest.stop_str)
        self.num_tokens += len(new_ids)
        ids = new_ids[:-1] if stop_token and new_ids else new_ids
        if self._utf8 is not None:
            skip, piece = self._skip, self._bytes
            text = self._utf8.decode(b"".join([piece(i, skip) for i in ids])) if ids else ""
        else:
            text = self._advance(ids)
        delta = self._emit(text)
        if stop_token and not delta.stopped:
            rest = self.finish()
            return Delta(delta.text + rest.text, rest.stopped, rest.stop_str)
        return delta

    def finish(self) -> Delta:
        """The stream ended (length, EOS, abort): flush everything held back. Idempotent."""
        if self.stopped:
            return Delta("", True, self.stop_str)
        if self._utf8 is not None:
            return self._emit(self._utf8.decode(b"", final=True), final=True)
        window = self._decode(self._ids[self._prefix:])
        tail, self._done = window[self._done:], len(window)
        return self._emit(tail, final=True)

    # -- internals ------------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _advance(self, new_ids: Sequence[int]) -> str:
        """Decoded text that became final with `new_ids` (complete characters only)."""
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        window = self._decode(self._ids[self._prefix:])
        held = len(self._ids) - self._read
        if window.endswith(REPLACEMENT) and held <= MAX_HELD_TOKENS:
            # An unfinished character: the text before the trailing U+FFFD run cannot change any more
            # (later bytes only complete or invalidate the trailing sequence), so emit up to it.
            stable = len(window.rstrip(REPLACEMENT))
            out = window[self._done:stable] if stable > self._done else ""
            self._done = max(self._done, stable)
            return out
        out = window[self._done:]
        # The window ends on a character boundary: slide it so the next decode starts there.
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix >= _TRIM_AT:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self._done = len(self._decode(self._ids[self._prefix:self._read]))
        return out

    def _emit(self, text: str, final: bool = False) -> Delta:
        buf = self._pending + text
        if not self._stops or self.num_tokens <= self._min_tokens:
            self._pending = ""
            return Delta(buf)
        # No stop string can start in text already emitted (the held-back suffix guarantees it), so
        # searching the unemitted buffer suffices. Pick the occurrence that ends first: the answer
        # then does not depend on how the text was split into steps.
        best: tuple[int, int, str] | None = None
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            self.stopped, self.stop_str, self._pending = True, best[2], ""
            return Delta(buf[:best[1]], True, best[2])
        keep = 0 if final else _stop_prefix_len(buf, self._stops)
        self._pending = buf[len(buf) - keep:]
        return Delta(buf[:len(buf) - keep])


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best

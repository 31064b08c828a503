"""IncrementalDetokenizer: equals the full decode, never emits broken UTF-8 or any part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrelay.frontend.detokenizer import Delta, IncrementalDetokenizer

FFFD = "\ufffd"
PROMPT = "The keeper opened the ledger. "
# Multi-byte characters that the byte-level BPE splits across tokens (2-, 3- and 4-byte UTF-8).
ALPHABET = list("abc xyz.,!\n") + ["é", "ï", "—", "世", "界", "🙂", "🚀", "Ω"]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text_st = st.text(st.sampled_from(ALPHABET), max_size=40)


def chunks(data, ids: Sequence[int]) -> list[list[int]]:
    """Split `ids` into consecutive steps of random sizes (1..4 tokens; engines send one or more)."""
    out, i = [], 0
    while i < len(ids):
        n = data.draw(st.integers(1, 4))
        out.append(list(ids[i:i + n]))
        i += n
    return out


def stream(det: IncrementalDetokenizer, steps: list[list[int]], expected_prefix_of: str | None = None,
           no_fffd: bool = False) -> tuple[str, Delta | None]:
    """Feed the steps; returns the emitted text and the delta that stopped (None if none did)."""
    out = ""
    for step in steps:
        d = det.step(step)
        if no_fffd:
            assert FFFD not in d.text
        out += d.text
        if expected_prefix_of is not None:
            assert expected_prefix_of.startswith(out), (out, expected_prefix_of)
        if d.stopped:
            return out, d
    d = det.finish()
    return out + d.text, (d if d.stopped else None)


def first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The stop occurrence that ends first (ties: the one starting first): where output must end."""
    hits = [(i + len(s), i, s) for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits)[1:] if hits else None


@SETTINGS
@given(data=st.data(), ids=st.lists(st.integers(0, 2047), max_size=60), skip=st.booleans(),
       with_prompt=st.booleans())
def test_random_ids_stream_equals_full_decode(tok, data, ids, skip, with_prompt):
    prompt = tok.encode(PROMPT) if with_prompt else []
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    out, stopped = stream(det, chunks(data, ids), expected_prefix_of=full, no_fffd=FFFD not in full)
    assert stopped is None and out == full


@SETTINGS
@given(data=st.data(), text=text_st)
def test_text_round_trip_never_emits_replacement_chars(tok, data, text):
    ids = tok.encode(text, add_special_tokens=False)
    out, _ = stream(IncrementalDetokenizer(tok, tok.encode(PROMPT)), chunks(data, ids), text, no_fffd=True)
    assert out == text


def test_multibyte_chars_split_across_tokens_are_held_back(tok):
    text = "héllo 世界 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the tokenizer does split these characters
    det = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    deltas = [det.step([i]).text for i in ids]
    assert "".join(deltas) == text and not any(FFFD in d for d in deltas)
    assert "" in deltas  # some tokens ended mid-character and produced nothing yet
    assert det.finish().text == ""


def test_text_before_an_unfinished_character_is_not_delayed(tok):
    # " 🙂" is one token "Ġ" + partial emoji bytes in the tiny vocab: the space must not wait for the emoji.
    det = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    ids = tok.encode("ab 🙂", add_special_tokens=False)
    out = ""
    for i in ids:
        out += det.step([i]).text
        if tok.decode(ids[:ids.index(i) + 1]).endswith(FFFD):
            assert out == tok.decode(ids[:ids.index(i) + 1]).rstrip(FFFD)
    assert out == "ab 🙂"


@SETTINGS
@given(data=st.data(), before=text_st, after=text_st,
       stops=st.lists(st.text(st.sampled_from(ALPHABET), min_size=1, max_size=4), min_size=1, max_size=4),
       insert=st.booleans())
def test_stop_strings_never_leak(tok, data, before, after, stops, insert):
    text = before + (stops[0] if insert else "") + after
    ids = tok.encode(text, add_special_tokens=False)
    hit = first_stop(text, stops)
    expected = text if hit is None else text[:hit[0]]
    det = IncrementalDetokenizer(tok, tok.encode(PROMPT), stop=stops)
    out, stopped = stream(det, chunks(data, ids), expected_prefix_of=expected, no_fffd=True)
    assert out == expected
    assert (stopped is not None) == (hit is not None) == det.stopped
    if hit is not None:
        assert stopped.stop_str == hit[1] == det.stop_str
        assert det.step([5]) == Delta("", True, hit[1])  # nothing more after a stop


def test_stop_string_examples(tok):
    def run(text: str, stops: list[str]) -> tuple[list[str], Delta | None]:
        det = IncrementalDetokenizer(tok, [], stop=stops)
        deltas = [det.step([i]) for i in tok.encode(text, add_special_tokens=False)]
        return [d.text for d in deltas], next((d for d in deltas if d.stopped), None)

    texts, d = run("Hello END world", ["END"])
    assert "".join(texts) == "Hello " and d.stopped and d.stop_str == "END"
    texts, d = run("abcd", ["abcd", "bc"])  # "bc" completes first
    assert "".join(texts) == "a" and d.stop_str == "bc"
    det = IncrementalDetokenizer(tok, [], stop=["\n\n"])
    assert det.step(tok.encode("one\n", add_special_tokens=False)).text == "one"  # "\n" held back
    assert det.finish() == Delta("\n")  # never completed: flushed at the end


@SETTINGS
@given(data=st.data(), min_tokens=st.integers(0, 12))
def test_min_tokens_hides_stop_strings_in_the_first_tokens(tok, data, min_tokens):
    """As vLLM: stop strings are looked for only in the text of tokens after the first min_tokens, however
    the tokens are split into steps (a step across the boundary is cut there)."""
    ids = tok.encode("ab. ab. ab. ab. ab. ab. ab.", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], stop=["ab."], min_tokens=min_tokens)
    out, d = stream(det, chunks(data, ids))
    head = tok.decode(ids[:min_tokens])
    rest = tok.decode(ids)[len(head):]
    assert d is not None and out == head + rest[:rest.index("ab.")]


def test_stop_token_is_excluded_and_flushes(tok):
    ids = tok.encode("held x", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=False, stop=["xyz"])
    text = "".join(det.step([i]).text for i in ids)
    assert text == "held "  # "x" could start "xyz"
    d = det.step([3], stop_token=True)  # <|im_end|> ended generation: flush, without its own text
    assert text + d.text == "held x" and not d.stopped and det.num_tokens == len(ids) + 1
    # A stop token id that is an ordinary token is not part of the output either (as in vLLM).
    ids = tok.encode("ok.", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [])
    text = "".join(det.step([i]).text for i in ids[:-1])
    assert text + det.step(ids[-1:], stop_token=True).text == tok.decode(ids[:-1])


def test_prompt_ending_mid_character_does_not_break_output(tok):
    ids = tok.encode("世界", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, ids[:1])  # a token-id prompt that stops inside a character
    out = "".join(det.step([i]).text for i in ids[1:]) + det.finish().text
    assert out == tok.decode(ids[1:])


class CountingTokenizer:
    def __init__(self, tok) -> None:
        self.tok, self.longest = tok, 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_step_does_not_grow_with_output(tok):
    counting = CountingTokenizer(tok)
    ids = tok.encode(("A long answer, with 世界 and 🙂 in it. " * 200), add_special_tokens=False)
    det = IncrementalDetokenizer(counting, tok.encode(PROMPT), stop=["never appears"])
    out = "".join(det.step([i]).text for i in ids) + det.finish().text
    assert out == tok.decode(ids) and len(ids) > 2000
    assert counting.longest <= 12  # the window: a few context tokens + the unfinished ones
    assert len(det._ids) < 300  # ids before the window are dropped


def test_garbage_bytes_do_not_grow_the_window_forever(tok):
    lone = tok.encode("世", add_special_tokens=False)[0]  # a lead byte: never completes by itself
    det = IncrementalDetokenizer(_WindowOnly(tok), [])
    for _ in range(200):
        det.step([lone])
    assert len(det._ids) - det._prefix <= 64
    assert det.finish().text.count(FFFD) > 0
    fast = IncrementalDetokenizer(tok, [])  # the bytewise path holds at most one unfinished character
    emitted = "".join(fast.step([lone]).text for _ in range(200))
    assert emitted + fast.finish().text == tok.decode([lone] * 200)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = [*tok.encode("hi", add_special_tokens=False), 2, *tok.encode("there", add_special_tokens=False)]
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    out = "".join(det.step([i]).text for i in ids) + det.finish().text
    assert out == ("hithere" if skip else "hi<|im_start|>there")


@SETTINGS
@given(data=st.data(), text=text_st)
def test_sentencepiece_style_round_trip(sp_tok, data, text):
    # Leading spaces are stripped at the start of every decode: the window's prompt context keeps the
    # space of the first output token; byte-fallback runs complete characters across tokens.
    text = " " + text  # the metaspace pre-tokenizer splits here, so the prompt's tokens stay a prefix
    prompt = sp_tok.encode("The keeper opened")
    full = sp_tok.encode("The keeper opened" + text)
    assert full[:len(prompt)] == prompt
    det = IncrementalDetokenizer(sp_tok, prompt, stop=["never in the text"])
    out, _ = stream(det, chunks(data, full[len(prompt):]), text, no_fffd=True)
    assert out == text
    assert sp_tok.decode(full[len(prompt):]) == text[1:]  # decoding the output alone would lose the space


def test_sentencepiece_token_bytes(sp_tok):
    text = "The keeper héllo 世界 🙂"
    ids = sp_tok.encode(text, add_special_tokens=False)
    assert any(sp_tok._tok.id_to_token(i).startswith("<0x") for i in ids)
    assert b"".join(sp_tok.token_bytes(i) for i in ids) == b" " + text.encode()  # metaspace marks the first word


class _WindowOnly:
    """The tokenizer seen through `decode` alone: forces the sliding-window path on a byte-level vocab."""

    def __init__(self, tok):
        self.decode = tok.decode


@SETTINGS
@given(data=st.data(), ids=st.lists(st.integers(0, 2047), max_size=60), skip=st.booleans(),
       stops=st.lists(st.text(st.sampled_from(ALPHABET), min_size=1, max_size=3), max_size=2))
def test_bytewise_fast_path_emits_what_the_window_path_emits(tok, data, ids, skip, stops):
    assert tok.decodes_bytewise  # the tiny vocab is GPT-2 style ByteLevel: `tok` takes the fast path
    steps = chunks(data, ids)
    fast, fast_stop = stream(IncrementalDetokenizer(tok, tok.encode(PROMPT), skip_special_tokens=skip,
                                                    stop=stops), steps)
    slow, slow_stop = stream(IncrementalDetokenizer(_WindowOnly(tok), tok.encode(PROMPT),
                                                    skip_special_tokens=skip, stop=stops), steps)
    # The same text and stop; how it is split into steps may differ around invalid UTF-8 (the bytewise
    # path emits a U+FFFD as soon as the bytes cannot complete a character).
    assert fast == slow and getattr(fast_stop, "stop_str", None) == getattr(slow_stop, "stop_str", None)


def test_output_bytes_match_decode_for_every_id(tok):
    for skip in (True, False):
        for i in range(tok.vocab_size + 2):
            assert tok.output_bytes(i, skip).decode("utf-8", "replace") == tok.decode([i], skip_special_tokens=skip)

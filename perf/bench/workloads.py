"""The five workloads, as endless (trace: finite) streams of requests, deterministic given `--seed`.

Every prompt is token ids drawn from a pool (see tokens.py); each piece of content comes from its own
random stream keyed by (seed, kind, index), so a request's content never depends on how many
requests came before it or how the run was scheduled.

- random: prompt of --input-len, output of --output-len, both uniform within +-range_ratio.
- prefix: --num-prefixes shared prefixes (--prefix-len) x --suffixes-per-prefix unique suffixes
  (--input-len), shuffled; past N x M requests new suffixes keep reusing the same prefixes.
- multi-turn: --users conversations x --turns; turn t carries the whole history (user turns and
  assistant replies) plus a new user turn. Users are interleaved round-robin; the runner sends a
  user's turn only after its previous turn finished. The assistant replies in the history are
  *synthetic* tokens of --output-len, not the server's real reply: prompts stay exact and identical
  across servers and runs, at the cost that a server cannot hit its cache on the reply it generated
  (only on the earlier prompt). Past U x T requests, a new wave of users starts. A skewed mix:
  the first --long-users users of a wave write turns --long-factor x --input-len long.
- long-doc: --num-docs documents (--doc-len) x --questions-per-doc questions (--input-len), shuffled,
  so each document is reused across its questions; then a new wave of documents.
- trace: a Mooncake JSONL trace (`timestamp` ms, `input_length`, `output_length`, `hash_ids`): block
  i of a prompt is the tokens of hash_ids[i] (--block-size of them, drawn from a stream keyed by the
  hash id alone), cut to input_length; equal hash ids give equal blocks, different ones differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from itertools import count

import msgspec
import numpy as np

from kvrelay.perf.bench.config import BenchConfig

# stream kinds: distinct random streams per kind of content
_RANDOM, _PREFIX, _SUFFIX, _ORDER, _USER, _ASSISTANT, _DOC, _QUESTION, _BLOCK, _PAD, _SYSTEM, _HOT = range(12)
DEFAULT_RANDOM_REQUESTS = 100


class Segment(msgspec.Struct, frozen=True):
    role: str  # "system", "user" or "assistant"
    tokens: list[int]


class RequestSpec(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    segments: list[Segment]
    output_len: int
    session: int = -1  # multi-turn: requests of one session go in turn order, one at a time
    turn: int = 0
    timestamp_ms: float | None = None  # trace replay: arrival offset from the trace

    def prompt_tokens(self) -> list[int]:
        return [t for seg in self.segments for t in seg.tokens]

    def prompt_len(self) -> int:
        return sum(len(seg.tokens) for seg in self.segments)


class TraceRecord(msgspec.Struct):
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int] = []


def rng(seed: int, kind: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, kind, *index])


def draw(pool: np.ndarray, gen: np.random.Generator, n: int) -> list[int]:
    return pool[gen.integers(0, len(pool), n)].tolist()


def _length(gen: np.random.Generator, mean: int, ratio: float) -> int:
    lo, hi = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return int(gen.integers(lo, hi + 1))


def random_workload(cfg: BenchConfig, pool: np.ndarray) -> Iterator[RequestSpec]:
    for i in count():
        gen = rng(cfg.seed, _RANDOM, i)
        n_in, n_out = _length(gen, cfg.input_len, cfg.range_ratio), _length(gen, cfg.output_len, cfg.range_ratio)
        yield RequestSpec(index=i, segments=[Segment("user", draw(pool, gen, n_in))], output_len=n_out)


def _waves(size: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """(wave, a seeded permutation of range(size)) for wave 0, 1, ..."""
    for wave in count():
        yield wave, rng(seed, _ORDER, wave).permutation(size)


def prefix_workload(cfg: BenchConfig, pool: np.ndarray) -> Iterator[RequestSpec]:
    prefixes = [draw(pool, rng(cfg.seed, _PREFIX, p), cfg.prefix_len) for p in range(cfg.num_prefixes)]
    index = count()
    for _, order in _waves(cfg.num_prefixes * cfg.suffixes_per_prefix, cfg.seed):
        for slot in order:
            i = next(index)
            suffix = draw(pool, rng(cfg.seed, _SUFFIX, i), cfg.input_len)
            yield RequestSpec(index=i, segments=[Segment("system", prefixes[int(slot) % cfg.num_prefixes]),
                                                 Segment("user", suffix)], output_len=cfg.output_len)


def multi_turn_workload(cfg: BenchConfig, pool: np.ndarray) -> Iterator[RequestSpec]:
    """Users in a shuffled order each turn (seeded): a fixed order would hand round-robin perfect
    affinity whenever the user count is a multiple of the worker count."""
    index = count()
    system = [Segment("system", draw(pool, rng(cfg.seed, _SYSTEM), cfg.system_len))] if cfg.system_len else []
    for wave in count():
        users = range(wave * cfg.users, (wave + 1) * cfg.users)
        history: dict[int, list[Segment]] = {u: list(system) for u in users}
        for turn in range(cfg.turns):
            order = rng(cfg.seed, _ORDER, wave, turn).permutation(np.array(users))
            for user in (int(u) for u in order):
                long = user - wave * cfg.users < cfg.long_users
                ask = Segment("user", draw(pool, rng(cfg.seed, _USER, user, turn),
                                           cfg.input_len * (cfg.long_factor if long else 1)))
                yield RequestSpec(index=next(index), segments=[*history[user], ask], output_len=cfg.output_len,
                                  session=user, turn=turn)
                reply = Segment("assistant", draw(pool, rng(cfg.seed, _ASSISTANT, user, turn), cfg.output_len))
                history[user] += [ask, reply]


def long_doc_workload(cfg: BenchConfig, pool: np.ndarray) -> Iterator[RequestSpec]:
    index = count()
    per_wave = cfg.num_docs * cfg.questions_per_doc
    for wave, order in _waves(per_wave, cfg.seed + 1):
        docs = {d: draw(pool, rng(cfg.seed, _DOC, wave * cfg.num_docs + d), cfg.doc_len)
                for d in range(cfg.num_docs)}
        for slot in order:
            doc = int(slot) % cfg.num_docs
            if cfg.hot_doc_share > 0 and cfg.num_docs > 1:  # doc 0 with that share, else one of the others
                hot = rng(cfg.seed, _HOT, wave * per_wave + int(slot)).random() < cfg.hot_doc_share
                doc = 0 if hot else 1 + int(slot) % (cfg.num_docs - 1)
            question = draw(pool, rng(cfg.seed, _QUESTION, wave * per_wave + int(slot)), cfg.input_len)
            yield RequestSpec(index=next(index), segments=[Segment("user", docs[doc]), Segment("user", question)],
                              output_len=cfg.output_len)


def read_trace(path: str) -> list[TraceRecord]:
    decoder = msgspec.json.Decoder(TraceRecord)
    with open(path, "rb") as f:
        return [decoder.decode(line) for line in f if line.strip()]


def trace_prompt(record: TraceRecord, block: Callable[[int], list[int]], block_size: int,
                 pad: Callable[[int], list[int]]) -> list[int]:
    """Blocks of the record's hash ids, cut to input_length (padded with fresh tokens if longer)."""
    tokens: list[int] = []
    for h in record.hash_ids:
        if len(tokens) >= record.input_length:
            break
        tokens += block(h)
    if len(tokens) < record.input_length:
        tokens += pad(record.input_length - len(tokens))
    return tokens[: record.input_length]


def trace_workload(cfg: BenchConfig, pool: np.ndarray) -> Iterator[RequestSpec]:
    @functools.lru_cache(maxsize=4096)
    def block(hash_id: int) -> tuple[int, ...]:
        return tuple(draw(pool, rng(cfg.seed, _BLOCK, hash_id), cfg.block_size))

    records = read_trace(cfg.trace)
    t0 = records[0].timestamp if records else 0.0
    for i, rec in enumerate(records):

        def pad(n: int, i: int = i) -> list[int]:
            return draw(pool, rng(cfg.seed, _PAD, i), n)

        tokens = trace_prompt(rec, lambda h: list(block(h)), cfg.block_size, pad)
        yield RequestSpec(index=i, segments=[Segment("user", tokens)], output_len=max(1, rec.output_length),
                          timestamp_ms=rec.timestamp - t0)


GENERATORS: dict[str, Callable[[BenchConfig, np.ndarray], Iterator[RequestSpec]]] = {
    "random": random_workload, "prefix": prefix_workload, "multi-turn": multi_turn_workload,
    "long-doc": long_doc_workload, "trace": trace_workload,
}


def workload(cfg: BenchConfig, pool: np.ndarray) -> Iterator[RequestSpec]:
    return GENERATORS[cfg.workload](cfg, pool)


def natural_size(cfg: BenchConfig) -> int:
    """Requests a run sends when neither --num-requests nor --duration is given."""
    if cfg.workload == "prefix":
        return cfg.num_prefixes * cfg.suffixes_per_prefix
    if cfg.workload == "multi-turn":
        return cfg.users * cfg.turns
    if cfg.workload == "long-doc":
        return cfg.num_docs * cfg.questions_per_doc
    if cfg.workload == "trace":
        with open(cfg.trace, "rb") as f:
            return sum(1 for line in f if line.strip())
    return DEFAULT_RANDOM_REQUESTS

"""Property test: with offload and onboarding in play (write-back and write-through), any interleaving of
submits (some with lower-tier hits), aborts, steps, offload batches, load reports and answers to the
lookups of preempted sequences (which may then load back) returns every block, keeps reference counts
exact, and never pins more than the offload bound.

The loop side is played synchronously here: offload batches complete in any order, and onboard reports
arrive with random per-block failures (a tier miss or a corrupt block).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.workers.core.onboard import OnboardTicket
from kvrelay.workers.core.sequence import Status
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from kvrelay.workers.protocol import EngineError, EngineRequest, SamplingParams
from tests.workers.hf_models import build_hf_model

PREFIXES = [[7] * 9, [11, 12, 13] * 4, []]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_hf_model("llama", tmp_path_factory.mktemp("m") / "micro", layers=1, hidden=32, vocab=64))


def check(engine: LLMEngine, loading: dict[str, OnboardTicket]) -> None:
    pool, tracker = engine.pool, engine.offload
    assert tracker is not None
    holders = [s for s in engine.seqs.values() if s.status in (Status.RUNNING, Status.PULLING)]
    holders += list(engine.loading_aborted.values())
    refs = Counter(b.block_id for s in holders for b in s.blocks)
    refs.update(tracker._inflight.keys())
    for block in pool.blocks:
        assert block.ref_count == refs[block.block_id], f"block {block.block_id} refcount drift"
        assert (block.ref_count == 0) == (block.block_id in pool._free)
    assert tracker.pinned <= tracker.max_pinned
    for rid in loading:
        seq = engine.seqs.get(rid) or engine.loading_aborted.get(rid)
        assert seq is not None and (seq.status is Status.PULLING or rid in engine.loading_aborted)


op = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(range(len(PREFIXES))), st.integers(1, 14), st.integers(1, 24),
              st.lists(st.booleans(), max_size=6)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("offload"), st.integers(0, 3)),
    st.tuples(st.just("loaded"), st.integers(0, 5), st.integers(0, 2**16)),
    st.tuples(st.just("answer"), st.integers(0, 5), st.integers(0, 2**16)),  # a preempted seq's lookup
)


@pytest.mark.parametrize("mode", ["write-back", "write-through"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=40))
def test_offload_and_onboard_keep_block_accounting_exact(model_path, mode, ops):
    engine = LLMEngine(NativeEngineConfig(model=model_path, block_size=4, num_blocks=12, max_num_batched_tokens=24,
                                          max_num_seqs=4, max_waiting=6))
    engine.enable_tiers(mode, CostModel(engine.kv_layout().block_bytes, 4, always=True))
    batches: list[list[int]] = []
    loading: dict[str, OnboardTicket] = {}
    lookups: list[tuple[str, list[int]]] = []  # parked preempted sequences awaiting their tier lookup
    submitted = 0

    def take() -> None:
        batch = engine.take_offload()
        if batch is not None:
            batches.append(batch[1])
        lookups.extend(engine.take_lookups())
        loading.update(engine.take_tickets())

    def answer(i: int, seed: int) -> None:
        rid, hashes = lookups.pop(i % len(lookups))
        rng = random.Random(seed)
        engine.replan(rid, ["G2" if rng.random() < 0.7 else None for _ in hashes])

    def report(rid: str, seed: int) -> None:
        ticket = loading.pop(rid)
        rng = random.Random(seed)
        engine.onboarded(rid, ticket, [rng.random() < 0.8 for _ in ticket.plan.hashes])

    for o in ops:
        if o[0] == "submit":
            _, prefix, tail, max_tokens, lower = o
            prompt = PREFIXES[prefix] + [20 + (submitted + i) % 40 for i in range(tail)]
            rid = str(submitted)
            submitted += 1
            try:
                got = engine.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt,
                                                       sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
                                         in_lower=["G2" if x else None for x in lower])
            except EngineError:
                continue  # queue full is a valid outcome
            if isinstance(got, OnboardTicket):
                loading[rid] = got
        elif o[0] == "abort":
            engine.abort(str(o[1]))
        elif o[0] == "step":
            for _ in range(o[1]):
                engine.step()
        elif o[0] == "offload":
            take()
            if batches:
                engine.offloaded(batches.pop(o[1] % len(batches)))
        elif o[0] == "answer":
            if lookups:
                answer(o[1], o[2])
        elif loading:
            report(sorted(loading)[o[1] % len(loading)], o[2])
        take()
        check(engine, loading)
    for rid in list(loading):
        report(rid, 0)
    for _ in range(2000):
        take()
        while batches:
            engine.offloaded(batches.pop())
        while lookups:
            answer(0, len(lookups))
        for rid in list(loading):
            report(rid, 1)
        if not engine.has_work():
            break
        engine.step()
        check(engine, loading)
    take()
    while batches:
        engine.offloaded(batches.pop())
    assert not engine.has_work() and not engine.seqs and not engine.loading_aborted
    assert not lookups and not engine.scheduler.looking and not engine.tickets
    assert engine.pool.num_free == engine.pool.num_blocks

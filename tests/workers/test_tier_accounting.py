"""Property test: with offload and onboarding in play (write-back and write-through), any interleaving of
submits (some with lower-tier hits), aborts, steps, offload batches, load reports and answers to the
lookups of preempted sequences (which may then load back) returns every block, keeps reference counts
exact, and never pins more than the offload bound.

The tier source's loop half is played synchronously here, through the core's KV-source door: save
batches complete in any order, and load reports arrive with random per-block failures (a tier miss or a
corrupt block).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.kv_sources.save_pins import OffloadTracker
from kvrelay.workers.core.kv_sources.tiers import TierLoad, TierLookup, TierSave, TierSource
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.core.sequence import Status
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from tests.workers.hf_models import build_hf_model

PREFIXES = [[7] * 9, [11, 12, 13] * 4, []]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(build_hf_model("llama", tmp_path_factory.mktemp("m") / "micro", layers=1, hidden=32, vocab=64))


def check(engine: LLMEngine, tracker, loading: dict[str, TierLoad]) -> None:
    pool = engine.pool
    holders = [s for s in engine.seqs.values()
               if s.status in (Status.RUNNING, Status.READY, Status.HELD, Status.WAITING_FOR_KV)]
    holders += list(engine.loading_aborted.values())
    refs = Counter(b.block_id for s in holders for b in s.blocks)
    refs.update(tracker._inflight.keys())
    for block in pool.blocks:
        assert block.ref_count == refs[block.block_id], f"block {block.block_id} refcount drift"
        assert (block.ref_count == 0) == (block.block_id in pool._free)
    assert tracker.pinned <= tracker.max_pinned
    for rid in loading:
        seq = engine.seqs.get(rid) or engine.loading_aborted.get(rid)
        assert seq is not None and (seq.status is Status.WAITING_FOR_KV or rid in engine.loading_aborted)


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
    engine = LLMEngine(NativeEngineConfig(model=model_path, num_blocks=12, limits=EngineLimits(
        block_size=4, max_num_batched_tokens=24, max_num_seqs=4, max_waiting=6)))
    source = TierSource(4, CostModel(engine.kv_layout().block_bytes, 4, always=True),
                        g1_has=engine.kv.cached.__contains__,
                        pins=OffloadTracker(engine.kv.pool, mode, max_pinned=engine.kv.num_blocks // 4))
    engine.door.add_source(source)
    tracker = source.pins
    assert tracker is not None
    batches: list[list[int]] = []
    loading: dict[str, TierLoad] = {}
    lookups: list[tuple[str, list[int]]] = []  # parked preempted sequences awaiting their tier lookup
    submitted = 0

    def take() -> None:
        for job in engine.door.take_jobs():
            if isinstance(job, TierSave):
                batches.append(job.block_ids)
            elif isinstance(job, TierLookup):
                lookups.append((job.request_id, job.hashes))
            else:
                assert isinstance(job, TierLoad) and job.request_id not in loading  # one load at a time
                loading[job.request_id] = job

    def answer(i: int, seed: int) -> None:
        rid, hashes = lookups.pop(i % len(lookups))
        rng = random.Random(seed)
        engine.kv_answered("tiers", rid, ["G2" if rng.random() < 0.7 else None for _ in hashes])

    def report(rid: str, seed: int) -> None:
        job = loading.pop(rid)
        rng = random.Random(seed)
        engine.kv_loaded(rid, [rng.random() < 0.8 for _ in job.hashes])

    for o in ops:
        if o[0] == "submit":
            _, prefix, tail, max_tokens, lower = o
            prompt = PREFIXES[prefix] + [20 + (submitted + i) % 40 for i in range(tail)]
            rid = str(submitted)
            submitted += 1
            try:
                engine.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt,
                                                 sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
                                   hints={"tiers": ["G2" if x else None for x in lower]})
            except EngineError:
                continue  # queue full is a valid outcome
        elif o[0] == "abort":
            engine.abort(str(o[1]))
        elif o[0] == "step":
            for _ in range(o[1]):
                engine.step()
        elif o[0] == "offload":
            take()
            if batches:
                engine.kv_saved("tiers", batches.pop(o[1] % len(batches)))
        elif o[0] == "answer":
            if lookups:
                answer(o[1], o[2])
        elif loading:
            report(sorted(loading)[o[1] % len(loading)], o[2])
        take()
        check(engine, tracker, loading)
    for rid in list(loading):
        report(rid, 0)
    for _ in range(2000):
        take()
        while batches:
            engine.kv_saved("tiers", batches.pop())
        while lookups:
            answer(0, len(lookups))
        for rid in list(loading):
            report(rid, 1)
        if not engine.has_work():
            break
        engine.step()
        check(engine, tracker, loading)
    take()
    while batches:
        engine.kv_saved("tiers", batches.pop())
    assert not engine.has_work() and not engine.seqs and not engine.loading_aborted
    assert not lookups and not engine.scheduler.asking and not engine.scheduler.loading
    assert engine.pool.num_free == engine.pool.num_blocks

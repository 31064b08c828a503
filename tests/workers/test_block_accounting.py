"""Property test: any interleaving of submits, aborts and steps (completions, preemptions, prefix hits)
returns every block to the free pool, and reference counts never go negative.

Runs the real engine (a 1-layer model) with a tiny pool so preemption and prefix sharing are common,
and the mocker's core (the same `EngineCore`, its executor computing nothing) with the same pool.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrelay.workers.api.errors import EngineError
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.core.sequence import Status
from kvrelay.workers.engines.mocker import MockerConfig, MockerEngine
from kvrelay.workers.engines.native import LLMEngine, NativeEngineConfig
from tests.workers.hf_models import build_hf_model

PREFIXES = [[7] * 9, [11, 12, 13] * 4, []]


@pytest.fixture(scope="module", params=["native", "mocker"])
def engine_factory(request, tmp_path_factory):
    path = str(build_hf_model("llama", tmp_path_factory.mktemp("m") / "micro", layers=1, hidden=32, vocab=64))
    limits = EngineLimits(block_size=4, max_num_batched_tokens=24, max_num_seqs=4, max_waiting=6)
    if request.param == "mocker":
        return lambda: MockerEngine(MockerConfig(model=path, speedup=0, num_blocks=12, limits=limits)).core
    return lambda: LLMEngine(NativeEngineConfig(model=path, num_blocks=12, limits=limits))


def check_invariants(engine: EngineCore) -> None:
    pool = engine.pool
    refs = Counter(b.block_id for s in engine.scheduler.running for b in s.blocks)
    for block in pool.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == refs[block.block_id], f"block {block.block_id} refcount drift"
        assert (block.ref_count == 0) == (block.block_id in pool._free)
    for h, block in pool.cached.items():
        assert block.block_hash == h
    for seq in engine.scheduler.waiting:
        assert seq.status is Status.WAITING and not seq.blocks


op = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(range(len(PREFIXES))), st.integers(1, 14), st.integers(1, 12)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=40))
def test_any_interleaving_frees_every_block(engine_factory, ops):
    engine = engine_factory()
    submitted = 0
    for o in ops:
        if o[0] == "submit":
            _, prefix, tail, max_tokens = o
            prompt = PREFIXES[prefix] + [20 + (submitted + i) % 40 for i in range(tail)]
            try:
                engine.add_request(EngineRequest(request_id=str(submitted), prompt_token_ids=prompt,
                                                 sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
            except EngineError:
                pass  # queue full is a valid outcome
            submitted += 1
        elif o[0] == "abort":
            engine.abort(str(o[1]))
        else:
            for _ in range(o[1]):
                engine.step()
        check_invariants(engine)
    for _ in range(2000):  # completions: drain whatever is left
        if not engine.has_work():
            break
        engine.step()
        check_invariants(engine)
    assert not engine.has_work() and not engine.seqs
    assert engine.pool.num_free == engine.pool.num_blocks

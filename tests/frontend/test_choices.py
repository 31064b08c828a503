"""choices.py without workers: seeds per choice, choice 0 first, one failure fails the request, and
closing the stream cancels every choice."""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.frontend.choices import choice_request, run_choices
from kvrelay.frontend.openai_schema import SEED_MAX, SEED_MIN, ApiError
from kvrelay.frontend.pipeline import Piece, Prepared
from kvrelay.workers.api.messages import EngineRequest, SamplingParams


def _prepared(n: int, seed: int | None = 7) -> Prepared:
    req = EngineRequest(request_id="req-1", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4, seed=seed))
    return Prepared("m", None, None, req, [], True, n=n)  # type: ignore[arg-type]  # card, tokenizer unused here


class FakePipeline:
    """Choice i (its seed - 7) yields `steps` pieces; `fail` raises in that choice after its first piece."""

    def __init__(self, steps: int = 3, fail: int | None = None, hang: bool = False):
        self.steps, self.fail, self.hang = steps, fail, hang
        self.started: list[int] = []
        self.closed: list[int] = []

    async def run(self, p: Prepared, count_prompt: bool = True):
        i = p.request.sampling.seed - 7
        self.started.append(i)
        try:
            for k in range(self.steps):
                await asyncio.sleep(0)
                if k == 1 and i == self.fail:
                    raise ApiError.worker_failed("boom")
                if self.hang and i > 0:
                    await asyncio.sleep(3600)
                p.usage.completion_tokens += 1
                yield Piece(f"{i}.{k}", [k], None, "length" if k == self.steps - 1 else None)
        finally:
            self.closed.append(i)


async def _collect(gen) -> list[Piece]:
    return [piece async for piece in gen]


def test_choice_requests_take_seed_plus_i_and_own_ids():
    req = _prepared(3).request
    assert [choice_request(req, i).sampling.seed for i in range(3)] == [7, 8, 9]
    assert [choice_request(req, i).request_id for i in range(3)] == ["req-1", "req-1-c1", "req-1-c2"]
    top = _prepared(2, seed=SEED_MAX).request
    assert choice_request(top, 1).sampling.seed == SEED_MIN  # wraps inside int64, the wire's range
    assert choice_request(_prepared(2, seed=None).request, 1).sampling.seed is None


def test_all_choices_stream_once_each_and_usage_sums():
    fake, p = FakePipeline(), _prepared(4)
    pieces = asyncio.run(_collect(run_choices(fake, p)))  # type: ignore[arg-type]  # a fake Pipeline
    assert fake.started[0] == 0 and sorted(fake.started) == [0, 1, 2, 3]
    assert pieces[0].choice == 0 and pieces[0].text == "0.0"  # choice 0 first, the others after it
    for i in range(4):
        mine = [x for x in pieces if x.choice == i]
        assert [x.text for x in mine] == [f"{i}.{k}" for k in range(3)]
        assert [x.finish_reason for x in mine] == [None, None, "length"]
    finished = [x for x in pieces if x.finish_reason is not None]
    assert [x.more for x in finished] == [True, True, True, False]
    assert p.usage.completion_tokens == 12 and p.usage.prompt_tokens == 3


def test_one_failing_choice_fails_the_request_and_cancels_the_others():
    fake = FakePipeline(steps=50, fail=2)
    with pytest.raises(ApiError) as e:
        asyncio.run(_collect(run_choices(fake, _prepared(4))))  # type: ignore[arg-type]  # a fake Pipeline
    assert e.value.code == "worker_failed"
    assert sorted(fake.closed) == [0, 1, 2, 3]  # nothing left running


def test_closing_the_stream_cancels_every_choice():
    fake = FakePipeline(steps=50, hang=True)

    async def leave_early() -> None:
        gen = run_choices(fake, _prepared(4))  # type: ignore[arg-type]  # a fake Pipeline
        await gen.__anext__()
        await gen.__anext__()
        await gen.aclose()  # what a client disconnect does to the handler's generator

    asyncio.run(asyncio.wait_for(leave_early(), 5))
    assert sorted(fake.started) == [0, 1, 2, 3] and sorted(fake.closed) == [0, 1, 2, 3]

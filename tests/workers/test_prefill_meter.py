"""The worker's prefill throughput for its load reports (workers/prefill_meter.py), and that a real
mocker worker reports it: the rate its timing model implies, within the steps' bookkeeping."""

from __future__ import annotations

import pytest

from kvrelay.workers.api.messages import EngineRequest, EngineStats, SamplingParams
from kvrelay.workers.prefill_meter import PrefillMeter


def stats(tokens: int, seconds: float) -> EngineStats:
    return EngineStats(running=0, waiting=0, used_blocks=0, free_blocks=0, total_blocks=0, prefix_hit_tokens=0,
                       prompt_tokens=0, generated_tokens=0, preemptions=0, prefill_tokens_computed=tokens,
                       prefill_seconds=seconds)


def test_rate_follows_recent_prefill_and_holds_while_idle():
    m = PrefillMeter(half_life_s=1.0)
    assert m.update(stats(0, 0.0)) == 0.0  # nothing computed yet: not known
    assert m.update(stats(1000, 0.1)) == pytest.approx(10_000)
    assert m.update(stats(1000, 0.1)) == pytest.approx(10_000)  # idle: the last rate stays
    for i in range(1, 40):  # the engine slows to 1,000 tokens/s: followed within a few half-lives
        rate = m.update(stats(1000 + 100 * i, 0.1 + 0.1 * i))
    assert rate == pytest.approx(1000, rel=0.05)


async def test_a_mocker_reports_the_prefill_rate_of_its_timing_model():
    from kvrelay.workers.engines.mocker import MockerConfig, MockerEngine
    from kvrelay.workers.models.tiny import ensure_tiny_model

    engine = MockerEngine(MockerConfig(model=str(ensure_tiny_model()), speedup=10.0))
    await engine.start()
    try:
        for i in range(4):  # one at a time: every prefill step is a pure 512-token prefill
            req = EngineRequest(request_id=f"r{i}", prompt_token_ids=[(7 * i + j) % 500 + 4 for j in range(512)],
                                sampling=SamplingParams(max_tokens=2))
            async for _ in engine.generate(req):
                pass
        s = engine.stats()
    finally:
        await engine.close()
    assert s.prefill_tokens_computed == 4 * 512
    wall = engine.timing.prefill_seconds(512) / 10.0  # modeled seconds of one prefill, slept / speedup
    assert s.prefill_seconds == pytest.approx(4 * wall, rel=1e-6)
    assert PrefillMeter().update(s) == pytest.approx(512 / wall, rel=1e-6)

"""The simulator with the planner in the loop: steady load does not oscillate; a new worker only
serves after its startup delay; worker-seconds count starting and draining workers."""

from __future__ import annotations

import random

import pytest

from kvrelay.planner.decision import Bounds
from kvrelay.planner.observation import Pool
from kvrelay.planner.policy import Policy, PolicyKind
from kvrelay.planner.policy_load import LoadConfig
from kvrelay.planner.policy_sla import SlaConfig
from kvrelay.planner.profile import profile_from_cost
from kvrelay.planner.simulate import SimConfig, Simulation
from kvrelay.planner.targets import LatencyTargets
from kvrelay.planner.trace import TraceRequest
from kvrelay.workers.engines.mocker.config import MockerConfig
from kvrelay.workers.engines.mocker.timing import TimingModel

COST = TimingModel(MockerConfig(model="", prefill_us_per_token=50, decode_base_ms=20, decode_us_per_seq=500))
CFG = SimConfig(targets=LatencyTargets(0.5, 0.04), startup_s=2, interval_s=2, max_num_seqs=16)
P, D = Pool.PREFILL, Pool.DECODE


def steady(rate: float, seconds: float, seed: int = 1) -> list[TraceRequest]:
    rnd, t, out = random.Random(seed), 0.0, []
    while (t := t + rnd.expovariate(rate)) < seconds:
        out.append(TraceRequest(timestamp=t * 1000, input_length=512, output_length=64))
    return out


def _direction_changes(counts: list[int]) -> int:
    moves = [b - a for a, b in zip(counts, counts[1:], strict=False) if b != a]
    return sum(1 for a, b in zip(moves, moves[1:], strict=False) if (a > 0) != (b > 0))


@pytest.mark.parametrize("policy", ["load", "sla"])
async def test_steady_load_does_not_oscillate(policy):
    """10 req/s needs 2 decode workers (one does ~8): after settling, at most one change of direction
    per pool in any 10 intervals."""
    bounds = Bounds(min_prefill=1, max_prefill=1, max_decode=4, budget=5)
    pol = Policy(PolicyKind(policy), bounds, load=LoadConfig(targets=LatencyTargets(0.5, 0.04)),
                 sla=SlaConfig(targets=LatencyTargets(0.5, 0.04), predictor="kalman"),
                 profile=profile_from_cost(COST, 16, 16))
    sim = Simulation(steady(10, 120), COST, CFG, {P: 1, D: 1})
    result = await sim.run(pol)
    assert result.attainment > 0.8
    for pool in Pool:
        series = [c[pool] for c in sim.counts]
        for start in range(0, len(series) - 10):
            assert _direction_changes(series[start:start + 10]) <= 1, (pool, series)
    assert max(c[D] for c in sim.counts[5:]) >= 2


async def test_startup_delay_and_worker_seconds():
    trace = steady(2, 20)
    fast = await Simulation(trace, COST, SimConfig(**{**CFG.__dict__, "startup_s": 0.0}), {P: 1, D: 1}).run(None)
    assert fast.worker_seconds == pytest.approx(2 * fast.duration_s)
    sim = Simulation(trace, COST, CFG, {P: 1, D: 1})
    sim.scale({P: 1, D: 2})
    assert sim.ready() == {P: 1, D: 1}  # the new one is starting: it serves 2 s later
    sim.now = 2.0
    assert sim.ready() == {P: 1, D: 2}

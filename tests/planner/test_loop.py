"""The planner loop with a fake connector: Pending scales time out and are reported, errors are
survived, dry run never acts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from kvrelay.planner.decision import Bounds
from kvrelay.planner.loop import Planner
from kvrelay.planner.metrics import PlannerMetrics
from kvrelay.planner.observation import Observation, Pool, PoolObservation
from kvrelay.planner.policy import Policy, PolicyKind
from tests.planner.fakes import FakeConnector, ScriptedObserver

P, D = Pool.PREFILL, Pool.DECODE
HOT = Observation(interval_s=1, request_rate=5, isl=100, osl=50, ttft_p90=5.0, itl_p90=0.01,
                  pools={D: PoolObservation(workers=1, running=8, waiting=20, capacity_seqs=8)})


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def planner(connector, observations, clock, **kw) -> tuple[Planner, CollectorRegistry]:
    reg = CollectorRegistry()
    policy = Policy(PolicyKind.LOAD, Bounds(max_prefill=0, max_decode=8))
    return Planner(ScriptedObserver(observations), connector, policy, PlannerMetrics(reg), interval=1,
                   scale_timeout=5, clock=clock, **kw), reg


async def test_pending_scale_times_out_is_reported_and_planning_continues():
    """#14251: pods Pending forever left the planner "in progress" forever."""
    clock = Clock()
    conn = FakeConnector({P: 0, D: 1}, schedulable=2)  # a third decode worker never schedules
    p, reg = planner(conn, [HOT], clock)
    for _ in range(20):
        await p.step()
        clock.t += 1
    events = [h["event"] for h in p.history]
    assert "scale timed out" in events
    assert conn.calls[0] == {P: 0, D: 2} and conn.calls[1] == {P: 0, D: 3}
    assert len(conn.calls) >= 3  # it planned (and asked) again after the timeout instead of waiting
    assert reg.get_sample_value("kvrelay_planner_scale_timeouts_total", {"pool": "decode"}) >= 1
    assert p.status()["ready"] == {"prefill": 0, "decode": 2}


async def test_connector_error_is_reported_and_not_pending():
    """#12428: a refused scale (budget/quota) must not leave a scale in progress."""
    clock = Clock()
    conn = FakeConnector({P: 0, D: 1}, fail=True)
    p, reg = planner(conn, [HOT], clock)
    for _ in range(3):
        await p.step()
        clock.t += 1
    assert p.pending is None
    assert [h["event"] for h in p.history].count("scale failed") >= 2
    assert reg.get_sample_value("kvrelay_planner_scale_errors_total") >= 2


async def test_dry_run_decides_but_never_scales():
    clock = Clock()
    conn = FakeConnector({P: 0, D: 1})
    p, reg = planner(conn, [HOT], clock, dry_run=True)
    for _ in range(3):
        await p.step()
        clock.t += 1
    assert conn.calls == []
    assert p.status()["desired"] == {"prefill": 0, "decode": 2}
    assert reg.get_sample_value("kvrelay_planner_desired_workers", {"pool": "decode"}) == 2


async def test_no_observation_holds():
    clock = Clock()
    conn = FakeConnector({P: 0, D: 3})
    p, _ = planner(conn, [None], clock)
    for _ in range(3):
        await p.step()
    assert conn.calls == [] and p.desired == {P: 0, D: 3}

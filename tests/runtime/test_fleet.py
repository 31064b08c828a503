"""The fleet (runtime/fleet.py), the one owner of `kvrelay serve`'s child processes, with real child
processes: ready on READY, FAILED's reason raised, a crash restarted, a drained child (exit 0) not,
scale-down drains the newest, close leaves nothing running."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest

from kvrelay.runtime.fleet import Fleet, ProcessPlan, StartFailed

# A child that says READY, exits 0 on SIGTERM (a drain) and otherwise runs until killed.
SERVING = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("READY 127.0.0.1:1", flush=True)
while True:
    time.sleep(0.1)
"""


def plan_of(script: str):
    return lambda kind, i: ProcessPlan(f"{kind}-{i}", (sys.executable, "-c", script))


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_start_waits_until_every_child_is_ready_and_close_stops_them_all():
    fleet: Fleet[str] = Fleet(plan_of(SERVING))
    await fleet.start({"a": 2, "b": 1})
    assert fleet.ready() == {"a": 2, "b": 1}
    procs = fleet.live()
    assert len(procs) == 3
    await fleet.close()
    assert not fleet.live() and all(p.returncode is not None for p in procs)


async def test_a_failed_start_raises_the_childs_reason_and_is_not_retried():
    fleet: Fleet[str] = Fleet(plan_of("print('FAILED no memory for the cache blocks', flush=True)"))
    with pytest.raises(StartFailed, match="a-0 failed to start: no memory for the cache blocks"):
        await fleet.start({"a": 1})
    await _until(lambda: not fleet.slots)
    assert fleet.ready() == {}
    await fleet.close()


async def test_a_child_without_a_ready_line_times_out():
    fleet: Fleet[str] = Fleet(plan_of("import time; time.sleep(30)"), ready_timeout=0.5)
    with pytest.raises(StartFailed, match="a-0 did not become ready within"):
        await fleet.start({"a": 1})
    await fleet.close()
    assert not fleet.live()


async def test_a_crashed_child_is_restarted_and_a_drained_one_is_not():
    fleet: Fleet[str] = Fleet(plan_of(SERVING))
    await fleet.start({"a": 2})
    crashed, drained = fleet.live()
    os.kill(crashed.pid, signal.SIGKILL)
    os.kill(drained.pid, signal.SIGTERM)  # exits 0: removed on purpose
    await _until(lambda: fleet.ready().get("a") == 1 and crashed.pid not in [p.pid for p in fleet.live()]
                 and len(fleet.live()) == 1 and fleet.live()[0].pid != drained.pid)
    assert [s.restarts for s in fleet.slots] == [1]
    await fleet.close()


async def test_scale_down_drains_the_newest_and_scale_up_does_not_wait():
    fleet: Fleet[str] = Fleet(plan_of(SERVING))
    await fleet.start({"a": 1})
    first = fleet.live()[0].pid
    await fleet.scale({"a": 3})  # returns before they serve
    assert fleet.ready() == {"a": 1}
    await _until(lambda: fleet.ready() == {"a": 3})
    await fleet.scale({"a": 1})
    assert fleet.ready() == {"a": 1}  # the stopping ones no longer count at once
    await _until(lambda: [p.pid for p in fleet.live()] == [first])
    await fleet.close()


async def test_a_child_that_fails_to_start_after_scale_leaves_its_slot(caplog):
    fleet: Fleet[str] = Fleet(plan_of("print('FAILED bad flag', flush=True)"))
    await fleet.scale({"a": 1})
    await _until(lambda: not fleet.slots)
    assert "a-0 failed to start: bad flag" in caplog.text
    await fleet.close()

"""`sla` on real mocker workers (issue 17's acceptance, slow lane): the bursty trace of
perf/planner_bench.py, shortened to 180 s (three 4x bursts), replayed against `kvrelay serve --engine
mocker` as static 1P+1D and 1P+2D and with `--planner sla`. `sla` must reach >= 90% SLA attainment
with fewer worker-seconds than the smallest static deployment that reaches the same attainment.
The full-length comparison (with `load` and 1P+3D) is `python -m kvrelay.perf.planner_bench real`.
"""

from __future__ import annotations

import asyncio

import pytest

from kvrelay.perf.planner_bench import TIMING, kvrelay, real_one, write_trace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # three 180 s replays and their starts


def test_sla_beats_the_smallest_static_deployment_on_real_workers(tmp_path):
    trace, profile = tmp_path / "bursty.jsonl", tmp_path / "profile.json"
    write_trace(trace, 180)
    kvrelay("planner", "profile", "--out", str(profile), *TIMING)
    rows = {}
    for name in ("1x1", "1x2", "sla"):
        (tmp_path / name).mkdir()
        rows[name] = asyncio.run(real_one(name, trace, tmp_path / name, 2.0, profile, 0))
    print({n: (round(r["attainment"], 3), round(r["worker_seconds"]), r["errors"]) for n, r in rows.items()})
    sla = rows["sla"]
    assert sla["attainment"] >= 0.9
    reaching = [r["worker_seconds"] for n, r in rows.items() if "x" in n and r["attainment"] >= sla["attainment"]]
    assert reaching, "no static deployment reached sla's attainment: the trace needs a larger one"
    assert sla["worker_seconds"] < min(reaching)
    assert not sla["errors"], sla["errors"]  # scale-downs drain: no request fails

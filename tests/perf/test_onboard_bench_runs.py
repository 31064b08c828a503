"""perf/onboard_bench.py runs against the current engine config (the EngineLimits refactor broke it and no
test noticed: nothing ran it) and onboards from G2 and G3."""

from __future__ import annotations

import json
import subprocess
import sys


def test_onboard_bench_runs_small_and_onboards_from_g2_and_g3(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kvrelay.perf.onboard_bench", "--tokens", "512", "--repeats", "1",
                        "--dir", str(tmp_path / "g3")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert out["cached_tokens"]["G2"] >= 512 - 16 and out["cached_tokens"]["G3"] >= 512 - 16, out

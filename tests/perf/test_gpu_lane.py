"""The gpu lane dry-runs on a machine without CUDA: it says so, skips every CUDA step, still writes its
summary, and refuses a bad flag with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a CPU machine does")
def test_gpu_lane_dry_runs_on_cpu_and_writes_its_summary(tmp_path):
    out = tmp_path / "lane.json"
    p = subprocess.run([sys.executable, "-m", "kvrelay.perf.gpu_lane", "--out", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert "DRY RUN" in p.stdout
    summary = json.loads(out.read_text())
    assert summary["environment"]["cuda"] is False and summary["environment"]["torch"] == torch.__version__
    assert "no CUDA" in summary["tests"]["skipped"] and "no CUDA" in summary["copy_bandwidth"]["skipped"]
    assert summary["install"]["still_missing"] == [] or p.returncode == 1
    assert p.returncode == (0 if summary["ok"] else 1)


def test_gpu_lane_refuses_a_missing_wheels_folder(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kvrelay.perf.gpu_lane", "--wheels", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a directory" in p.stderr

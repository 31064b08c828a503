"""What `kvrelay serve` takes from the disk (issue 30: 8.6 GB after one default serve, unannounced):
with defaults on a fresh cache directory it leaves at most the model plus what its startup line
states, and G3 takes what its blocks need, not its budget up front."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx

from tests.e2e.serve import Serve

MIB, GIB = 2**20, 2**30


def du(path: Path) -> int:
    """Bytes on disk, as `du` counts them (allocated blocks, not apparent sizes)."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_default_serve_takes_the_model_plus_what_it_states(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    for name in [k for k in os.environ if k.startswith("KVRELAY_KV_")]:  # the defaults, not the suite's
        monkeypatch.delenv(name)
    serve = Serve(tmp_path, workers=None, env={"KVRELAY_CACHE_DIR": str(cache)})
    serve.start(timeout=90)  # --model tiny: the default model is 540 MB
    try:
        deadline = time.monotonic() + 60
        while "disk: model" not in serve.read_log():  # logged before the workers start
            assert time.monotonic() < deadline, serve.read_log()
            time.sleep(0.1)
        with httpx.Client(base_url=serve.base_url, timeout=60) as client:
            for i in range(4):  # enough full blocks that the workers offload some to G3 on release
                r = client.post("/v1/completions", json={"model": "kvrelay-tiny", "max_tokens": 8,
                                                         "prompt": f"request {i}: " + "tokens " * 200})
                assert r.status_code == 200, r.text
    finally:
        assert serve.stop() == 0
    log = Path(serve.log.name).read_text()
    line = next(ln for ln in log.splitlines() if "disk: model" in ln)
    model_mib, model_dir = re.search(r"disk: model ([\d.]+) MiB in (\S+)", line).groups()
    workers, per_worker, total, g3_dir = re.search(
        r"G3 KV cache up to (\d+) x ([\d.]+) GiB = ([\d.]+) GiB under (\S+),", line).groups()
    assert Path(model_dir).is_relative_to(cache) and Path(g3_dir) == cache / "kv", line
    assert int(workers) == 2 and float(per_worker) <= 1.0, line  # the default fits a laptop
    stated = (float(model_mib) + 0.05) * MIB + (float(total) + 0.005) * GIB
    cards = du(cache / "model-cards") if (cache / "model-cards").exists() else 0
    assert cards <= float(model_mib) * MIB + MIB, cards  # copies of the model's tokenizer files, as stated
    assert du(cache) - cards <= stated, (du(cache), stated, line)
    g3 = du(cache / "kv")
    assert 0 < g3 < 64 * MIB, g3  # blocks were written, and only what they need: nothing up front
    assert list((cache / "kv").rglob("blocks.dat")), "G3 kept the blocks written (restart-safe)"

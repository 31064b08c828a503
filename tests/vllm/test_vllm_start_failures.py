"""A vLLM that cannot start: `kvrelay worker` exits non-zero with vLLM's reason in one line (and a
`FAILED` line for `kvrelay serve`, which reports it and exits 1); nothing of vLLM is left running."""

from __future__ import annotations

import json
import subprocess
import sys

from kvrelay.perf.serve_process import free_port
from tests.models.smollm2 import model_dir
from tests.vllm.conftest import VLLM_FLAGS


def worker(tmp_path, model: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvrelay.cli.main", "worker", *VLLM_FLAGS, "--model", model,
                           "--discovery", "file", "--discovery-dir", str(tmp_path / "disc"), *args],
                          capture_output=True, text=True, timeout=600)


def vllm_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "comm"], capture_output=True, text=True).stdout
    return [c for c in out.split() if c.startswith("VLLM")]


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("kvrelay worker: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert f"FAILED {lines[0].removeprefix('kvrelay worker: error: ')}" in r.stdout.splitlines()
    return lines[0]


def test_too_little_kv_space_is_vllms_reason_in_one_line(tmp_path):
    before = vllm_processes()
    r = worker(tmp_path, str(model_dir()), "--kv-cache-bytes", "1MiB")
    assert r.returncode == 1
    line = one_line_error(r)
    assert "vLLM failed to start: ValueError:" in line and "memory for the cache blocks" in line, line
    assert vllm_processes() == before


def test_a_model_vllm_cannot_load_is_its_reason_in_one_line(tmp_path):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    for f in model_dir().iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    config = json.loads((model_dir() / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    r = worker(tmp_path, str(bad))
    assert r.returncode != 0
    line = one_line_error(r)
    assert "NoSuchModelForCausalLM" in line, line


def test_a_missing_model_path_is_a_flag_error(tmp_path):
    r = worker(tmp_path, str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("kvrelay worker: error: --model:"), r.stderr[-2000:]


def test_serve_reports_the_workers_reason_and_exits_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvrelay.cli.main", "serve", *VLLM_FLAGS, "--model", str(model_dir()),
                        "--workers", "1", "--kv-cache-bytes", "1MiB", "--http-port", str(free_port()),
                        "--discovery-dir", str(tmp_path / "disc")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert "agg-0 failed to start: vLLM failed to start: ValueError:" in r.stdout + r.stderr, r.stderr[-3000:]

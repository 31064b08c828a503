"""vLLM users' spellings (issue 30): `kvrelay serve --port P MODEL` with MODEL a Hugging Face repo id
found in the local Hugging Face cache (offline), a clear error when the cache lacks it, and an unknown
flag answered with the closest one and the subcommand's help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest

from kvrelay.perf.serve_process import free_port, wait_until_up


def kvrelay(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvrelay.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture
def hf_home(tmp_path):
    """A Hugging Face cache (huggingface_hub's layout: refs/main -> snapshots/<commit>/) holding the tiny
    model as the repo `kvrelay-test/tiny`."""
    from kvrelay.workers.models.tiny import ensure_tiny_model

    repo = tmp_path / "hf" / "hub" / "models--kvrelay-test--tiny"
    shutil.copytree(ensure_tiny_model(), repo / "snapshots" / ("c0ffee" * 6 + "c0ff"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee" * 6 + "c0ff")
    return tmp_path / "hf"


def test_serve_host_port_and_a_cached_repo_id_as_positional_model(tmp_path, hf_home):
    port = free_port()
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "kvrelay-test/tiny", "--workers", "1", "--http-workers", "1",
                             "--discovery-dir", str(tmp_path / "disc")], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/ready", 90, lambda: (tmp_path / "serve.log").read_text(),
                      "serve")
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["kvrelay-test/tiny"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "kvrelay-test/tiny", "prompt": "hello", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def test_a_repo_id_not_in_the_cache_is_one_line(tmp_path):
    out = kvrelay("serve", "--port", str(free_port()), "nobody/no-such-model", "--discovery-dir", str(tmp_path),
                  env={"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-model: not in the local Hugging Face cache" in lines[0], out.stderr


@pytest.mark.parametrize(("args", "needles"), [
    (["serve", "--prot", "8001"], ["--prot: did you mean --port?", "(see kvrelay serve --help)"]),
    (["frontend", "--http-prot", "1"], ["did you mean --http-port?", "(see kvrelay frontend --help)"]),
    (["worker", "--modle", "tiny"], ["did you mean --model?", "(see kvrelay worker --help)"]),
    (["serve", "tiny", "--model", "smollm2-135m-instruct"], ["--model: given twice"]),
])
def test_unknown_flag_suggests_the_closest_and_the_subcommand_help(args, needles):
    out = kvrelay(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), out.stderr

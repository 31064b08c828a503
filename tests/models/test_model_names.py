"""What `--model` accepts, and how a name that is not servable is refused (one line, exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvrelay.workers.models.registry import SMOLLM2, TINY, TINY_SERVED_NAME, ModelNotFound, resolve_model
from kvrelay.workers.models.tiny import ensure_tiny_model
from tests.models.smollm2 import gguf_path, model_dir


def _kvrelay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvrelay.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_names_paths_and_directories_resolve(tmp_path):
    assert resolve_model("").path == model_dir() and resolve_model("").served_name == SMOLLM2
    assert resolve_model(TINY).path == ensure_tiny_model() and resolve_model(TINY).served_name == TINY_SERVED_NAME
    assert resolve_model(str(gguf_path())).path == model_dir()
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / gguf_path().name).symlink_to(gguf_path())
    assert resolve_model(str(holder)).path == model_dir()  # the same file: the same cache entry
    hf_dir = resolve_model(str(model_dir()))
    assert hf_dir.path == model_dir() and hf_dir.served_name == model_dir().name
    (holder / "second.gguf").symlink_to(gguf_path())
    with pytest.raises(ModelNotFound, match="holds 2 .gguf files"):
        resolve_model(str(holder))
    with pytest.raises(ModelNotFound, match="neither config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFound, match="is not a model name"):
        resolve_model("no-such-model")


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_unknown_model_is_one_line_and_exit_2(command):
    out = _kvrelay(command, "--model", "no-such-model")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--model: 'no-such-model' is not a model name" in out.stderr


def test_model_list_shows_the_cached_default():
    model_dir()
    out = _kvrelay("model", "list")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0].split()
    assert first[:2] == [SMOLLM2, "cached"]
    assert f"{model_dir()} (540 MB)" in out.stdout

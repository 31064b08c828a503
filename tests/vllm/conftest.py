"""The vllm lane (`pytest -m vllm`, in the vLLM virtualenv): real vLLM on the real default model.

Engines start once per module where they can (a vLLM start costs ~30-60 s on 2 cores). Every
engine runs float32 with `--enforce-eager` (no torch.compile) and block size 32 (vLLM's CPU backend),
so kvrelay-on-vLLM, vLLM's own server and kvrelay's native engine compute the same thing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrelay.perf.serve_process import Serve
from kvrelay.perf.vllm_process import VllmServer as _VllmServer
from tests.models.smollm2 import model_dir

pytestmark = pytest.mark.vllm
VLLM_FLAGS = ("--engine", "vllm", "--dtype", "float32", "--block-size", "32", "--vllm-args=--enforce-eager")
MODEL = "smollm2-135m-instruct"
START_S = 600.0
KV_BYTES = 16384 * 30 * 2 * 3 * 64 * 4  # what kvrelay gives vLLM by default: 16,384 tokens of SmolLM2 in float32


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vllm/" in str(item.fspath):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session", autouse=True)
def _vllm_installed():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.fail("the vllm lane needs vLLM in this Python (see workers/engines/vllm/README.md)")


def vllm_serve(tmp: Path, *args: str, workers: int | None = 1, env: dict | None = None) -> Serve:
    srv = Serve(tmp, *VLLM_FLAGS, *args, workers=workers, model=str(model_dir()),
                env={"KVRELAY_SERVED_MODEL_NAME": MODEL, **(env or {})})
    return srv.start(timeout=START_S)


class VllmServer(_VllmServer):
    """vLLM's own OpenAI server on the same checkpoint and settings (the reference)."""

    def __init__(self, tmp: Path, *extra: str, cpus: str = ""):
        super().__init__(tmp, str(model_dir()), MODEL, "--dtype", "float32", "--block-size", "32",
                         "--enforce-eager", "--kv-cache-memory-bytes", str(KV_BYTES), *extra, cpus=cpus,
                         start_s=START_S)

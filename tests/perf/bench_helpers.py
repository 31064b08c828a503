"""Shared by the bench tests: the fake endpoint process, the tiny tokenizer, and the CLI entry point."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvrelay.perf.bench.tokens import load_tokenizer
from tests.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]


def tiny_tokenizer():
    from kvrelay.workers.models.tiny import ensure_tiny_model

    return load_tokenizer(ensure_tiny_model())


def tiny_tokenizer_dir() -> str:
    from kvrelay.workers.models.tiny import ensure_tiny_model

    return str(ensure_tiny_model())


@contextmanager
def fake_endpoint(*args: str) -> Iterator[str]:
    """Start tests/perf/fake_openai.py on a free loopback port; yield its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.perf.fake_openai", "--port", str(port), *args], cwd=ROOT)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def bench_argv() -> list[str]:
    """`kvrelay bench` through the main CLI, as a user runs it."""
    return [sys.executable, "-m", "kvrelay.cli.main", "bench"]

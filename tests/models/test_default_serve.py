"""`kvrelay serve` with no arguments serves SmolLM2-135M-Instruct to the official `openai` client:
it knows the capital of France, a streamed chat ends with a usage chunk, and the first request
succeeds within 20 s of launch (conversion cached) or 90 s (first-ever launch: it converts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from kvrelay.perf.serve_process import free_port
from kvrelay.workers.models.registry import SMOLLM2
from tests.models.smollm2 import model_dir

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class BareServe:
    """`kvrelay serve` exactly as a user types it: no flags (the port comes from KVRELAY_HTTP_PORT)."""

    def __init__(self, tmp_path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "KVRELAY_HTTP_PORT": str(self.port), **(env or {})}
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", "serve"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                                    timeout=60)

    def first_answer(self, deadline_s: float) -> tuple[str, float]:
        """Ask until the first success; (answer, seconds since launch)."""
        while time.monotonic() - self.started < deadline_s:
            assert self.proc.poll() is None, open(self.log.name).read()[-3000:]
            try:
                out = self.client.chat.completions.create(model=SMOLLM2, messages=QUESTION, temperature=0,
                                                          max_tokens=24)
                return out.choices[0].message.content, time.monotonic() - self.started
            except (openai.APIConnectionError, openai.APIStatusError):
                time.sleep(0.2)
        raise AssertionError(f"no answer within {deadline_s} s: {open(self.log.name).read()[-3000:]}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            assert self.proc.wait(60) == 0
        finally:
            self.log.close()


@pytest.fixture
def cached_serve(tmp_path):
    model_dir()  # the conversion is in the cache before the clock starts
    srv = BareServe(tmp_path)
    yield srv
    srv.stop()


def test_default_serve_answers_openai_client(cached_serve):
    answer, seconds = cached_serve.first_answer(deadline_s=20)
    assert "Paris" in answer, answer
    assert seconds < 20
    client = cached_serve.client
    assert [m.id for m in client.models.list().data] == [SMOLLM2]
    chunks = list(client.chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "Tell me a story about a cat."}], max_tokens=32,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) >= 10, text  # real words, not byte noise
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert usage.completion_tokens == 32 or chunks[-2].choices[0].finish_reason == "stop"
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_first_ever_launch_converts_and_answers_within_90_s(tmp_path):
    srv = BareServe(tmp_path, env={"KVRELAY_CACHE_DIR": str(tmp_path / "fresh-cache")})
    try:
        answer, seconds = srv.first_answer(deadline_s=90)
        assert "Paris" in answer and seconds < 90
        assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in open(srv.log.name).read()
    finally:
        srv.stop()

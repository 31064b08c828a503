"""`kvrelay bench` against a real `kvrelay serve`: it finishes and writes JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.serve import Serve
from tests.perf.bench_helpers import bench_argv

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Serve(tmp_path_factory.mktemp("serve"), workers=1).start()
    yield srv
    srv.stop()


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*bench_argv(), "run", "--no-progress", *args], capture_output=True, text=True, timeout=120)


def test_bench_random_writes_json_markdown_plots(served, tmp_path):
    out = tmp_path / "random"
    run = bench("--url", served.base_url, "--workload", "random", "--num-requests", "20", "--concurrency", "4",
                "--input-len", "48", "--output-len", "8", "--warmup", "2", "--slo", "ttft=10s,itl=2s",
                "--out", str(out))
    assert run.returncode == 0, run.stderr + served.read_log()
    print(run.stdout)
    result = json.loads((out / "bench.json").read_text())
    s = result["summary"]
    assert result["model"] == "kvrelay-tiny" and result["warmup_requests"] == 2
    assert (s["requests"], s["succeeded"], s["failed"]) == (20, 20, 0)
    assert s["ttft_ms"]["mean"] > 0 and s["itl_ms"]["count"] > 0 and s["e2e_ms"]["p99"] >= s["ttft_ms"]["p99"]
    assert s["output_tokens"] == 20 * 8 and s["output_length_mismatches"] == 0  # ignore_eos: exact lengths
    assert s["prompt_tokens"] >= 20 * 48 and s["request_throughput"] > 0 and s["goodput"] > 0
    assert s["prefix_hit_rate"] is not None  # kvrelay reports cached_tokens
    assert "| TTFT |" in (out / "bench.md").read_text()
    for png in ("latency_cdf.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_bench_prefix_hits_cache_then_compare(served, tmp_path):
    run = bench("--url", served.base_url, "--workload", "prefix", "--num-prefixes", "2", "--prefix-len", "64",
                "--suffixes-per-prefix", "4", "--input-len", "16", "--output-len", "4", "--concurrency", "1",
                "--no-plots", "--out", str(tmp_path / "prefix"))
    assert run.returncode == 0, run.stderr
    s = json.loads((tmp_path / "prefix" / "bench.json").read_text())["summary"]
    assert s["succeeded"] == 8
    # 6 of the 8 requests reuse a 64-token prefix (4 blocks of 16) of 80-token prompts
    assert s["prefix_hit_rate"] >= 0.5 * (6 * 64) / (8 * 80)
    text = bench("--url", served.base_url, "--endpoint", "chat", "--prompt-format", "text", "--workload", "multi-turn",
                 "--users", "2", "--turns", "2", "--input-len", "16", "--output-len", "4", "--concurrency", "2",
                 "--no-plots", "--out", str(tmp_path / "chat"))
    assert text.returncode == 0, text.stderr
    assert json.loads((tmp_path / "chat" / "bench.json").read_text())["summary"]["succeeded"] == 4
    cmp = subprocess.run([*bench_argv(), "compare", str(tmp_path / "prefix" / "bench.json"),
                          str(tmp_path / "chat" / "bench.json")], capture_output=True, text=True, timeout=60)
    assert cmp.returncode == 0 and "| TTFT p50 (ms) |" in cmp.stdout, cmp.stderr

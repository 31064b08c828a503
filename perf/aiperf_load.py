"""aiperf (NVIDIA's load generator, `pip install aiperf`, kept in its own environment) as the load
generator of a benchmark: one `aiperf profile` run against an OpenAI-compatible URL, summarized as
`perf/chat_load.py` summarizes its own runs (requests/s, TTFT and ITL percentiles in ms).

Output tokens are the server's usage counts (`--use-server-token-count`): aiperf otherwise re-tokenizes
the streamed text, and the mockers' random tokens do not re-tokenize to themselves.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def aiperf_argv(aiperf: str, url: str, model: str, tokenizer: str, *, input_tokens: int, output_tokens: int,
                concurrency: int, requests: int, artifact_dir: Path, warmup: int = 16, seed: int = 0,
                server_token_count: bool = True) -> list[str]:
    return [aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
            "--synthetic-input-tokens-mean", str(input_tokens), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(output_tokens), "--output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", *(["--use-server-token-count"] if server_token_count else []),
            "--concurrency", str(concurrency),
            "--request-count", str(requests), "--warmup-request-count", str(warmup), "--tokenizer", tokenizer,
            "--random-seed", str(seed), "--ui-type", "none", "--artifact-dir", str(artifact_dir)]


def run_aiperf(aiperf: str, url: str, model: str, tokenizer: str, artifact_dir: Path, **load) -> dict:
    artifact_dir.mkdir(parents=True, exist_ok=True)
    argv = aiperf_argv(aiperf, url, model, tokenizer, artifact_dir=artifact_dir, **load)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=artifact_dir)
    report = artifact_dir / "profile_export_aiperf.json"
    if done.returncode != 0 or not report.exists():
        raise RuntimeError(f"aiperf failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return summarize(json.loads(report.read_text()))


def summarize(d: dict) -> dict:
    def stat(name: str, key: str) -> float:
        return float(d.get(name, {}).get(key, float("nan")))

    errors = d.get("error_summary") or []
    return {"requests_per_s": stat("request_throughput", "avg"), "ttft_p50_ms": stat("time_to_first_token", "p50"),
            "ttft_p99_ms": stat("time_to_first_token", "p99"), "itl_p50_ms": stat("inter_token_latency", "p50"),
            "itl_p99_ms": stat("inter_token_latency", "p99"), "output_tokens": stat("total_osl", "avg"),
            "errors": sum(int(e.get("count", 1)) for e in errors) if isinstance(errors, list) else 0}

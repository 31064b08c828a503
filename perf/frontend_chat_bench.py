"""The streamed-chat setting of `frontend_bench` (issue 19): `python -m kvrelay.perf.frontend_bench
--setting chat [--load-generator lean|aiperf] [--http-workers 1,2] [--dynamo-python PY]`.

Streamed `/v1/chat/completions`, `--prompt-tokens` (256) prompt tokens, `--max-tokens` (64) output
tokens with `ignore_eos`, `--concurrency` (16) in flight, `--requests` (500) per run. Every server
serves its own mocker at the same simulated speed (ours `--mocker-speedup`, Dynamo's
`--speedup-ratio`, both `--speedup`, default 1000). Servers, all up at once on this machine: `kvrelay
serve --engine mocker` once per `--http-workers` value and, with `--dynamo-python`, NVIDIA Dynamo's
frontend + mocker (perf/dynamo_process.py). The loads run one at a time, interleaved, `--repeats`
times; the median run of each server is reported, with the ratios to Dynamo and to one HTTP process.

Load generators: `lean` (perf/chat_load.py: keep-alive connections, costs little CPU) or `aiperf`
(`--aiperf PATH`, perf/aiperf_load.py: what a user would run). Both measure TTFT to the first content
event and ITL = (end-to-end - TTFT) / (output tokens - 1).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kvrelay.perf.aiperf_load import run_aiperf
from kvrelay.perf.chat_load import chat_prompts, run_chat
from kvrelay.perf.serve_process import Serve
from kvrelay.workers.models.tiny import ensure_tiny_model

if TYPE_CHECKING:
    from kvrelay.perf.dynamo_process import DynamoServe

MODEL = "kvrelay-tiny"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-generator", choices=("lean", "aiperf"), default="lean")
    p.add_argument("--aiperf", default="aiperf", help="the aiperf executable (--load-generator aiperf)")
    p.add_argument("--http-workers", default="1", help="comma-separated: one kvrelay server per value")
    p.add_argument("--speedup", default="1000", help="chat setting: both mockers' simulated speedup")


def _load(args: argparse.Namespace, url: str, tokenizer: str, prompts: list[str], out: Path) -> dict:
    if args.load_generator == "aiperf":
        return run_aiperf(args.aiperf, url, MODEL, tokenizer, out, input_tokens=args.prompt_tokens,
                          output_tokens=args.max_tokens, concurrency=args.concurrency, requests=args.requests)
    asyncio.run(run_chat(url, MODEL, prompts[:64], args.max_tokens, args.concurrency, 64))  # warm-up
    return asyncio.run(run_chat(url, MODEL, prompts, args.max_tokens, args.concurrency, args.requests)).summary()


def _median_run(runs: list[dict]) -> dict:
    """The run with the median request rate (its latencies belong to it), plus every run's rate."""
    ordered = sorted(runs, key=lambda r: r["requests_per_s"])
    return {**ordered[len(ordered) // 2], "runs_requests_per_s": [r["requests_per_s"] for r in runs]}


def run(args: argparse.Namespace) -> dict:
    tokenizer = str(ensure_tiny_model())
    # The chat template adds a few tokens around the message: aim the message a little short.
    prompts = chat_prompts(tokenizer, max(args.requests, 64), args.prompt_tokens - 8)
    http = [int(n) for n in str(args.http_workers).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        servers: dict[str, str] = {}
        started: list[Serve | DynamoServe] = []
        try:
            for n in http:
                d = root / f"kvrelay-{n}"
                d.mkdir()
                srv = Serve(d, "--engine", "mocker", "--mocker-speedup", args.speedup, "--router-mode", "kv",
                            workers=args.workers, http_workers=n).start(timeout=120)
                started.append(srv)
                servers[f"kvrelay_http{n}"] = srv.base_url
            if args.dynamo_python:
                from kvrelay.perf.dynamo_process import DynamoServe

                dyn = DynamoServe(args.dynamo_python, root, tokenizer, MODEL, speedup=args.speedup).start()
                started.append(dyn)
                servers["dynamo"] = dyn.base_url
            rows: dict[str, list[dict]] = {name: [] for name in servers}
            for rep in range(args.repeats):
                for name, url in servers.items():
                    rows[name].append(_load(args, url, tokenizer, prompts, root / f"aiperf-{name}-{rep}"))
        finally:
            for s in started:
                s.stop()
    out: dict = {name: _median_run(runs) for name, runs in rows.items()}
    if "dynamo" in out:
        for name in servers:
            if name != "dynamo":
                out[f"{name}_vs_dynamo"] = {
                    "requests_per_s": out[name]["requests_per_s"] / out["dynamo"]["requests_per_s"],
                    "itl_p50": out[name]["itl_p50_ms"] / out["dynamo"]["itl_p50_ms"]}
    for n in http[1:]:
        base = out[f"kvrelay_http{http[0]}"]
        out[f"kvrelay_http{n}_vs_http{http[0]}"] = out[f"kvrelay_http{n}"]["requests_per_s"] / base["requests_per_s"]
    return out

"""kvrelay's kv router side by side with sglang-router and vllm-router (issue 27).

    python -m kvrelay.perf.router_peers [--workers 4] [--family issue27] [--repeats 1]
        [--arms kv,sglang:cache_aware,sglang:round_robin,vllm:cache_aware,vllm:round_robin]

- `kv` (and `kv:overlap:nospec`, ...: perf/router_bench.router_args): one `kvrelay serve` with N mocker
  workers, its own frontend and router.
- `sglang:POLICY` / `vllm:POLICY`: N `kvrelay serve` processes with one mocker worker each (each its own
  discovery dir, so each frontend sees only its worker), and the peer router in front of their HTTP
  ports. The routers come from PyPI, each in its own venv: /work/venvs/sglang-router
  (`pip install sglang-router==0.3.2`) and /work/venvs/vllm-router (`pip install vllm-router==0.1.17`);
  `--venvs DIR` points elsewhere.

Every arm gets the same prompts (`kvrelay bench` multi-turn, perf/router_bench families) as text
(`--prompt-format text`: the peers' cache_aware matches on request text, and token-id prompts would give
them nothing to match), and the hit rate is the backends' reported cached prompt tokens
(`usage.prompt_tokens_details`) over prompt tokens. The oracle is computed on the token ids of the same
workload: the server's tokenization of the text differs slightly, so it is a close reference, not a bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from kvrelay.perf.bench.runner import run_benchmark
from kvrelay.perf.bench.tokens import load_tokenizer
from kvrelay.perf.router_bench import (
    FAMILIES,
    best_possible_hit_rate,
    parse_args,
    prompt_tokens_per_worker,
    router_args,
    workload_config,
)
from kvrelay.perf.serve_process import Serve, free_port

PEERS = {"sglang": ("sglang-router", ["launch"]), "vllm": ("vllm-router", [])}


def _serve(tmp: Path, workers: int, speedup: float, *extra: str) -> Serve:
    tmp.mkdir(parents=True, exist_ok=True)
    return Serve(tmp, "--engine", "mocker", "--mocker-speedup", str(speedup), *extra, workers=workers)


def _start_router(peer: str, policy: str, urls: list[str], venvs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    exe, sub = PEERS[peer]
    port = free_port()
    argv = [str(venvs / exe / "bin" / exe), *sub, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
            "--worker-urls", *urls]
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # ready when it forwards a model list
        assert proc.poll() is None, f"{exe} exited: {log.read_text()[-2000:]}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        assert time.monotonic() < deadline, f"{exe} not ready: {log.read_text()[-2000:]}"
        time.sleep(0.3)


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    kind, _, rest = arm.partition(":")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        servers: list[Serve] = []
        router = None
        try:
            if kind == "kv":
                servers = [_serve(tmp / "kv", args.workers_n, args.speedup, *router_args(arm),
                                  "--http-workers", str(args.kv_http_workers)).start(timeout=180)]
                url = servers[0].base_url
            else:
                servers = [_serve(tmp / f"b{i}", 1, args.speedup).start(timeout=120) for i in range(args.workers_n)]
                router, url = _start_router(kind, rest, [s.base_url for s in servers], args.venvs, tmp / "router.log")
            cfg = workload_config(args, url)
            cfg.prompt_format = "text"
            cfg.model = "kvrelay-tiny"
            result = asyncio.run(run_benchmark(cfg, load_tokenizer(cfg.tokenizer), progress=False))
            per_worker = [t for s in servers for t in asyncio.run(prompt_tokens_per_worker(s))]
        finally:
            if router is not None:
                router.terminate()
                router.wait(10)
            for s in servers:
                s.stop()
    summary = result.summary
    return {"arm": arm, "hit_rate": summary.prefix_hit_rate, "ttft_p50_ms": summary.ttft_ms.p50,
            "ttft_p99_ms": summary.ttft_ms.p99, "request_rate": summary.request_throughput,
            "failed": summary.failed, "errors": summary.errors,
            "spread": max(per_worker) / (sum(per_worker) / len(per_worker)) if sum(per_worker) else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.router_peers")
    p.add_argument("--arms", default="kv,sglang:cache_aware,sglang:round_robin,vllm:cache_aware,vllm:round_robin")
    p.add_argument("--venvs", type=Path, default=Path("/work/venvs"))
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--kv-http-workers", type=int, default=1,
                   help="HTTP processes of the kv arm's frontend (the peer arms run one frontend per backend)")
    own, rest = p.parse_known_args(argv)
    args = parse_args(rest)  # router_bench's flags: --family, --workers (one number), --repeats, shape
    args.workers_n, args.venvs, args.kv_http_workers = int(args.workers), own.venvs, own.kv_http_workers
    best = best_possible_hit_rate(args)
    print(f"family {args.family} ({FAMILIES[args.family] or 'router_bench defaults'}), {args.workers_n} workers; "
          f"oracle (token ids) {best:.3f}", flush=True)
    arms = own.arms.split(",")
    by_arm: dict[str, list[dict]] = {a: [] for a in arms}
    for _ in range(args.repeats):  # interleaved: a change in the machine's load lands on every arm alike
        for arm in arms:
            r = run_arm(arm, args)
            by_arm[arm].append(r)
            print(f"  run: {arm}: hit {r['hit_rate']:.3f} ttft p50 {r['ttft_p50_ms']:.1f} p99 {r['ttft_p99_ms']:.1f} "
                  f"req/s {r['request_rate']:.1f} spread {r['spread']:.2f} failed {r['failed']} "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows = [{**sorted(runs, key=lambda r: r["hit_rate"])[len(runs) // 2], "runs": [r["hit_rate"] for r in runs],
             "ttft_p99_runs": [r["ttft_p99_ms"] for r in runs]} for runs in by_arm.values()]
    print("| router | prefix hit rate (median) | of oracle | TTFT p50 / p99 ms | req/s | max/mean prompt tokens "
          "per worker | failed |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['hit_rate']:.3f} | {r['hit_rate'] / best:.3f} | {r['ttft_p50_ms']:.1f} / "
              f"{r['ttft_p99_ms']:.1f} | {r['request_rate']:.1f} | {r['spread']:.2f} | {r['failed']} |")
    if own.out:
        Path(own.out).write_text(json.dumps({"oracle": best, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

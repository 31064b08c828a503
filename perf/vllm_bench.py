"""kvrelay in front of vLLM vs vLLM alone (issue 15's benchmark). Run it from the vLLM virtualenv:

    $VENV/bin/python -m kvrelay.perf.vllm_bench [--rounds 2] [--requests 48] [--out DIR]

The same `kvrelay bench` loads, side by side in one run (rounds alternate the servers, so drift on a
shared machine hits both):
1. one engine: (a) vLLM's own OpenAI server vs (b) `kvrelay serve --engine vllm` with one worker, on
   the same checkpoint and settings (float32, eager, block 32, the same KV bytes and CPUs): random
   256-in / 64-out at concurrency 4, and multi-turn (8 users x 4 turns). Reported: request rate and
   TTFT p50/p99, and kvrelay / vLLM ratios (goal: rate >= 0.95x, TTFT within 10%).
2. two engines, multi-turn: `kvrelay serve --engine vllm --workers 2` with the kv router vs the same
   with round-robin. Both go through kvrelay's frontend, so the ratio is the router's alone; the
   placement, hence the prefix hit rate, is that of two vLLM servers behind a round-robin balancer.
Results: DIR/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kvrelay.perf.bench.report import read_result
from kvrelay.perf.serve_process import Serve
from kvrelay.perf.vllm_process import VllmServer
from kvrelay.workers.engines.vllm.build import cpu_binding
from kvrelay.workers.models.registry import SMOLLM2, resolve_model

KV_TOKENS = 16384
ENGINE = ("--dtype", "float32", "--block-size", "32")
LOADS = {
    "random 256/64 c4": ["--workload", "random", "--input-len", "256", "--output-len", "64", "--concurrency", "4"],
    "multi-turn 8x4 c4": ["--workload", "multi-turn", "--users", "8", "--turns", "4", "--input-len", "128",
                          "--output-len", "32", "--concurrency", "4"],
}


def bench(url: str, load: list[str], out: Path, requests: int) -> dict:
    n = [] if "multi-turn" in load else ["--num-requests", str(requests)]
    subprocess.run([sys.executable, "-m", "kvrelay.cli.main", "bench", "run", "--url", url, "--model", SMOLLM2,
                    "--tokenizer", SMOLLM2, *load, *n, "--warmup", "4", "--out", str(out), "--no-plots",
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    s = read_result(out / "bench.json").summary
    assert s.failed == 0, s.errors
    return {"req_s": s.request_throughput, "ttft_p50": s.ttft_ms.p50, "ttft_p99": s.ttft_ms.p99,
            "hit_rate": s.prefix_hit_rate}


def kv_bytes(model: Path) -> int:
    c = json.loads((model / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return KV_TOKENS * c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * 4


def kvrelay_serve(tmp: Path, model: Path, *args: str, workers: int) -> Serve:
    return Serve(tmp, "--engine", "vllm", *ENGINE, "--vllm-args=--enforce-eager", *args, workers=workers,
                 model=str(model), env={"KVRELAY_SERVED_MODEL_NAME": SMOLLM2}).start(timeout=600)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--out", default="")
    p.add_argument("--engine-cpus", default="", help="VLLM_CPU_OMP_THREADS_BIND for every engine (default: all "
                   "CPUs for one engine, split between two); e.g. 0 leaves the other cores to the HTTP/API processes")
    p.add_argument("--loads", default=",".join(LOADS), help="comma-separated subset of: " + ", ".join(LOADS))
    p.add_argument("--two-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the 2-worker kv vs round-robin comparison")
    args = p.parse_args()
    loads = {k: LOADS[k] for k in args.loads.split(",")}
    if args.engine_cpus:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.engine_cpus  # kvrelay serve then leaves it as set
    out = Path(args.out or tempfile.mkdtemp(prefix="kvrelay-vllm-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(SMOLLM2).path
    results: dict[str, list] = {}

    def record(system: str, load: str, r: dict) -> None:
        results.setdefault(f"{system} | {load}", []).append(r)
        print(f"{system:28} {load:20} {r['req_s']:6.2f} req/s  TTFT p50 {r['ttft_p50']:7.1f} ms  "
              f"p99 {r['ttft_p99']:7.1f} ms  hit {r['hit_rate'] if r['hit_rate'] is not None else '-'}", flush=True)

    for rnd in range(args.rounds):
        order = ["vllm", "kvrelay"] if rnd % 2 == 0 else ["kvrelay", "vllm"]
        for system in order:
            run_dir = out / f"r{rnd}-{system}"
            run_dir.mkdir(exist_ok=True)
            srv: VllmServer | Serve
            if system == "vllm":
                srv = VllmServer(run_dir, str(model), SMOLLM2, *ENGINE, "--enforce-eager", "--kv-cache-memory-bytes",
                                 str(kv_bytes(model)), cpus=args.engine_cpus or cpu_binding(0, 1))
            else:
                srv = kvrelay_serve(run_dir, model, workers=1)
            try:
                for name, load in loads.items():
                    record(system, name, bench(srv.base_url, load, run_dir / name.split()[0], args.requests))
            finally:
                srv.stop()
        for router in (["kv", "round-robin"] if rnd % 2 == 0 else ["round-robin", "kv"]) if args.two_workers else []:
            run_dir = out / f"r{rnd}-2w-{router}"
            run_dir.mkdir(exist_ok=True)
            srv = kvrelay_serve(run_dir, model, "--router-mode", router, workers=2)
            try:
                record(f"kvrelay 2 workers {router}", "multi-turn 8x4 c4",
                       bench(srv.base_url, LOADS["multi-turn 8x4 c4"], run_dir / "multi", args.requests))
            finally:
                srv.stop()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out / 'results.json'}")
    for key, runs in sorted(results.items()):
        print(key, " / ".join(f"{r['req_s']:.2f}" for r in runs))


if __name__ == "__main__":
    main()

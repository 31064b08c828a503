"""Multi-turn prefix hit rate of each router mode through real `kvrelay serve` (issues #4 and #7).

    python -m kvrelay.perf.router_bench [--workers 4,16] [--modes kv,round-robin,random,least-loaded]
        [--family default|issue27|long-system|no-system|skewed] [--repeats 3]

Mocker workers (real prefix caches, KV events and load metrics; simulated compute at `--speedup`)
behind the real frontend and router. Workload: `kvrelay bench` multi-turn, `--users` x `--turns`, a
shared system prompt, users shuffled each turn, `--users` conversations in flight. Hit rate is the
share of prompt tokens the chosen worker reported as cached (`usage.prompt_tokens_details`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

from kvrelay.kvbm.hashing import block_hashes
from kvrelay.perf.bench.config import BenchConfig
from kvrelay.perf.bench.runner import run_benchmark
from kvrelay.perf.bench.tokens import load_tokenizer, token_pool
from kvrelay.perf.bench.workloads import workload
from kvrelay.perf.serve_process import Serve
from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, EngineStats
from kvrelay.workers.models.tiny import ensure_tiny_model

# Workload families (issue 27): --family NAME sets users/turns/system/input/output (flags given override).
FAMILIES: dict[str, dict[str, int]] = {
    "default": {},  # this module's defaults: 32 x 6, 200-token system prompt, 50-token turns and replies
    "issue27": {"users": 64, "turns": 8, "system_len": 64, "input_len": 150, "output_len": 200},
    "long-system": {"system_len": 1000, "input_len": 30, "output_len": 30},
    "no-system": {"system_len": 0, "input_len": 300, "output_len": 200},
    "skewed": {"system_len": 100, "input_len": 40, "output_len": 40, "long_users": 4, "long_factor": 16},
}


def workload_config(args: argparse.Namespace, url: str = "") -> BenchConfig:
    return BenchConfig(url=url or "http://127.0.0.1:8000", workload="multi-turn", users=args.users,
                       turns=args.turns, system_len=args.system_len, input_len=args.input_len,
                       output_len=args.output_len, concurrency=args.users, seed=args.seed,
                       long_users=args.long_users, long_factor=args.long_factor,
                       tokenizer=str(ensure_tiny_model()))


def best_possible_hit_rate(args: argparse.Namespace, block_size: int = 16) -> float:
    """The oracle of this module's multi-turn workload (`oracle_hit_rate`)."""
    cfg = workload_config(args)
    specs = islice(workload(cfg, token_pool(load_tokenizer(cfg.tokenizer), "tokens")), args.users * args.turns)
    return oracle_hit_rate((spec.prompt_tokens() for spec in specs), block_size)


def oracle_hit_rate(prompts: Iterable[list[int]], block_size: int = 16) -> float:
    """The oracle: per prompt, the leading full blocks that any earlier prompt had (one unbounded cache
    shared by every worker; the last token is always computed), over all prompt tokens."""
    seen: set[int] = set()
    cached = total = 0
    for ids in prompts:
        hashes = block_hashes(ids, block_size, 0)
        hit = 0
        for h in hashes[: (len(ids) - 1) // block_size]:
            if h not in seen:
                break
            hit += 1
        cached, total = cached + hit * block_size, total + len(ids)
        seen.update(hashes)
    return cached / total


def router_args(mode: str) -> list[str]:
    """`kv`, `round-robin`, ... or `kv:overlap` / `kv:overlap:nospec` (the cost before issue 27, with or
    without speculative index entries; `kv` alone is the default cost); `:nopeer`: no pulls from peers
    (the cluster KV pool off: routing alone decides what is cached)."""
    name, *opts = mode.split(":")
    out = ["--router-mode", name]
    for o in opts:
        out += {"overlap": ["--router-cost", "overlap"], "ttft": ["--router-cost", "ttft"],
                "nospec": ["--router-speculative-ttl", "0"], "nopeer": ["--router-peer-weight", "0"]}[o]
    return out


def hit_rate(workers: int, mode: str, args: argparse.Namespace, http_workers: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Serve(Path(tmp), "--engine", "mocker", "--mocker-speedup", str(args.speedup), *router_args(mode),
                    workers=workers, http_workers=http_workers).start(timeout=120)
        try:
            cfg = workload_config(args, srv.base_url)
            result = asyncio.run(run_benchmark(cfg, load_tokenizer(cfg.tokenizer), progress=False))
            per_worker = asyncio.run(prompt_tokens_per_worker(srv))
        finally:
            srv.stop()
    s = result.summary
    return {"workers": workers, "mode": mode, "http_workers": http_workers, "hit_rate": s.prefix_hit_rate,
            "requests": s.succeeded, "failed": s.failed, "errors": s.errors, "ttft_p50_ms": s.ttft_ms.p50,
            "ttft_p99_ms": s.ttft_ms.p99, "request_rate": s.request_throughput,
            "spread": max(per_worker) / (sum(per_worker) / len(per_worker)) if sum(per_worker) else 0.0}


async def prompt_tokens_per_worker(srv: Serve) -> list[int]:
    """Prompt tokens each worker was sent (its cumulative STATS), to see how the load spread."""
    disc = make_discovery(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir))
    await disc.start()
    client = RpcClient(token=srv.internal_token)
    try:
        return [(await client.unary(inst.address, Endpoint.STATS, Empty(), EngineStats)).prompt_tokens
                for inst in await list_instances(disc, "default")]
    finally:
        await client.close()
        await disc.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.router_bench")
    p.add_argument("--workers", default="4,16")
    p.add_argument("--modes", default="kv,round-robin,random,least-loaded",
                   help="router modes; kv:overlap = the older cost, kv:overlap:nospec = as before issue 27, "
                        "kv:nopeer = without pulls from peers (issue 31)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="default",
                   help="workload family (sets the shape; explicit shape flags override it)")
    p.add_argument("--repeats", type=int, default=1, help="runs per (workers, mode); the table shows the median")
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--turns", type=int, default=None)
    p.add_argument("--system-len", type=int, default=None)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--long-users", type=int, default=None)
    p.add_argument("--long-factor", type=int, default=None)
    p.add_argument("--speedup", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


_SHAPE = {"users": 32, "turns": 6, "system_len": 200, "input_len": 50, "output_len": 50, "long_users": 0,
          "long_factor": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, with the family's shape (then this module's defaults) filling the shape flags not given."""
    args = parser().parse_args(argv)
    for key, default in _SHAPE.items():
        if getattr(args, key) is None:
            setattr(args, key, FAMILIES[args.family].get(key, default))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    best = best_possible_hit_rate(args)
    print(f"family {args.family}: best possible hit rate (oracle): {best:.3f}", flush=True)
    rows = []
    modes = args.modes.split(",")
    for w in args.workers.split(","):
        # Interleaved (mode A, mode B, mode A, ...) so that a change in the machine's load lands on
        # every mode alike instead of on whichever ran last.
        by_mode: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                r = hit_rate(int(w), m, args)
                by_mode[m].append(r)
                print(f"  run: {w} workers {m}: hit {r['hit_rate']:.3f} ttft p50/p99 {r['ttft_p50_ms']:.1f}/"
                      f"{r['ttft_p99_ms']:.1f} ms spread {r['spread']:.2f} load {os.getloadavg()[0]:.1f}",
                      flush=True)
        for runs in by_mode.values():
            med = sorted(runs, key=lambda r: r["hit_rate"])[len(runs) // 2]
            p99s = sorted(r["ttft_p99_ms"] for r in runs)
            rows.append({**med, "runs": [r["hit_rate"] for r in runs],
                         "ttft_p99_runs": [r["ttft_p99_ms"] for r in runs],
                         "ttft_p99_median_ms": p99s[len(p99s) // 2]})
    print("| workers | router | prefix hit rate (median) | of best | runs | TTFT p50 / p99 ms (median run) | "
          "TTFT p99 ms, median of runs | req/s | max/mean prompt tokens per worker | failed |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        listed = ", ".join(f"{h:.3f}" for h in r["runs"])
        print(f"| {r['workers']} | {r['mode']} | {r['hit_rate']:.3f} | {r['hit_rate'] / best:.3f} | {listed} | "
              f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['ttft_p99_median_ms']:.1f} | {r['request_rate']:.1f} | {r['spread']:.2f} | "
              f"{r['failed']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"family": args.family, "best_possible": best, "rows": rows,
                                               "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Multi-turn prefix hit rate of each router mode through real `kvrelay serve` (issues #4 and #7).

    python -m kvrelay.perf.router_bench [--workers 4,16] [--modes kv,round-robin,random,least-loaded]

Mocker workers (real prefix caches, KV events and load metrics; simulated compute at `--speedup`)
behind the real frontend and router. Workload: `kvrelay bench` multi-turn, `--users` x `--turns`, a
shared system prompt, users shuffled each turn, `--users` conversations in flight. Hit rate is the
share of prompt tokens the chosen worker reported as cached (`usage.prompt_tokens_details`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from itertools import islice
from pathlib import Path

from kvrelay.kvbm.hashing import block_hashes
from kvrelay.perf.bench.config import BenchConfig
from kvrelay.perf.bench.runner import run_benchmark
from kvrelay.perf.bench.tokens import load_tokenizer, token_pool
from kvrelay.perf.bench.workloads import workload
from kvrelay.perf.serve_process import Serve
from kvrelay.workers.models.tiny import ensure_tiny_model


def workload_config(args: argparse.Namespace, url: str = "") -> BenchConfig:
    return BenchConfig(url=url or "http://127.0.0.1:8000", workload="multi-turn", users=args.users,
                       turns=args.turns, system_len=args.system_len, input_len=args.input_len,
                       output_len=args.output_len, concurrency=args.users, seed=args.seed,
                       tokenizer=str(ensure_tiny_model()))


def best_possible_hit_rate(args: argparse.Namespace, block_size: int = 16) -> float:
    """The oracle: per request, the leading full blocks of its prompt that any earlier request's prompt
    had (one unbounded cache shared by every worker; the last token is always computed)."""
    cfg = workload_config(args)
    seen: set[int] = set()
    cached = total = 0
    for spec in islice(workload(cfg, token_pool(load_tokenizer(cfg.tokenizer), "tokens")), args.users * args.turns):
        ids = spec.prompt_tokens()
        hashes = block_hashes(ids, block_size, 0)
        hit = 0
        for h in hashes[: (len(ids) - 1) // block_size]:
            if h not in seen:
                break
            hit += 1
        cached, total = cached + hit * block_size, total + len(ids)
        seen.update(hashes)
    return cached / total


def hit_rate(workers: int, mode: str, args: argparse.Namespace, http_workers: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Serve(Path(tmp), "--engine", "mocker", "--mocker-speedup", str(args.speedup), "--router-mode", mode,
                    workers=workers, http_workers=http_workers).start(timeout=120)
        try:
            cfg = workload_config(args, srv.base_url)
            result = asyncio.run(run_benchmark(cfg, load_tokenizer(cfg.tokenizer), progress=False))
        finally:
            srv.stop()
    s = result.summary
    return {"workers": workers, "mode": mode, "http_workers": http_workers, "hit_rate": s.prefix_hit_rate,
            "requests": s.succeeded, "failed": s.failed, "errors": s.errors}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.router_bench")
    p.add_argument("--workers", default="4,16")
    p.add_argument("--modes", default="kv,round-robin,random,least-loaded")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=200)
    p.add_argument("--input-len", type=int, default=50)
    p.add_argument("--output-len", type=int, default=50)
    p.add_argument("--speedup", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    best = best_possible_hit_rate(args)
    rows = [hit_rate(int(w), m, args) for w in args.workers.split(",") for m in args.modes.split(",")]
    print(f"best possible hit rate (oracle): {best:.3f}")
    print("| workers | router | prefix hit rate | of best | requests | failed |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['mode']} | {r['hit_rate']:.3f} | {r['hit_rate'] / best:.2f} | "
              f"{r['requests']} | {r['failed']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"best_possible": best, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

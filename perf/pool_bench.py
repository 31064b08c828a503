"""The cluster KV pool under multi-turn load when one worker's KV does not hold its share (issue 31).

    python -m kvrelay.perf.pool_bench [--workers 4] [--repeats 3] [--modes kv:nopeer,kv]
        [--g1-blocks 512] [--g2-blocks 384] [--users 32] [--turns 6] [--long-users 4] [--long-factor 8]

Real `kvrelay serve` with mocker workers that have G2 (`--mocker-kv-tiers --kv-host-bytes`, no G3/G4),
`kvrelay bench` multi-turn, the pool on (`kv`) and off (`kv:nopeer`), arms interleaved run by run.
Each worker's G1 (`--mocker-num-blocks`) plus G2 is sized below the KV the whole workload's prompts
need and the workers' together above it (checked and printed before the runs): a conversation routed
off its worker finds its history nowhere on the new one, so what decides its hit is whether the pool
lends it from the old one.

The workload (the default): many ordinary chats and a few long agent-like sessions (`--long-users`
conversations whose turns are `--long-factor` times longer: pasted files, tool output) sharing one
system prompt, more conversations than requests in flight (`--concurrency`). The long sessions load
the workers unevenly, so the router moves conversations to balance them; with the pool the moved
conversation pulls its history, without it the history is recomputed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from itertools import islice
from pathlib import Path

import msgspec

from kvrelay.kvbm.hashing import block_hashes
from kvrelay.perf.bench.config import BenchConfig
from kvrelay.perf.bench.runner import run_benchmark
from kvrelay.perf.bench.tokens import load_tokenizer, token_pool
from kvrelay.perf.bench.workloads import natural_size, workload
from kvrelay.perf.router_bench import oracle_hit_rate, router_args
from kvrelay.perf.serve_process import Serve
from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, EngineStats
from kvrelay.workers.models.tiny import ensure_tiny_model

BLOCK_SIZE = 16
# Summed over the workers after each run: where the prompt tokens' KV came from.
STAT_FIELDS = ("prompt_tokens", "prefill_tokens_computed", "peer_pulled_blocks", "peer_pull_failures",
               "peer_fallbacks", "onboarded_blocks", "preemptions")


def tiny_block_bytes() -> int:
    """Bytes of one KV block of the served model (kvrelay-tiny, the mocker's default): G2's size in blocks."""
    c = json.loads((ensure_tiny_model() / "config.json").read_text())
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[c["torch_dtype"]]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * BLOCK_SIZE * c["num_key_value_heads"] * head_dim * itemsize


def bench_config(args: argparse.Namespace, url: str = "http://127.0.0.1:8000") -> BenchConfig:
    return BenchConfig(url=url, workload=args.workload, users=args.users, turns=args.turns,
                       system_len=args.system_len, input_len=args.input_len, output_len=args.output_len,
                       concurrency=args.concurrency, seed=args.seed, long_users=args.long_users,
                       long_factor=args.long_factor, num_docs=args.num_docs, doc_len=args.doc_len,
                       questions_per_doc=args.questions_per_doc, hot_doc_share=args.hot_doc_share,
                       tokenizer=str(ensure_tiny_model()))


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    """Every prompt of one run, in order (the workload's natural size)."""
    cfg = bench_config(args)
    n = natural_size(cfg)
    return [spec.prompt_tokens() for spec in islice(workload(cfg, token_pool(load_tokenizer(cfg.tokenizer), "tokens")), n)]


def workload_kv_blocks(args: argparse.Namespace) -> tuple[int, int]:
    """(distinct full blocks over all the workload's prompts, blocks of its longest prompt): the KV the
    whole workload asks the cluster to keep, and the most one request holds at once."""
    seen: set[int] = set()
    longest = 0
    for ids in _prompts(args):
        seen.update(block_hashes(ids, BLOCK_SIZE, 0))
        longest = max(longest, len(ids) // BLOCK_SIZE + 1)
    return len(seen), longest


def best_possible_hit_rate(args: argparse.Namespace) -> float:
    """One unbounded cache shared by every worker (router_bench's oracle, over this workload's prompts)."""
    return oracle_hit_rate(_prompts(args), BLOCK_SIZE)


def serve_args(args: argparse.Namespace, mode: str) -> list[str]:
    return ["--engine", "mocker", "--mocker-speedup", str(args.speedup), "--mocker-num-blocks", str(args.g1_blocks),
            "--mocker-kv-tiers", "--kv-host-bytes", str(args.g2_blocks * tiny_block_bytes()), "--kv-disk-dir", "off",
            "--kv-onboard", args.onboard,
            *router_args(mode)]


async def worker_stats(srv: Serve) -> list[EngineStats]:
    disc = make_discovery(DiscoveryConfig(discovery="file", discovery_dir=srv.discovery_dir))
    await disc.start()
    client = RpcClient(token=srv.internal_token)
    try:
        return [await client.unary(inst.address, Endpoint.STATS, Empty(), EngineStats)
                for inst in await list_instances(disc, "default")]
    finally:
        await client.close()
        await disc.close()


def run_arm(mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Serve(Path(tmp), *serve_args(args, mode), workers=args.workers).start(timeout=300)
        try:
            cfg = bench_config(args, srv.base_url)
            load_before = os.getloadavg()[0]
            result = asyncio.run(run_benchmark(cfg, load_tokenizer(cfg.tokenizer), progress=False))
            stats = asyncio.run(worker_stats(srv))
        finally:
            srv.stop(timeout=180)  # a drain on a machine at load 40 takes more than the default 30 s
    s = result.summary
    per_worker = [st.prompt_tokens for st in stats]
    return {"mode": mode, "hit_rate": s.prefix_hit_rate, "requests": s.succeeded, "failed": s.failed,
            "ttft_p50_ms": s.ttft_ms.p50, "ttft_p99_ms": s.ttft_ms.p99, "request_rate": s.request_throughput,
            "spread": max(per_worker) / (sum(per_worker) / len(per_worker)) if sum(per_worker) else 0.0,
            "workers_sum": {f: sum(int(msgspec.structs.asdict(st)[f]) for st in stats) for f in STAT_FIELDS},
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.pool_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--modes", default="kv:nopeer,kv", help="router modes (perf/router_bench.router_args)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved; the table shows the median")
    p.add_argument("--g1-blocks", type=int, default=512, help="each worker's G1 (--mocker-num-blocks)")
    p.add_argument("--g2-blocks", type=int, default=384, help="each worker's G2, in blocks (--kv-host-bytes)")
    p.add_argument("--workload", default="multi-turn", choices=("multi-turn", "long-doc"),
                   help="long-doc: --num-docs documents of --doc-len tokens, --questions-per-doc questions each, "
                        "--hot-doc-share of them about one document (a hot document whose holder saturates)")
    p.add_argument("--num-docs", type=int, default=8)
    p.add_argument("--doc-len", type=int, default=2048)
    p.add_argument("--questions-per-doc", type=int, default=24)
    p.add_argument("--hot-doc-share", type=float, default=0.0)
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=200)
    p.add_argument("--input-len", type=int, default=80)
    p.add_argument("--output-len", type=int, default=80)
    p.add_argument("--long-users", type=int, default=4)
    p.add_argument("--long-factor", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (closed loop)")
    p.add_argument("--speedup", type=float, default=20.0)
    p.add_argument("--onboard", default="always", choices=("always", "cost"),
                   help="--kv-onboard of the workers; always: the mocker's prefill at --speedup is cheaper than "
                        "the real host copy of its blocks, so the cost model (cost) declines every G2 onboard, "
                        "which a real GPU worker (prefill ~20 us/token, G2 over PCIe) would not")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


def median_run(runs: list[dict]) -> dict:
    """The run of median hit rate, with the medians of every run's TTFT p50 and p99 beside it."""
    med = sorted(runs, key=lambda r: r["hit_rate"])[len(runs) // 2]
    return {**med, "hit_rate_runs": [r["hit_rate"] for r in runs],
            "ttft_p50_median_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
            "ttft_p99_median_ms": statistics.median(r["ttft_p99_ms"] for r in runs),
            "ttft_p99_runs": [r["ttft_p99_ms"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    need, longest = workload_kv_blocks(args)
    per_worker = args.g1_blocks + args.g2_blocks
    print(f"workload KV: {need} distinct blocks (longest prompt {longest}); one worker G1+G2 "
          f"{per_worker} blocks ({per_worker / need:.2f}x), all {args.workers}: {per_worker * args.workers} "
          f"({per_worker * args.workers / need:.2f}x)", flush=True)
    if not per_worker < need <= per_worker * args.workers:
        print("  warning: the workload's KV is not between one worker's G1+G2 and all workers'", flush=True)
    best = best_possible_hit_rate(args)
    print(f"best possible hit rate (one unbounded cache): {best:.3f}", flush=True)
    modes = args.modes.split(",")
    by_mode: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:  # interleaved: a change in the machine's load lands on every mode alike
            r = run_arm(m, args)
            by_mode[m].append(r)
            print(f"  run {m}: hit {r['hit_rate']:.3f} ttft p50/p99 {r['ttft_p50_ms']:.1f}/{r['ttft_p99_ms']:.1f} ms "
                  f"failed {r['failed']} workers {r['workers_sum']} load {r['load_average']}", flush=True)
    rows = {m: median_run(runs) for m, runs in by_mode.items()}
    print("| router | hit rate (median) | runs | TTFT p50 / p99 ms (medians of runs) | p99 runs | "
          "pulled blocks | G2 onboarded blocks | max/mean prompt tokens per worker |\n|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['hit_rate']:.3f} | {', '.join(f'{h:.3f}' for h in r['hit_rate_runs'])} | "
              f"{r['ttft_p50_median_ms']:.1f} / {r['ttft_p99_median_ms']:.1f} | "
              f"{', '.join(f'{x:.0f}' for x in r['ttft_p99_runs'])} | {r['workers_sum']['peer_pulled_blocks']} | "
              f"{r['workers_sum']['onboarded_blocks']} | {r['spread']:.2f} |")
    if len(modes) == 2:
        a, b = (rows[m] for m in modes)
        print(f"{modes[1]} / {modes[0]}: hit rate {b['hit_rate'] / a['hit_rate']:.3f}x, TTFT p99 "
              f"{b['ttft_p99_median_ms'] / a['ttft_p99_median_ms']:.3f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"best_possible": best, "kv_blocks_needed": need,
                                               "longest_prompt_blocks": longest, "rows": rows,
                                               "runs": by_mode, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A worker added under load serves hot prefixes from its peers (issue 31): TTFT and cached-token share
of the new worker's first requests with the cluster KV pool (`kv`) vs without (`kv:nopeer`).

    python -m kvrelay.perf.scale_up_bench [--repeats 3] [--first 50] [--prefixes 8] [--prefix-len 4096]

Per run: real `kvrelay serve` with 3 mocker workers (at `--speedup` 0.25: the mocker's modeled times x4,
a 4,096-token prefill ~350 ms, its pull ~5 ms) behind the kv router, and `--concurrency` closed-loop
clients sending a hot prefix (one of `--prefixes`, each `--prefix-len` tokens: a long system prompt,
a document many ask about, an agent's tool manual) plus a fresh `--question-len`-token question (pasted
text: always computed), so the three hold every prefix and have queues (the router sends an idle new
worker work only when the old ones' queues cost more than what the new one must compute). After `--warmup-s` a 4th worker joins: a `kvrelay worker` process with the very command
line and environment of serve's own workers (discovery dir, event plane, token) but another
`--mocker-seed`, which is how the client tells which worker served a request: the mocker's first token's
logprob is a hash of (seed, prompt), so each response names its worker. The load goes on until the new
worker has served `--first` requests; their TTFT and cached tokens are the result (and, side by side,
those the old workers served in the same window). Arms interleave run by run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import xxhash

from kvrelay.perf.router_bench import router_args
from kvrelay.perf.serve_process import Serve
from kvrelay.workers.engines.mocker.tokens import TokenSource, _u32le

NEW_SEED = 1  # the joining worker's; serve's workers keep the default 0


@dataclass
class Served:
    sent_at: float  # monotonic
    ttft_s: float
    cached: int
    prompt: int
    new_worker: bool


def first_logprob(seed: int, prompt: list[int]) -> float:
    """The mocker's first-token logprob for `prompt` under `seed` (workers/engines/mocker/tokens.py)."""
    return TokenSource.logprob(xxhash.xxh3_64(seed.to_bytes(8, "little") + _u32le(prompt)).intdigest())


async def complete(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> Served:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "logprobs": 1, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    ttft, logprob, cached = None, None, 0
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                lp = (choice.get("logprobs") or {}).get("token_logprobs") or []
                if ttft is None and choice.get("text"):
                    ttft = time.monotonic() - t0
                if logprob is None and lp:
                    logprob = lp[0]
            if chunk.get("usage"):
                cached = ((chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    assert ttft is not None and logprob is not None, "no content or no logprobs in the stream"
    new = abs(logprob - first_logprob(NEW_SEED, prompt)) < 1e-4
    assert new or abs(logprob - first_logprob(0, prompt)) < 1e-4, "the first token came from no known seed"
    return Served(t0, ttft, cached, len(prompt), new)


def worker_children(srv: Serve) -> list[int]:
    return [p for p in srv.children()
            if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[3:4]]


def start_new_worker(srv: Serve, log: Path) -> subprocess.Popen:
    """A 4th worker with serve's workers' own command line and environment, another mocker seed."""
    pid = worker_children(srv)[0]
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    argv = [a for a in argv if not a.startswith("--mocker-seed")] + [f"--mocker-seed={NEW_SEED}"]
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    env[b"KVRELAY_DIE_WITH_PARENT"] = str(os.getpid()).encode()  # it names its owner: this process, not serve
    return subprocess.Popen(argv, env={k.decode(): v.decode() for k, v in env.items()},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


async def drive(srv: Serve, args: argparse.Namespace, tmp: Path) -> tuple[list[Served], float]:
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(3, 2000) for _ in range(args.prefix_len)] for _ in range(args.prefixes)]
    served: list[Served] = []
    joined_at = float("inf")
    stop = asyncio.Event()

    async def client(i: int) -> None:
        r = random.Random(f"{args.seed}-{i}")
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as http:
            while not stop.is_set():
                prompt = r.choice(prefixes) + [r.randrange(3, 2000) for _ in range(args.question_len)]
                s = await complete(http, "kvrelay-tiny", prompt, args.output_len)
                served.append(s)
                if (sum(x.new_worker for x in served) >= args.first
                        and time.monotonic() - joined_at >= args.window_s):
                    stop.set()

    tasks = [asyncio.create_task(client(i)) for i in range(args.concurrency)]
    proc = None
    try:
        await asyncio.sleep(args.warmup_s)
        proc = start_new_worker(srv, tmp / "new-worker.log")
        joined_at = time.monotonic()
        # A new worker the router does not use within --timeout-s is a result (its first requests are
        # fewer than --first, or none), not a failure; one that exited is.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.timeout_s)
        assert proc.poll() is None, f"the new worker exited: {(tmp / 'new-worker.log').read_text()[-2000:]}"
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
    return served, joined_at


def summarize(rows: list[Served]) -> dict:
    ttfts = sorted(s.ttft_s * 1000 for s in rows)
    if not ttfts:
        return {"requests": 0}
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {"requests": len(rows), "ttft_mean_ms": round(statistics.fmean(ttfts), 1),
            "ttft_p50_ms": round(statistics.median(ttfts), 1), "ttft_p99_ms": round(p99, 1),
            "ttft_max_ms": round(ttfts[-1], 1),
            "cached_share": round(sum(s.cached for s in rows) / sum(s.prompt for s in rows), 3)}


def run_arm(mode: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        srv = Serve(Path(tmp), "--engine", "mocker", "--mocker-speedup", str(args.speedup),
                    "--max-model-len", str(args.prefix_len + args.question_len + args.output_len + 16),
                    *router_args(mode), workers=3).start(timeout=300)
        try:
            load = os.getloadavg()[0]
            served, joined_at = asyncio.run(drive(srv, args, Path(tmp)))
        finally:
            srv.stop(timeout=180)  # a drain on a machine at load 40 takes more than the default 30 s
    new = [s for s in sorted(served, key=lambda s: s.sent_at) if s.new_worker][: args.first]
    window_end = max((s.sent_at for s in new), default=joined_at)
    if not new:
        window_end = joined_at + args.window_s
    old = [s for s in served if not s.new_worker and joined_at <= s.sent_at <= window_end]
    after = [s for s in served if joined_at <= s.sent_at <= joined_at + args.window_s]
    return {"mode": mode, "new_worker_first": summarize(new), "old_workers_same_window": summarize(old),
            "all_after_join": summarize(after),
            "new_worker_share_after_join": round(sum(s.new_worker for s in after) / max(1, len(after)), 3),
            "new_worker_first_ttft_ms": [round(s.ttft_s * 1000, 1) for s in new],
            "new_worker_first_cached": [s.cached for s in new],
            "seconds_to_first_new_request": round(new[0].sent_at - joined_at, 2) if new else None,
            "load_average": [round(load, 1), round(os.getloadavg()[0], 1)]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.scale_up_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="kv:nopeer,kv")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--first", type=int, default=50, help="the new worker's first N requests are measured")
    p.add_argument("--prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=4096)
    p.add_argument("--question-len", type=int, default=256, help="fresh tokens after the prefix (always computed)")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--speedup", type=float, default=0.25,
                   help="mocker time divisor; < 1 slows the simulated worker (0.25: prefill 80 us/token, a worker "
                        "that 32 clients keep queued, which is when a worker is added)")
    p.add_argument("--warmup-s", type=float, default=10.0, help="load on the 3 workers before the 4th joins")
    p.add_argument("--window-s", type=float, default=40.0,
                   help="every request sent this long after the join counts in the cluster's TTFT after it")
    p.add_argument("--timeout-s", type=float, default=60.0,
                   help="after the join, stop at this even if the new worker served fewer than --first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:  # interleaved
            r = run_arm(m, args)
            runs[m].append(r)
            print(f"  run {m}: new worker's first {r['new_worker_first']} old workers {r['old_workers_same_window']} "
                  f"all in the {args.window_s:.0f} s after the join {r['all_after_join']} (new worker's share "
                  f"{r['new_worker_share_after_join']}) "
                  f"first new request {r['seconds_to_first_new_request']} s after joining, load {r['load_average']}",
                  flush=True)
    print(f"| router | new worker's first {args.first}: TTFT p50 / p99 ms (median of runs) | cached share | "
          "runs' p50 | old workers, same window: p50 / p99 ms | s to the new worker's first request | "
          f"all requests in the {args.window_s:.0f} s after the join: TTFT p50 / p99 ms | new worker's share |\n"
          "|---|---|---|---|---|---|---|---|")
    table = {}
    for m, rs in runs.items():
        firsts = [r["new_worker_first"] for r in rs if r["new_worker_first"]["requests"]]
        olds = [r["old_workers_same_window"] for r in rs if r["old_workers_same_window"]["requests"]]
        # Runs where the new worker got no request within --timeout-s have no TTFT of it: nan, listed below.
        med = {k: statistics.median(f[k] for f in firsts) if firsts else float("nan")
               for k in ("ttft_p50_ms", "ttft_p99_ms", "cached_share")}
        med["requests_per_run"] = [r["new_worker_first"]["requests"] for r in rs]
        old = {k: statistics.median(f[k] for f in olds) for k in ("ttft_p50_ms", "ttft_p99_ms")} if olds else {}
        after = {k: statistics.median(r["all_after_join"][k] for r in rs) for k in ("ttft_p50_ms", "ttft_p99_ms")}
        first_s = statistics.median(r["seconds_to_first_new_request"] or float("inf") for r in rs)
        share = statistics.median(r["new_worker_share_after_join"] for r in rs)
        table[m] = {"new_worker_first": med, "old_workers_same_window": old, "all_after_join": after,
                    "seconds_to_first_new_request": first_s, "new_worker_share_after_join": share}
        print(f"| {m} | {med['ttft_p50_ms']:.1f} / {med['ttft_p99_ms']:.1f} | {med['cached_share']:.3f} | "
              f"{', '.join(str(f['ttft_p50_ms']) for f in firsts)} | "
              f"{old.get('ttft_p50_ms', 0):.1f} / {old.get('ttft_p99_ms', 0):.1f} | "
              f"{', '.join(str(r['seconds_to_first_new_request']) for r in rs)} | "
              f"{after['ttft_p50_ms']:.1f} / {after['ttft_p99_ms']:.1f} | {share:.3f} |")
    if len(modes) == 2:
        a, b = (table[m]["all_after_join"] for m in modes)
        print(f"{modes[0]} / {modes[1]}: every request's TTFT after the join p50 {a['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x, "
              f"p99 {a['ttft_p99_ms'] / b['ttft_p99_ms']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "runs": runs, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

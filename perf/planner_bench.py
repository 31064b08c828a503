"""Planner benchmark (issue #17): one bursty trace, side by side: static deployments (1P+1D, 1P+2D,
1P+3D), the `load` policy and the `sla` policy. Per configuration: SLA attainment (requests meeting
TTFT and TPOT targets, failures count as misses), goodput (such requests per second) and worker-seconds.

    simulate: `kvrelay planner simulate` (the mocker timing model, planner in the loop, modeled time)
    real:     `kvrelay serve --engine mocker` with the same timing knobs, the trace replayed at its own
              timestamps by `kvrelay bench run --workload trace`; worker-seconds of a static deployment
              are workers x the replay's window, of a planner the integral of max(ready, asked-for)
              sampled from its /status every 0.5 s.

    python -m kvrelay.perf.planner_bench simulate --duration 360
    python -m kvrelay.perf.planner_bench real --duration 360
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvrelay.perf.serve_process import Serve, free_port

TTFT_MS, TPOT_MS = 500, 40
TIMING = ["--mocker-prefill-us-per-token", "50", "--mocker-decode-base-ms", "20", "--mocker-decode-us-per-seq", "500",
          "--max-num-seqs", "16"]
TARGETS = ["--ttft-target", str(TTFT_MS / 1000), "--itl-target", str(TPOT_MS / 1000)]
PLANNED = ["--max-prefill", "1", "--min-decode", "1", "--max-decode", "4", "--budget", "5"]
CONFIGS = ("1x1", "1x2", "1x3", "load", "sla")


def kvrelay(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "kvrelay.cli.main", *args], capture_output=True, text=True, check=True)
    return r.stdout


def write_trace(path: Path, duration: float) -> None:
    kvrelay("planner", "trace", "--out", str(path), "--duration-s", str(duration), "--base-rate", "3",
            "--burst-rate", "12", "--burst-every-s", str(duration / 3), "--burst-len-s", str(duration / 9),
            "--isl", "512", "--osl", "64")


def simulate(trace: Path, interval: float, min_prefill: int, configs: list[str]) -> dict[str, dict]:
    out = {}
    for name in configs:
        how = ["--static", name] if "x" in name else ["--planner-policy", name]
        line = kvrelay("planner", "simulate", "--trace", str(trace), *TIMING, *TARGETS, *PLANNED, "--startup-s", "2",
                       "--min-prefill", str(min_prefill),
                       "--planner-interval", str(interval), *how).strip().splitlines()[-1]
        w = line.split()
        out[name] = {"attainment": float(w[w.index("attainment") + 1].rstrip("%")) / 100,
                     "goodput": float(w[w.index("goodput") + 1].rstrip("/s")),
                     "worker_seconds": float(w[w.index("worker-seconds") + 1]), "line": line}
    return out


async def _sample_workers(url: str, stop: asyncio.Event, samples: list[tuple[float, int]]) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            try:
                s = (await client.get(f"{url}/status")).json()
                pending = s["pending"] or {}
                samples.append((time.monotonic(), sum(max(n, pending.get(p, 0)) for p, n in s["ready"].items())))
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)


def _integral(samples: list[tuple[float, int]]) -> float:
    return sum((t1 - t0) * n for (t0, n), (t1, _) in zip(samples, samples[1:], strict=False))


async def real_one(name: str, trace: Path, tmp: Path, interval: float, profile: Path, min_prefill: int) -> dict:
    common = ["--engine", "mocker", *TIMING, "--disagg-min-tokens", "1"]
    if "x" in name:
        p, d = name.split("x")
        serve = Serve(tmp, *common, "--prefill-workers", p, "--decode-workers", d, workers=None)
    else:
        port = free_port()
        serve = Serve(tmp, *common, "--prefill-workers", "1", "--decode-workers", "1", "--planner", name,
                      "--planner-interval", str(interval), "--planner-port", str(port), "--profile", str(profile),
                      "--min-prefill", str(min_prefill),
                      *TARGETS, *PLANNED, workers=None)
    serve.start()
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = None
    if "x" not in name:
        sampler = asyncio.create_task(_sample_workers(f"http://127.0.0.1:{port}", stop, samples))
    try:
        out = tmp / f"bench-{name}"
        await asyncio.to_thread(kvrelay, "bench", "run", "--url", serve.base_url, "--workload", "trace", "--trace",
                                str(trace), "--slo", f"ttft={TTFT_MS},tpot={TPOT_MS}", "--out", str(out),
                                "--no-plots", "--no-progress", "--ignore-eos")
    finally:
        stop.set()
        if sampler is not None:
            await sampler
        serve.stop()
    summary = json.loads((out / "bench.json").read_text())["summary"]
    window = summary["duration_s"]
    if "x" in name:
        p, d = name.split("x")
        ws = (int(p) + int(d)) * window
    else:
        ws = _integral(samples)
    return {"attainment": summary["slo_attainment"], "goodput": summary["goodput"], "worker_seconds": ws,
            "requests": summary["requests"] if "requests" in summary else None, "errors": summary["errors"],
            "ttft_p90_ms": summary["ttft_ms"]["p90"], "tpot_p90_ms": summary["tpot_ms"]["p90"],
            "max_workers": max((n for _, n in samples), default=None)}


def table(title: str, rows: dict[str, dict]) -> str:
    lines = [f"**{title}**", "", "| config | SLA attainment | goodput (req/s) | worker-seconds |", "|---|---|---|---|"]
    for name, r in rows.items():
        label = f"static {name.replace('x', 'P+')}D" if "x" in name else f"planner `{name}`"
        lines.append(f"| {label} | {r['attainment']:.1%} | {r['goodput']:.2f} | {r['worker_seconds']:.0f} |")
    static = {n: r for n, r in rows.items() if "x" in n}
    if static and "sla" in rows:
        best = max(r["attainment"] for r in static.values())
        cheapest = min(r["worker_seconds"] for r in static.values() if r["attainment"] >= best)
        sla = rows["sla"]
        lines += ["", f"best static attainment {best:.1%} at {cheapest:.0f} worker-seconds; `sla` "
                  f"{sla['attainment']:.1%} at {sla['worker_seconds']:.0f} = {sla['worker_seconds'] / cheapest:.0%} "
                  "of them"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m kvrelay.perf.planner_bench")
    ap.add_argument("mode", choices=("simulate", "real"))
    ap.add_argument("--duration", type=float, default=540.0, help="trace length, s")
    ap.add_argument("--interval", type=float, default=2.0, help="planner interval, s")
    ap.add_argument("--min-prefill", type=int, default=0, help="planners: fewest prefill workers (0: decode "
                    "workers prefill locally at low load)")
    ap.add_argument("--keep", default="", help="write traces, serve logs and bench.json here (kept)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if not set(configs) <= set(CONFIGS):
        ap.error(f"--configs: choose from {','.join(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="planner-bench-") as d:
        tmp = Path(args.keep or d)
        tmp.mkdir(parents=True, exist_ok=True)
        trace = tmp / "bursty.jsonl"
        write_trace(trace, args.duration)
        if args.mode == "simulate":
            rows = simulate(trace, args.interval, args.min_prefill, configs)
            for r in rows.values():
                print(r["line"])  # noqa: T201
        else:
            profile = tmp / "profile.json"
            kvrelay("planner", "profile", "--out", str(profile), *TIMING)
            rows = {}
            for name in configs:
                (tmp / name).mkdir()
                rows[name] = asyncio.run(real_one(name, trace, tmp / name, args.interval, profile, args.min_prefill))
                print(name, json.dumps(rows[name]), flush=True)  # noqa: T201
        print(table(f"{args.mode}, {args.duration:.0f} s bursty trace", rows))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())

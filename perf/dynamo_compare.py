"""kvrelay's frontend vs NVIDIA Dynamo's, as a user of both would compare them (issue 33): one command,
every arm reported, not the best.

    python -m kvrelay.perf.dynamo_compare --aiperf /work/venvs/aiperf/bin/aiperf \\
        --dynamo-python /work/venvs/dynamo/bin/python [--tokenizers tiny,smollm2] [--repeats 3] \\
        [--token-count server|aiperf] [--at-once] [--json perf/runs/issue33/compare.json]

The load: aiperf `profile --endpoint-type chat --streaming`, `--isl` (256) prompt tokens, `--osl` (64)
output tokens (`ignore_eos`), `--concurrency` (16), `--requests` (500) per run. Each server serves one
mocker at the same simulated speed (ours `--mocker-speedup`, Dynamo's `--speedup-ratio`; `--speedup`,
1000). Arms, per tokenizer (`tiny`: kvrelay's 2,048-token test vocabulary; `smollm2`: SmolLM2's
49,152, the default model's, with its chat template):

- kvrelay default (`kvrelay serve --engine mocker --workers 1`, nothing else: its HTTP processes and
  router are its defaults) and kvrelay `--http-workers 1` (`--kvrelay-arms default,1`; a number: that
  many HTTP processes);
- Dynamo 1.6.1 `dynamo.frontend` with its default router (round-robin) and with `--router-mode kv`
  (`--dynamo-arms default,kv`),
  file discovery, TCP request plane, ZMQ events, every host 127.0.0.1 (perf/dynamo_process.py).

Each run starts its server, lets aiperf warm it up, measures, and stops it: one server up at a time
(`--at-once` starts them all first instead, the setting of perf/frontend_chat_bench.py). The arms run
interleaved, the order rotated each repeat; the median run of each arm is reported, with every run's
rate. `--token-count server` (the default) counts output tokens from the servers' usage (aiperf
otherwise re-tokenizes the streamed text, and a mocker's random tokens do not re-tokenize to
themselves: that changes ITL, which is (end-to-end - TTFT) / (output tokens - 1)); `aiperf` is its default.

Printed: a table per tokenizer, then every kvrelay arm / Dynamo arm ratio of request rate and ITL p50;
the issue's bar: the kv-vs-kv arm with defaults on both sides >= 1.3x Dynamo's rate and ITL p50 <= 1x,
every other arm >= 1.0x.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvrelay.perf.aiperf_load import run_aiperf
from kvrelay.perf.serve_process import Serve

if TYPE_CHECKING:
    from kvrelay.perf.dynamo_process import DynamoServe


@dataclass(frozen=True)
class Arm:
    name: str
    server: str  # kvrelay | dynamo
    http_workers: int | None = None  # kvrelay: None = its default
    router_mode: str | None = None  # dynamo: None = its default


def arms_from(kvrelay: str, dynamo: str) -> list[Arm]:
    """`--kvrelay-arms default,1,2` (HTTP processes; default: serve's own choice) and `--dynamo-arms
    default,kv` (router mode; default: Dynamo's own, round-robin)."""
    out = [Arm("kvrelay default", "kvrelay") if k == "default" else Arm(f"kvrelay http-workers {int(k)}", "kvrelay",
                                                                       http_workers=int(k))
           for k in kvrelay.split(",") if k]
    out += [Arm("dynamo default (round-robin)", "dynamo") if d == "default" else Arm(f"dynamo router-mode {d}", "dynamo",
                                                                                  router_mode=d)
            for d in dynamo.split(",") if d]
    return out


def model_for(tokenizer: str) -> tuple[Path, str]:
    """The model directory (tokenizer, config, chat template) both mockers read, and its served name."""
    from kvrelay.workers.models.registry import SMOLLM2, resolve_model
    from kvrelay.workers.models.tiny import ensure_tiny_model

    if tokenizer == "tiny":
        return ensure_tiny_model(), "kvrelay-tiny"
    if tokenizer == "smollm2":
        return resolve_model(SMOLLM2).path, SMOLLM2
    raise SystemExit(f"--tokenizers: unknown {tokenizer!r} (tiny, smollm2)")


class _Server:
    """One arm's server on one tokenizer: started, warmed by aiperf, stopped."""

    def __init__(self, arm: Arm, args: argparse.Namespace, model_dir: Path, name: str, workdir: Path):
        self.arm, self.args, self.model_dir, self.name, self.workdir = arm, args, model_dir, name, workdir
        self.proc: Serve | DynamoServe | None = None
        self.base_url = ""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.arm.server == "kvrelay":
            srv = Serve(self.workdir, "--engine", "mocker", "--mocker-speedup", self.args.speedup,
                        "--model", str(self.model_dir), "--served-model-name", self.name, workers=1,
                        http_workers=self.arm.http_workers)
            self.proc = srv.start(timeout=180)
            self.base_url = srv.base_url
        else:
            from kvrelay.perf.dynamo_process import DynamoServe

            dyn = DynamoServe(self.args.dynamo_python, self.workdir, str(self.model_dir), self.name,
                              router_mode=self.arm.router_mode, speedup=self.args.speedup)
            self.proc = dyn.start(timeout=180)
            self.base_url = dyn.base_url

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def one_run(args: argparse.Namespace, server: _Server, tokenizer_dir: Path, out: Path) -> dict:
    r = run_aiperf(args.aiperf, server.base_url, server.name, str(tokenizer_dir), out,
                   input_tokens=args.isl, output_tokens=args.osl, concurrency=args.concurrency,
                   requests=args.requests, server_token_count=args.token_count == "server")
    return {**r, "load_avg": os.getloadavg()[0]}


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["requests_per_s"])
    return {**ordered[len(ordered) // 2], "runs_requests_per_s": [round(r["requests_per_s"], 1) for r in runs],
            "runs_itl_p50_ms": [round(r["itl_p50_ms"], 3) for r in runs]}


def ratios(arms: list[Arm], medians: dict[str, dict]) -> list[dict]:
    """Every kvrelay arm over every Dynamo arm: request rate and ITL p50 (the bar per pair)."""
    out = []
    for k in (a for a in arms if a.server == "kvrelay"):
        for d in (a for a in arms if a.server == "dynamo"):
            headline = k.http_workers is None and d.router_mode == "kv"
            rate = medians[k.name]["requests_per_s"] / medians[d.name]["requests_per_s"]
            itl = medians[k.name]["itl_p50_ms"] / medians[d.name]["itl_p50_ms"]
            bar = (rate >= 1.3 and itl <= 1.0) if headline else rate >= 1.0
            out.append({"kvrelay": k.name, "dynamo": d.name, "kv_vs_kv_defaults": headline,
                        "requests_per_s": round(rate, 3), "itl_p50": round(itl, 3), "meets_bar": bar})
    return out


def run(args: argparse.Namespace) -> dict:
    arms = [a for a in arms_from(args.kvrelay_arms, args.dynamo_arms) if a.server == "kvrelay" or args.dynamo_python]
    result: dict = {"setting": {k: v for k, v in vars(args).items() if k != "json"}, "tokenizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for tok in args.tokenizers.split(","):
            model_dir, name = model_for(tok)
            servers = {a.name: _Server(a, args, model_dir, name, root / tok / a.name.replace(" ", "-")) for a in arms}
            rows: dict[str, list[dict]] = {a.name: [] for a in arms}
            try:
                if args.at_once:
                    for s in servers.values():
                        s.start()
                for rep in range(args.repeats):
                    order = arms[rep % len(arms):] + arms[:rep % len(arms)]
                    for arm in order:
                        s = servers[arm.name]
                        if not args.at_once:
                            s.start()
                        try:
                            r = one_run(args, s, model_dir, root / tok / f"aiperf-{arm.name.replace(' ', '-')}-{rep}")
                        finally:
                            if not args.at_once:
                                s.stop()
                        rows[arm.name].append(r)
                        print(f"  {tok} rep {rep} {arm.name}: {r['requests_per_s']:.1f} req/s, ITL p50 "
                              f"{r['itl_p50_ms']:.3f} ms, TTFT p50 {r['ttft_p50_ms']:.1f} ms, errors "
                              f"{r['errors']}, load {r['load_avg']:.1f}", flush=True)
                        time.sleep(args.settle)
            finally:
                for s in servers.values():
                    s.stop()
            medians = {name: median_run(runs) for name, runs in rows.items()}
            result["tokenizers"][tok] = {"arms": medians, "ratios": ratios(arms, medians)}
    return result


def print_report(result: dict) -> None:
    for tok, r in result["tokenizers"].items():
        print(f"\n{tok}: | arm | req/s (median; runs) | TTFT p50 / p99 ms | ITL p50 / p99 ms (runs' p50) | errors |")
        for name, a in r["arms"].items():
            runs = ", ".join(f"{x:.0f}" for x in a["runs_requests_per_s"])
            print(f"| {name} | {a['requests_per_s']:.0f} ({runs}) | {a['ttft_p50_ms']:.1f} / {a['ttft_p99_ms']:.1f} | "
                  f"{a['itl_p50_ms']:.3f} / {a['itl_p99_ms']:.3f} ({', '.join(map(str, a['runs_itl_p50_ms']))}) | "
                  f"{a['errors']} |")
        for x in r["ratios"]:
            mark = " (kv vs kv, defaults)" if x["kv_vs_kv_defaults"] else ""
            print(f"  {x['kvrelay']} / {x['dynamo']}{mark}: rate {x['requests_per_s']:.2f}x, ITL p50 "
                  f"{x['itl_p50']:.2f}x -> {'meets' if x['meets_bar'] else 'misses'} the bar")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.dynamo_compare", description=__doc__.split("\n")[0])
    p.add_argument("--aiperf", required=True, help="the aiperf executable (pip install aiperf, own venv)")
    p.add_argument("--dynamo-python", default="", help="the Python with ai-dynamo installed (none: kvrelay arms only)")
    p.add_argument("--tokenizers", default="tiny,smollm2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--isl", type=int, default=256)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--speedup", default="1000")
    p.add_argument("--kvrelay-arms", default="default,1", help="HTTP processes per kvrelay arm ('default': serve's)")
    p.add_argument("--dynamo-arms", default="default,kv", help="router mode per Dynamo arm ('default': Dynamo's)")
    p.add_argument("--token-count", choices=("server", "aiperf"), default="server")
    p.add_argument("--at-once", action="store_true", help="all servers up for the whole run")
    p.add_argument("--settle", type=float, default=2.0, help="seconds between runs")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.requests < 1 or args.concurrency < 1:
        p.error("--repeats, --requests and --concurrency must be >= 1")
    result = run(args)
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(x["meets_bar"] for r in result["tokenizers"].values() for x in r["ratios"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`kvrelay bench run ...` (load-test any OpenAI-compatible endpoint) and `kvrelay bench compare A.json B.json`.

Bench settings are flags only (no KVRELAY_* environment): see kvrelay.perf.bench.config. The API key
comes from --api-key or OPENAI_API_KEY. `python -m kvrelay.cli.bench_cmd ...` runs the same commands.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from kvrelay.cli.parser import Parser
from kvrelay.runtime.config import ConfigError


def _rate(raw: str) -> float:
    value = float(raw)  # "inf" parses; ValueError becomes argparse's one-line error
    if math.isnan(value):
        raise ValueError(raw)
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from kvrelay.perf.bench.config import ARRIVALS, WORKLOADS, BenchConfig

    d = BenchConfig()  # --help shows the real defaults
    bench = sub.add_parser("bench", help="benchmark an OpenAI-compatible endpoint (ours or another)")
    actions = bench.add_subparsers(dest="bench_action", metavar="ACTION", parser_class=Parser, required=True)

    run = actions.add_parser("run", help="send a workload, write bench.json, bench.md and PNG plots")
    ep = run.add_argument_group("endpoint")
    ep.add_argument("--url", default=d.url, metavar="URL", help=f"server base URL (default {d.url})")
    ep.add_argument("--model", default="", metavar="NAME", help="model name (default: the first one GET /v1/models lists)")
    ep.add_argument("--endpoint", choices=["completions", "chat"], default=d.endpoint,
                    help="/v1/completions or /v1/chat/completions (default completions)")
    ep.add_argument("--prompt-format", choices=["tokens", "text"], default=d.prompt_format,
                    help="tokens: prompt as token ids, exact lengths (kvrelay, vLLM, SGLang); text: decoded "
                         "words, for any endpoint (default tokens)")
    ep.add_argument("--tokenizer", default="", metavar="DIR|NAME",
                    help="directory with tokenizer.json, or a kvrelay model name (tiny, smollm2-135m-instruct); "
                         "default: the kvrelay model the endpoint serves")
    ep.add_argument("--api-key", default=None, metavar="KEY", help="bearer token (default: $OPENAI_API_KEY, else none)")
    ep.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=d.ignore_eos,
                    help="send ignore_eos so outputs are exactly --output-len (default on; off for OpenAI)")
    ep.add_argument("--extra-body", default="", metavar="JSON",
                    help='extra request fields, e.g. \'{"temperature": 0}\'')
    ep.add_argument("--timeout", type=float, metavar="S", default=d.timeout,
                    help=f"per-request timeout, s (default {d.timeout:g})")

    load = run.add_argument_group("load")
    load.add_argument("--workload", choices=WORKLOADS, default=d.workload, help="default random")
    load.add_argument("--seed", type=int, metavar="N", default=d.seed, help="workload and arrival seed (default 0)")
    load.add_argument("--num-requests", type=int, default=None, metavar="N",
                      help="measured requests (default: the workload's natural size; 100 for random)")
    load.add_argument("--duration", type=float, default=None, metavar="S", help="stop dispatching after this many seconds")
    load.add_argument("--warmup", type=int, metavar="N", default=d.warmup, help="warm-up requests, excluded (default 0)")
    load.add_argument("--concurrency", type=int, default=None, metavar="N",
                      help="closed loop: requests in flight (default 1); with a rate: cap on in flight")
    load.add_argument("--request-rate", type=_rate, default=None, metavar="R", help="open loop: requests/s (inf: all at once)")
    load.add_argument("--burstiness", type=float, metavar="K", default=d.burstiness,
                      help="gamma shape of inter-arrival gaps: 1 = Poisson (default), <1 burstier")
    load.add_argument("--arrivals", choices=ARRIVALS, default=d.arrivals,
                      help="auto: trace timestamps for --workload trace, poisson/gamma with --request-rate, "
                           "else closed")

    shape = run.add_argument_group("workload shape")
    for flag, kind, help_text in (
        ("--input-len", int, "random prompt / prefix suffix / multi-turn user turn / long-doc question tokens"),
        ("--output-len", int, "output tokens (max_tokens)"),
        ("--range-ratio", float, "random: lengths uniform in [L*(1-r), L*(1+r)]"),
        ("--num-prefixes", int, "prefix: shared prefixes"), ("--prefix-len", int, "prefix: tokens per prefix"),
        ("--suffixes-per-prefix", int, "prefix: suffixes per prefix"), ("--users", int, "multi-turn: users"),
        ("--turns", int, "multi-turn: turns per user"),
        ("--system-len", int, "multi-turn: tokens of a system prompt all users share"),
        ("--long-users", int, "multi-turn: users (the first of each wave) whose turns are --long-factor x longer"),
        ("--long-factor", int, "multi-turn: how much longer the --long-users' turns are"),
        ("--num-docs", int, "long-doc: documents"),
        ("--doc-len", int, "long-doc: tokens per document"), ("--questions-per-doc", int, "long-doc: questions"),
        ("--hot-doc-share", float, "long-doc: share of questions about document 0, the rest spread over the "
                                   "others (a hot document; 0: all alike)"),
        ("--block-size", int, "trace: tokens per hash_id block (Mooncake: 512)"),
        ("--trace-speedup", float, "trace: divide timestamps by this"),
    ):
        dest = flag[2:].replace("-", "_")
        shape.add_argument(flag, type=kind, default=getattr(d, dest), metavar="N" if kind is int else "X",
                           help=f"{help_text} (default {getattr(d, dest)})")
    shape.add_argument("--trace", default="", metavar="JSONL", help="trace: Mooncake-format JSONL file")

    out = run.add_argument_group("output")
    out.add_argument("--slo", default="", metavar="KEY=MS,...",
                     help="goodput SLO, keys ttft, itl, tpot, e2e in ms, e.g. ttft=500,itl=50")
    out.add_argument("--out", default=None, metavar="DIR", help="output directory (default bench-out/WORKLOAD-TIME)")
    out.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="progress line on stderr")
    run.set_defaults(func=_run)

    cmp = actions.add_parser("compare", help="two bench.json runs side by side with B/A ratios")
    cmp.add_argument("a", metavar="A.json")
    cmp.add_argument("b", metavar="B.json")
    cmp.add_argument("--out", default=None, metavar="FILE", help="also write the Markdown table here")
    cmp.set_defaults(func=_compare)


# BenchConfig fields whose flag is parsed from text (the others are taken as the flags give them).
_PARSED_FIELDS = ("slo", "extra_body")


def config_from_args(args: argparse.Namespace):
    """Flags -> a validated BenchConfig (ConfigError names the bad flag). Every BenchConfig field is set
    from the flag of the same name (derived from the Struct, so a new field cannot be silently dropped:
    `--system-len` once was; tests/cli/test_bench_cmd.py checks each field reaches the config)."""
    from msgspec import structs

    from kvrelay.perf.bench.config import BenchConfig, parse_extra_body, parse_slo, validate

    values = {f.name: getattr(args, f.name) for f in structs.fields(BenchConfig) if f.name not in _PARSED_FIELDS}
    return validate(BenchConfig(**values, slo=parse_slo(args.slo), extra_body=parse_extra_body(args.extra_body)))


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    import httpx
    from msgspec import structs

    from kvrelay.perf.bench import report
    from kvrelay.perf.bench.runner import run_benchmark
    from kvrelay.perf.bench.tokens import load_tokenizer
    from kvrelay.runtime import aio

    api_key = args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY", "")
    if not os.path.isdir(cfg.tokenizer):
        try:
            cfg = structs.replace(cfg, tokenizer=_tokenizer_dir(cfg, api_key))
        except (httpx.HTTPError, RuntimeError) as e:
            sys.stderr.write(f"kvrelay bench: error: {cfg.url}: {type(e).__name__}: {e}\n")
            return 1
    out = Path(args.out or f"bench-out/{cfg.workload}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        result = aio.run(run_benchmark(cfg, load_tokenizer(cfg.tokenizer), api_key=api_key, progress=args.progress))
    except (httpx.HTTPError, OSError, RuntimeError) as e:  # model discovery: unreachable, no models, ...
        sys.stderr.write(f"kvrelay bench: error: {cfg.url}: {type(e).__name__}: {e}\n")
        return 1
    paths = report.write(result, out, plots=args.plots)
    sys.stdout.write(report.markdown(result))
    sys.stdout.write("\nwrote " + ", ".join(str(p) for p in paths) + "\n")
    return 0 if result.summary.succeeded > 0 else 1


def _tokenizer_dir(cfg, api_key: str) -> str:
    """--tokenizer as a kvrelay model name, or (not given) the model the endpoint serves when it is one
    of kvrelay's named models; anything else needs an explicit --tokenizer DIR."""
    from kvrelay.perf.bench.client import discover_model
    from kvrelay.runtime import aio
    from kvrelay.workers.models.registry import PACKAGED, TINY, TINY_SERVED_NAME, resolve_model

    name = cfg.tokenizer or cfg.model or aio.run(discover_model(cfg.url, api_key))
    name = TINY if name == TINY_SERVED_NAME else name
    if name != TINY and name not in PACKAGED:
        if cfg.tokenizer:
            raise ConfigError(f"--tokenizer: {name!r} is neither a directory holding tokenizer.json nor a "
                              f"kvrelay model name ({TINY}, {', '.join(PACKAGED)})")
        raise ConfigError(f"--tokenizer: {cfg.url} serves {name!r}, not a kvrelay model name; "
                          f"give --tokenizer DIR (a directory with tokenizer.json)")
    return str(resolve_model(name).path)


def _compare(args: argparse.Namespace) -> int:
    import msgspec

    from kvrelay.perf.bench.compare import compare_markdown
    from kvrelay.perf.bench.report import read_result

    results = []
    for flag, path in (("A.json", args.a), ("B.json", args.b)):
        try:
            results.append(read_result(path))
        except OSError as e:
            raise ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from None
        except msgspec.DecodeError as e:
            raise ConfigError(f"{flag}: {path} is not a kvrelay bench result ({e})") from None
    a, b = results
    text = compare_markdown(a, b, name_a=args.a, name_b=args.b)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0

"""A run's outputs in its --out directory: bench.json (everything, records included), bench.md (the
summary table) and PNG plots: latency_cdf.png (TTFT, ITL, TPOT, e2e CDFs) and throughput.png (output
tokens/s and finished requests/s over time). matplotlib is imported only here, lazily, on Agg.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from kvrelay.perf.bench.metrics import BenchResult, Stat, Summary, timeline

JSON_NAME, MARKDOWN_NAME, CDF_NAME, TIMELINE_NAME = "bench.json", "bench.md", "latency_cdf.png", "throughput.png"


def read_result(path: str | Path) -> BenchResult:
    return msgspec.json.decode(Path(path).read_bytes(), type=BenchResult)


def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"


def summary_rows(s: Summary) -> list[tuple[str, str]]:
    rows = [("requests (succeeded / failed)", f"{s.succeeded} / {s.failed}"),
            ("duration (s)", _num(s.duration_s)),
            ("request throughput (req/s)", _num(s.request_throughput, 3)),
            ("input token throughput (tok/s)", _num(s.input_token_throughput, 1)),
            ("output token throughput (tok/s)", _num(s.output_token_throughput, 1)),
            ("total token throughput (tok/s)", _num(s.total_token_throughput, 1)),
            ("prompt / output tokens", f"{s.prompt_tokens:,} / {s.output_tokens:,}"),
            ("prefix hit rate (cached_tokens)",
             "-" if s.prefix_hit_rate is None else f"{100 * s.prefix_hit_rate:.1f}%")]
    if s.slo_ms:
        bounds = ", ".join(f"{k}<={v:g}ms" for k, v in s.slo_ms.items())
        rows += [(f"goodput (req/s, {bounds})", _num(s.goodput, 3)),
                 ("SLO attainment", "-" if s.slo_attainment is None else f"{100 * s.slo_attainment:.1f}%")]
    if s.output_length_mismatches:
        rows.append(("output length != max_tokens", str(s.output_length_mismatches)))
    rows += [(f"errors: {k}", str(v)) for k, v in s.errors.items()]
    return rows


def latency_rows(s: Summary) -> list[tuple[str, Stat]]:
    return [("TTFT", s.ttft_ms), ("ITL", s.itl_ms), ("TPOT", s.tpot_ms), ("E2E", s.e2e_ms)]


def markdown(result: BenchResult) -> str:
    cfg, s = result.config, result.summary
    mode = cfg.arrival_mode()
    if mode == "closed":
        load = f"concurrency {cfg.concurrency or 1}"
    elif mode == "trace":
        load = f"trace timestamps x{cfg.trace_speedup:g}"
    else:
        rate = "inf" if cfg.request_rate is None else f"{cfg.request_rate:g}"  # JSON writes inf as null
        load = f"{mode} {rate} req/s" + (f", burstiness {cfg.burstiness:g}" if mode == "gamma" else "")
    if mode != "closed" and cfg.concurrency:
        load += f", at most {cfg.concurrency} in flight"
    lines = [f"# kvrelay bench: {cfg.workload}", "",
             f"`{result.model}` at {cfg.url} ({cfg.endpoint}, {cfg.prompt_format} prompts), {load}, "
             f"seed {cfg.seed}, {result.warmup_requests} warm-up requests excluded, started {result.started_at}.",
             "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary_rows(s)]
    lines += ["", "| latency (ms) | mean | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    for name, st in latency_rows(s):
        lines.append(f"| {name} | {_num(st.mean)} | {_num(st.p50)} | {_num(st.p90)} | {_num(st.p99)} | {_num(st.max)} |")
    return "\n".join(lines) + "\n"


def _cdf(ax, values: list[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(alpha=0.3)
    if values:
        xs = np.sort(np.asarray(values) * 1000.0)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), drawstyle="steps-post")


def plot(result: BenchResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r.ok]
    series = [([r.ttft for r in ok if r.ttft is not None], "TTFT"), ([g for r in ok for g in r.itl], "ITL"),
              ([t for r in ok if (t := r.tpot) is not None], "TPOT"), ([r.e2e for r in ok], "E2E latency")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (values, title) in zip(axes.flat, series, strict=True):
        _cdf(ax, values, title)
    fig.suptitle(f"{result.config.workload} on {result.model}: latency CDFs")
    fig.tight_layout()
    cdf_path = out / CDF_NAME
    fig.savefig(cdf_path, dpi=100)
    plt.close(fig)

    edges, req_s, tok_s = timeline(result.records)
    fig, ax = plt.subplots(figsize=(10, 4))
    if len(tok_s):
        ax.stairs(tok_s, edges, label="output tokens/s", color="tab:blue")
    ax.set_xlabel(f"seconds since start ({edges[1] - edges[0] if len(edges) > 1 else 0:g} s buckets)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    if len(req_s):
        ax2.stairs(req_s, edges, label="finished requests/s", color="tab:orange")
    ax2.set_ylabel("finished requests/s")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right")
    ax.set_title(f"{result.config.workload} on {result.model}: throughput over time")
    fig.tight_layout()
    timeline_path = out / TIMELINE_NAME
    fig.savefig(timeline_path, dpi=100)
    plt.close(fig)
    return [cdf_path, timeline_path]


def write(result: BenchResult, out: str | Path, plots: bool = True) -> list[Path]:
    """Write JSON, Markdown and (unless plots=False) PNGs into `out`; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / JSON_NAME, out / MARKDOWN_NAME
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=1))
    md_path.write_text(markdown(result))
    return [json_path, md_path, *(plot(result, out) if plots else [])]

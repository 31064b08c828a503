"""`kvrelay bench compare A.json B.json`: two runs side by side, with B/A ratios.

A ratio > 1 means B is higher: better for throughputs, goodput and hit rate; worse for latencies.
The "better" column says which run wins each row, so the table reads without that rule.
"""

from __future__ import annotations

from collections.abc import Callable

from kvrelay.perf.bench.metrics import BenchResult, Summary

# (row name, value getter, higher is better)
Row = tuple[str, Callable[[Summary], float | None], bool]

ROWS: list[Row] = [
    ("succeeded requests", lambda s: s.succeeded, True),
    ("failed requests", lambda s: s.failed, False),
    ("request throughput (req/s)", lambda s: s.request_throughput, True),
    ("output token throughput (tok/s)", lambda s: s.output_token_throughput, True),
    ("total token throughput (tok/s)", lambda s: s.total_token_throughput, True),
    ("goodput (req/s)", lambda s: s.goodput, True),
    ("SLO attainment", lambda s: s.slo_attainment, True),
    ("prefix hit rate", lambda s: s.prefix_hit_rate, True),
]


def _latency(attr: str, q: str) -> Callable[[Summary], float | None]:
    return lambda s: getattr(getattr(s, attr), q)


for _name, _attr in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")):
    for _q in ("mean", "p50", "p90", "p99"):
        ROWS.append((f"{_name} {_q} (ms)", _latency(_attr, _q), False))


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


def compare_rows(a: Summary, b: Summary) -> list[tuple[str, float | None, float | None, float | None, str]]:
    out = []
    for name, get, higher_better in ROWS:
        va, vb = get(a), get(b)
        if va is None and vb is None:
            continue
        better = "" if va is None or vb is None or va == vb else ("B" if (vb > va) == higher_better else "A")
        out.append((name, va, vb, ratio(va, vb), better))
    return out


def _describe(r: BenchResult) -> str:
    c = r.config
    return f"{r.model} @ {c.url}, {c.workload}, {c.arrival_mode()}, {r.summary.requests} requests, {r.started_at}"


def compare_markdown(a: BenchResult, b: BenchResult, name_a: str = "A", name_b: str = "B") -> str:
    lines = ["# kvrelay bench compare", "", f"- A = `{name_a}`: {_describe(a)}", f"- B = `{name_b}`: {_describe(b)}"]
    if a.config.workload != b.config.workload or a.config.seed != b.config.seed:
        lines.append("- note: the runs used different workloads or seeds; their prompts differ")
    lines += ["", "| metric | A | B | B/A | better |", "|---|---|---|---|---|"]
    for name, va, vb, r, better in compare_rows(a.summary, b.summary):
        lines.append(f"| {name} | {_fmt(va)} | {_fmt(vb)} | {'-' if r is None else f'{r:.3f}x'} | {better} |")
    return "\n".join(lines) + "\n"

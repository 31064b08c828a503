"""One benchmark, two revisions of kvrelay, interleaved in one run on the same machine (a refactor's "no
regression beyond noise" check: machine noise then hits both sides alike).

    python -m kvrelay.perf.compare_revisions --base REV [--rounds 3] -- engine_bench --models tiny --json {json}

The base revision is checked out into a temporary git worktree whose folders are mapped onto the
`kvrelay.*` package names (pyproject's package-dir) through a symlink farm on PYTHONPATH, so both sides
run the same installed dependencies; only kvrelay's own code differs. Each round runs the base, then
this checkout (`{json}` in the command becomes a per-run JSON path; `{dir}` a per-run folder, whose
`results.json` is read: vllm_tier_bench's `--out`; without either, the JSON the benchmark prints last on
stdout is taken). The per-run JSON files and a summary
(every numeric leaf: median per side and the ratio current/base) are written to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs() -> dict[str, str]:
    """kvrelay.<name> -> folder, from pyproject's [tool.setuptools] package-dir."""
    text = (ROOT / "pyproject.toml").read_text()
    return dict(re.findall(r'"kvrelay\.(\w+)" = "(\w+)"', text.split("package-dir", 1)[1].split("\n", 1)[0]))


def _farm(tree: Path, into: Path) -> Path:
    pkg = into / "kvrelay"
    pkg.mkdir(parents=True)
    for name, folder in _package_dirs().items():
        if (tree / folder).is_dir():
            (pkg / name).symlink_to(tree / folder)
    return into


def _leaves(obj: object, prefix: str = "") -> dict[str, float]:
    if isinstance(obj, dict):
        out: dict[str, float] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_leaves(v, f"{prefix}[{i}]"))
        return out
    return {prefix: float(obj)} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="compare_revisions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. a commit before a change)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="compare_revisions", help="folder for the per-run JSON and summary.json")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- BENCH_MODULE ARGS... (a kvrelay.perf module)")
    args = ap.parse_args(argv)
    bench = [a for a in args.bench if a != "--"]
    if not bench:
        ap.error("give the benchmark after --, e.g. -- engine_bench --models tiny --json {json}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvrelay-base-") as tmp:
        base_tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)
        try:
            sides = {"base": _farm(base_tree, Path(tmp) / "base-pkg"), "current": _farm(ROOT, Path(tmp) / "cur-pkg")}
            results: dict[str, list[dict[str, float]]] = {"base": [], "current": []}
            for r in range(args.rounds):
                for side, farm in sides.items():
                    path, run_dir = out / f"{side}-{r}.json", out / f"{side}-{r}"
                    cmd = [sys.executable, "-m", f"kvrelay.perf.{bench[0]}",
                           *[a.replace("{json}", str(path)).replace("{dir}", str(run_dir)) for a in bench[1:]]]
                    env = {**os.environ, "PYTHONPATH": str(farm)}
                    print(f"round {r + 1}/{args.rounds} {side}: {' '.join(cmd[2:])}", flush=True)
                    to_file = any("{json}" in a or "{dir}" in a for a in bench)
                    p = subprocess.run(cmd, env=env, check=True, cwd=base_tree if side == "base" else ROOT,
                                       stdout=None if to_file else subprocess.PIPE, text=True)
                    if any("{dir}" in a for a in bench):
                        path.write_text((run_dir / "results.json").read_text())
                    elif not to_file:  # the benchmark prints its JSON last: from the first line opening it
                        path.write_text(p.stdout[p.stdout.index("\n{") + 1 if not p.stdout.startswith("{") else 0:])
                    results[side].append(_leaves(json.loads(path.read_text())))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                           capture_output=True)
    summary = {}
    for key in sorted(set(results["base"][0]) & set(results["current"][0])):
        b = statistics.median(x[key] for x in results["base"] if key in x)
        c = statistics.median(x[key] for x in results["current"] if key in x)
        summary[key] = {"base": b, "current": c, "ratio": (c / b) if b else None}
    (out / "summary.json").write_text(json.dumps({"base": args.base, "bench": bench, "rounds": args.rounds,
                                                  "metrics": summary}, indent=2))
    for key, v in summary.items():
        ratio = f"{v['ratio']:.3f}" if v["ratio"] is not None else "-"
        print(f"{key:60s} base {v['base']:12.4g}  current {v['current']:12.4g}  current/base {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

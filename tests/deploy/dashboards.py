"""The Grafana dashboards' panel queries, and the metric names they (and the alert rules) use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = REPO / "deploy" / "prometheus" / "rules" / "kvrelay.yml"
_METRIC = re.compile(r"\bkvrelay_[a-z0-9_]+")


def panels(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    d = json.loads(path.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def names_in(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def exported_names(metrics_text: str) -> set[str]:
    """Sample names a /metrics page can carry, from its `# TYPE` lines (present even before a labelled
    metric has a sample): counter -> _total, histogram -> _bucket/_sum/_count, gauge -> as is."""
    out = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        name, kind = m.groups()
        if kind == "counter":
            out |= {name + "_total" if not name.endswith("_total") else name}
        elif kind == "histogram":
            out |= {name + s for s in ("_bucket", "_sum", "_count")}
        else:
            out.add(name)
    return out


def unknown_names(exprs: list[str], exported: set[str]) -> set[str]:
    return set().union(*(names_in(e) for e in exprs)) - exported

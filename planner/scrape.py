"""Cumulative metric samples from the frontend's and the workers' /metrics, or from a Prometheus server.

A `Scrape` is one point in time: every series by name and labels, counters as totals. Two scrapes make
an `Observation` (planner/observe.py): rates and histogram quantiles come from their difference, so
both sources (direct /metrics and Prometheus' latest values of the same series) reduce the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    at: float = field(default_factory=time.monotonic)
    series: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        self.series.setdefault(name, {})[tuple(sorted(labels.items()))] = value

    def total(self, name: str, **match: str) -> float:
        """Sum of a series over every label set that has the `match` labels."""
        return sum(v for labels, v in self.series.get(name, {}).items() if _matches(labels, match))

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, v in self.series.get(name, {}).items():
            key = dict(labels).get(label)
            if key is not None:
                out[key] = out.get(key, 0.0) + v
        return out

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets (le, count), summed over label sets, ascending le."""
        acc: dict[float, float] = {}
        for labels, v in self.series.get(f"{name}_bucket", {}).items():
            le = float(dict(labels)["le"])
            acc[le] = acc.get(le, 0.0) + v
        return sorted(acc.items())

    def merge(self, other: Scrape) -> None:
        for name, rows in other.series.items():
            self.series.setdefault(name, {}).update(rows)


def _matches(labels: Labels, match: dict[str, str]) -> bool:
    d = dict(labels)
    return all(d.get(k) == v for k, v in match.items())


def parse_exposition(text: str, into: Scrape | None = None) -> Scrape:
    scrape = into if into is not None else Scrape()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            scrape.add(s.name, dict(s.labels), float(s.value))
    return scrape


async def scrape_url(client: httpx.AsyncClient, url: str, into: Scrape, api_key: str = "") -> bool:
    """Adds one /metrics endpoint's series; False (and nothing added) when it cannot be read."""
    try:
        r = await client.get(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        r.raise_for_status()
    except httpx.HTTPError:
        return False
    parse_exposition(r.text, into)
    return True


async def query_prometheus(client: httpx.AsyncClient, base_url: str, names: list[str]) -> Scrape:
    """The latest value of each series named, from a Prometheus server's HTTP API (`/api/v1/query`)."""
    scrape = Scrape()
    selector = "{__name__=~\"" + "|".join(names) + "\"}"
    r = await client.get(f"{base_url.rstrip('/')}/api/v1/query", params={"query": selector})
    r.raise_for_status()
    body = r.json()
    if body.get("status") != "success":
        raise httpx.HTTPError(f"prometheus query failed: {body.get('error', body)}")
    for row in body["data"]["result"]:
        labels = dict(row["metric"])
        name = labels.pop("__name__")
        labels.pop("job", None)
        labels.pop("instance", None)
        scrape.add(name, labels, float(row["value"][1]))
    return scrape

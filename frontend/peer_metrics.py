"""One /metrics for the HTTP processes of one frontend (`--http-workers N`, issue 19).

The N processes share a port, so a scrape reaches any one of them; each must answer for all. Every
process publishes a snapshot of its registry once per `interval` on
`kvrelay.<namespace>.frontend_metrics.<group>` (`group`: the id the processes of one frontend share,
so separate frontend replicas, each scraped on its own, are never summed together) and keeps the
latest of each peer; /metrics renders its own samples merged with the peers' fresh snapshots:
- samples with the same name and labels are summed (counters, histogram buckets/sums/counts, and
  gauges that count things in flight), except `*_created` (the earliest) and the gauges in
  `MAX_GAUGES`, which describe state every process holds a copy of (the KV index): their maximum.
- A peer silent for `stale` seconds is left out (it died; its counts go with it, as they would for a
  restarted single process).
- Fresh at scrape time: the answering process asks its peers for a snapshot now (`...frontend_metrics_pull.
  <group>`) and waits up to `pull_timeout` until `peers` of them (the group's size less one, known from
  the start; not only the peers heard from lately, which a loaded machine delays) have answered, so a
  request that completed before the scrape is counted whichever process served it; a peer that does
  not answer in time (it died, or the machine is overloaded for seconds) contributes its last snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from kvrelay.runtime.events import EventPlane, Subscription
from kvrelay.runtime.metrics import render

log = logging.getLogger(__name__)

MAX_GAUGES = frozenset({"kvrelay_router_index_blocks"})


class Sample(msgspec.Struct, array_like=True):
    name: str
    labels: dict[str, str]
    value: float


class Family(msgspec.Struct, array_like=True):
    name: str
    type: str
    documentation: str
    unit: str
    samples: list[Sample]


class MetricsSnapshot(msgspec.Struct):
    frontend_id: str
    families: list[Family]
    answers: str = ""  # the pull (nonce) this snapshot answers, if any


class MetricsPull(msgspec.Struct):
    frontend_id: str
    nonce: str


def metrics_subject(namespace: str, group: str) -> str:
    return f"kvrelay.{namespace}.frontend_metrics.{group}"


def pull_subject(namespace: str, group: str) -> str:
    return f"kvrelay.{namespace}.frontend_metrics_pull.{group}"


def snapshot(registry: CollectorRegistry) -> list[Family]:
    return [Family(m.name, m.type, m.documentation, m.unit,
                   [Sample(s.name, dict(s.labels), float(s.value)) for s in m.samples])
            for m in registry.collect()]


class _Merged:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge(snapshots: list[list[Family]]) -> bytes:
    """The text exposition of the merged snapshots (the first one's family and sample order)."""
    order: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple], float]] = {}
    for families in snapshots:
        for fam in families:
            order.setdefault(fam.name, fam)
            acc = values.setdefault(fam.name, {})
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = acc.get(key)
                if old is None:
                    acc[key] = s.value
                elif s.name.endswith("_created"):
                    acc[key] = min(old, s.value)
                elif fam.name in MAX_GAUGES:
                    acc[key] = max(old, s.value)
                else:
                    acc[key] = old + s.value
    out = []
    for name, fam in order.items():
        m = Metric(name, fam.documentation, fam.type, fam.unit)
        for (sample, labels), value in values[name].items():
            m.add_sample(sample, dict(labels), value)
        out.append(m)
    return generate_latest(_Merged(out))


class PeerMetrics:
    def __init__(self, events: EventPlane, namespace: str, group: str, frontend_id: str,
                 registry: CollectorRegistry, *, peers: int = 0, interval: float = 1.0, stale: float = 5.0,
                 pull_timeout: float = 5.0):
        self.events, self.subject = events, metrics_subject(namespace, group)
        self.pull, self.pull_timeout = pull_subject(namespace, group), pull_timeout
        self.expected = peers  # the other HTTP processes of the group
        self._waiting: dict[str, tuple[set[str], asyncio.Event, int]] = {}  # nonce -> (answered, done, wanted)
        self._pull_sub: Subscription | None = None
        self.frontend_id, self.registry, self.interval, self.stale = frontend_id, registry, interval, stale
        self._peers: dict[str, tuple[float, list[Family]]] = {}
        self._sub: Subscription | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._sub = await self.events.subscribe(self.subject)
        self._pull_sub = await self.events.subscribe(self.pull)
        self._tasks = [asyncio.create_task(self._consume(self._sub)), asyncio.create_task(self._publish_loop()),
                       asyncio.create_task(self._answer(self._pull_sub))]
        with contextlib.suppress(Exception):  # the processes already up answer: we know them at once
            await self.events.publish(self.pull, MetricsPull(self.frontend_id, "hello"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in (self._sub, self._pull_sub):
            if sub is not None:
                await sub.close()

    def peers(self) -> list[str]:
        now = time.monotonic()
        return sorted(f for f, (t, _) in self._peers.items() if now - t <= self.stale)

    async def render(self) -> bytes:
        known = self.peers()
        want = self.expected or len(known)  # answers that complete the pull
        if not want:
            return render(self.registry)
        nonce = uuid.uuid4().hex
        done = asyncio.Event()
        self._waiting[nonce] = (set(), done, want)
        try:
            await self.events.publish(self.pull, MetricsPull(self.frontend_id, nonce))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), self.pull_timeout)
        except Exception:  # the event plane is down: the last snapshots will do
            log.warning("could not pull peer metrics", exc_info=True)
        finally:
            answered, _, _ = self._waiting.pop(nonce)
        if len(answered) < want:
            log.warning("/metrics: %d of %d other HTTP processes answered within %.1f s; the others' last "
                        "snapshots are used", len(answered), want, self.pull_timeout)
        now = time.monotonic()
        fresh = [fams for t, fams in self._peers.values() if now - t <= self.stale]
        return merge([snapshot(self.registry), *fresh])

    async def _publish_loop(self) -> None:
        while True:
            try:
                await self.events.publish(self.subject, MetricsSnapshot(self.frontend_id, snapshot(self.registry)))
            except Exception:
                log.warning("could not publish frontend metrics", exc_info=True)
            await asyncio.sleep(self.interval)

    async def _consume(self, sub: Subscription) -> None:
        async for msg in sub:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                snap = msg.decode(MetricsSnapshot)
                if snap.frontend_id != self.frontend_id:
                    self._peers[snap.frontend_id] = (time.monotonic(), snap.families)
                    waiting = self._waiting.get(snap.answers)
                    if waiting is not None:
                        answered, done, want = waiting
                        answered.add(snap.frontend_id)
                        if len(answered) >= want:
                            done.set()

    async def _answer(self, sub: Subscription) -> None:
        async for msg in sub:
            try:
                pull = msg.decode(MetricsPull)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if pull.frontend_id != self.frontend_id:
                with contextlib.suppress(Exception):
                    await self.events.publish(self.subject, MetricsSnapshot(
                        self.frontend_id, snapshot(self.registry), answers=pull.nonce))

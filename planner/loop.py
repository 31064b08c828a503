"""The planner loop: every interval observe, decide, and hand the decision to the connector.

Invariants:
- One scale in flight at a time. While it is not ready, the loop keeps observing but does not decide
  again; once `scale_timeout` passes it reports the timeout (log, metric, status) and plans again from
  the counts that *are* ready: never "in progress" forever (Dynamo #14251, #12428).
- A connector error is reported the same way and the loop carries on.
- `dry_run`: decisions are made, logged and shown in status, never sent to the connector.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from kvrelay.planner.connectors.base import Connector, ScaleError
from kvrelay.planner.metrics import PlannerMetrics
from kvrelay.planner.observation import Observation, Pool
from kvrelay.planner.policy import Policy

log = logging.getLogger("kvrelay.planner")

HISTORY = 50  # decisions kept for `status`


class ObservationSource(Protocol):
    async def next(self) -> Observation | None: ...


@dataclass
class Pending:
    target: dict[Pool, int]
    since: float


class Planner:
    def __init__(self, observer: ObservationSource, connector: Connector, policy: Policy, metrics: PlannerMetrics,
                 interval: float = 5.0, scale_timeout: float = 120.0, dry_run: bool = False,
                 clock=time.monotonic):
        self.observer, self.connector, self.policy, self.metrics = observer, connector, policy, metrics
        self.interval, self.scale_timeout, self.dry_run, self.clock = interval, scale_timeout, dry_run, clock
        self.pending: Pending | None = None
        self.ready: dict[Pool, int] = {p: 0 for p in Pool}
        self.desired: dict[Pool, int] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.intervals = 0

    def _record(self, event: str, **fields: Any) -> None:
        entry = {"interval": self.intervals, "time": time.time(), "event": event, **fields}
        self.history.append(entry)
        log.info("planner: %s %s", event, {k: v for k, v in fields.items() if k != "observation"})

    async def step(self) -> None:
        self.intervals += 1
        self.metrics.intervals.inc()
        obs = await self.observer.next()
        self.ready = await self.connector.ready()
        for pool, n in self.ready.items():
            self.metrics.ready.labels(pool.value).set(n)
        if obs is not None:
            self.metrics.observed_rate.set(obs.request_rate)
            self.metrics.ttft_p90.set(obs.ttft_p90 or 0.0)
            self.metrics.itl_p90.set(obs.itl_p90 or 0.0)
        if self.pending is not None:
            if all(self.ready.get(p, 0) == n for p, n in self.pending.target.items()):
                self._record("scale ready", counts=_named(self.ready))
                self.pending = None
            elif self.clock() - self.pending.since > self.scale_timeout:
                late = [p for p, n in self.pending.target.items() if self.ready.get(p, 0) != n]
                for p in late:
                    self.metrics.scale_timeouts.labels(p.value).inc()
                self._record("scale timed out", target=_named(self.pending.target), ready=_named(self.ready),
                             pools=[p.value for p in late])
                self.pending = None
            else:
                return  # a scale is in flight: its new workers are not in the observation yet
        decision = self.policy.decide(obs, self.ready)
        self.desired = dict(decision.counts)
        for pool, n in decision.counts.items():
            self.metrics.desired.labels(pool.value).set(n)
            if n != self.ready.get(pool, 0):
                self.metrics.decisions.labels(pool.value, "up" if n > self.ready.get(pool, 0) else "down").inc()
        if decision.counts == {p: self.ready.get(p, 0) for p in decision.counts}:
            return
        self._record("decision" + (" (dry run)" if self.dry_run else ""), ready=_named(self.ready),
                     desired=_named(decision.counts), reasons={p.value: r for p, r in decision.reasons.items()})
        if self.dry_run:
            return
        try:
            await self.connector.scale(decision.counts)
        except ScaleError as e:
            self.metrics.scale_errors.inc()
            self._record("scale failed", error=str(e))
            return
        self.pending = Pending(dict(decision.counts), self.clock())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = self.clock()
            try:
                await self.step()
            except Exception:  # a planner bug must not take the deployment down with it
                log.exception("planner: interval failed")
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, self.interval - (self.clock() - started)))
            except asyncio.TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        return {"policy": self.policy.kind.value, "connector": self.connector.kind, "dry_run": self.dry_run,
                "interval_s": self.interval, "intervals": self.intervals, "ready": _named(self.ready),
                "registered": _named(getattr(self.observer, "registered", {})),  # in discovery (Observer)
                "desired": _named(self.desired),
                "pending": None if self.pending is None else _named(self.pending.target),
                "settings": self.policy.settings(), "history": list(self.history)[-10:]}


def _named(counts: dict[Pool, int]) -> dict[str, int]:
    return {p.value: n for p, n in counts.items()}

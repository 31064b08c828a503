"""Test doubles for the planner loop: scripted observations and a connector whose workers become ready
after a delay, or never (Pending)."""

from __future__ import annotations

from kvrelay.planner.observation import Observation, Pool


class ScriptedObserver:
    def __init__(self, observations: list[Observation | None]):
        self.observations = list(observations)

    async def next(self) -> Observation | None:
        return self.observations.pop(0) if len(self.observations) > 1 else self.observations[0]


class FakeConnector:
    """`ready_after` intervals after a scale the counts are met, except beyond `schedulable` workers of a
    pool: those stay Pending forever."""

    kind = "fake"

    def __init__(self, initial: dict[Pool, int], ready_after: int = 1, schedulable: int = 100, fail: bool = False):
        self.counts, self.target = dict(initial), dict(initial)
        self.ready_after, self.schedulable, self.fail = ready_after, schedulable, fail
        self.calls: list[dict[Pool, int]] = []
        self._ticks = 0

    async def ready(self) -> dict[Pool, int]:
        self._ticks += 1
        if self._ticks >= self.ready_after:
            self.counts = {p: min(n, self.schedulable) for p, n in self.target.items()}
        return dict(self.counts)

    async def scale(self, target: dict[Pool, int]) -> None:
        from kvrelay.planner.connectors.base import ScaleError

        if self.fail:
            raise ScaleError("over quota")
        self.calls.append(dict(target))
        self.target, self._ticks = dict(target), 0

    async def close(self) -> None:
        pass

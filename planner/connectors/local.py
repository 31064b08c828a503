"""`local`: worker processes on this machine, through the fleet that owns them (runtime/fleet.py) — the
embedded shape of `kvrelay serve --planner`.

The connector only maps the planner's pools onto the fleet's kinds of worker (`roles`: the prefill pool
is prefill workers; the decode pool is decode workers, or aggregated ones when nothing is disaggregated).
What a start, a drain, a crash or a scale-down does is the fleet's rule, the same as without a planner.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Generic, TypeVar

from kvrelay.planner.observation import Pool
from kvrelay.runtime.fleet import Fleet

K = TypeVar("K", bound=Hashable)


class LocalConnector(Generic[K]):
    kind = "local"

    def __init__(self, fleet: Fleet[K], roles: Mapping[Pool, K]):
        self.fleet, self.roles = fleet, dict(roles)

    async def ready(self) -> dict[Pool, int]:
        counts = self.fleet.ready()
        return {pool: counts.get(role, 0) for pool, role in self.roles.items()}

    async def scale(self, target: dict[Pool, int]) -> None:
        await self.fleet.scale({self.roles[pool]: n for pool, n in target.items()})

    async def close(self) -> None:
        """Nothing: the fleet's owner (`kvrelay serve`) stops the workers, planner or not."""

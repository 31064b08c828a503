"""The connector protocol: how the planner reads and sets the pools' sizes.

`scale(target)` asks for the counts and returns without waiting; `ready()` says how many workers of
each pool are serving now. The planner loop (planner/loop.py), not the connector, decides how long a
scale may stay unready before it is reported as timed out, so a Pending pod or a lost acknowledgement
never leaves the planner "in progress" forever (Dynamo #14251, #12428).
"""

from __future__ import annotations

from typing import Protocol

from kvrelay.planner.observation import Pool


class ScaleError(RuntimeError):
    """A scale request the backing system refused (reported; the planner carries on)."""


class Connector(Protocol):
    kind: str

    async def ready(self) -> dict[Pool, int]:
        """Workers of each pool that are serving now."""

    async def scale(self, target: dict[Pool, int]) -> None:
        """Ask for `target` workers per pool; returns once the request is made, not when it is met."""

    async def close(self) -> None:
        """Release what the connector holds (the local connector stops the workers it started)."""

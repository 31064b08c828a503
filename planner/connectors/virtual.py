"""`virtual`: the decision is published in discovery for an external system to act on.

The planner writes `kvrelay/<namespace>/planner/decision` = `VirtualDecision{seq, counts}`; the system
that owns the workers answers by writing `kvrelay/<namespace>/planner/ack` = `VirtualAck{seq, counts}`
(the counts it now runs). `ready()` is the last acknowledgement's counts; before the first one (and
without `initial` counts) it is the workers registered in discovery, per pool (issue 30: it said 0 and
0 with a prefill and a decode worker registered). A decision without an acknowledgement is a scale that
never becomes ready, which the planner loop times out and reports.
"""

from __future__ import annotations

import msgspec

from kvrelay.planner.observation import Pool
from kvrelay.planner.observe import registered_counts
from kvrelay.runtime.discovery import Discovery
from kvrelay.runtime.wire import decode, encode


class VirtualDecision(msgspec.Struct, frozen=True):
    seq: int
    counts: dict[str, int]


class VirtualAck(msgspec.Struct, frozen=True):
    seq: int
    counts: dict[str, int]


def decision_key(namespace: str) -> str:
    return f"kvrelay/{namespace}/planner/decision"


def ack_key(namespace: str) -> str:
    return f"kvrelay/{namespace}/planner/ack"


class VirtualConnector:
    kind = "virtual"

    def __init__(self, discovery: Discovery, namespace: str, initial: dict[Pool, int] | None = None):
        self.discovery, self.namespace = discovery, namespace
        self.seq = 0
        self.acked: dict[Pool, int] | None = dict(initial) if initial is not None else None

    async def ready(self) -> dict[Pool, int]:
        found = await self.discovery.list(ack_key(self.namespace))
        raw = found.get(ack_key(self.namespace))
        if raw is not None:
            try:
                ack = decode(raw, VirtualAck)
            except (msgspec.DecodeError, msgspec.ValidationError):
                ack = None  # a garbled ack changes nothing
            if ack is not None:
                self.acked = {p: int(ack.counts.get(p.value, (self.acked or {}).get(p, 0))) for p in Pool}
        if self.acked is None:  # the owner has said nothing yet: what runs is what is registered
            return await registered_counts(self.discovery, self.namespace)
        return dict(self.acked)

    async def scale(self, target: dict[Pool, int]) -> None:
        self.seq += 1
        await self.discovery.register(decision_key(self.namespace),
                                      encode(VirtualDecision(self.seq, {p.value: n for p, n in target.items()})))

    async def close(self) -> None:
        await self.discovery.deregister(decision_key(self.namespace))

"""The pull budget of one worker (the cluster KV pool): how many peer asks and pulls may be in flight, and
how many bytes of blocks they may bring at once (`--kv-peer-max-pulls`, `--kv-peer-max-bytes`).

Why refuse instead of queue: a request over budget is computed at once (its prefill is at worst what
it would cost with no pool) rather than waiting behind other pulls for a time nobody bounds, and no
lender pins blocks for an ask that would wait. The budget is taken when the ask goes out, for every
block asked, and given back when its pull ends or its lease goes back unpulled (peer_loop.py).

Invariant: `in_flight <= max_pulls` and `bytes <= max_bytes`, except that one ask is always allowed
when nothing is in flight (a single prefix larger than the byte budget still pulls, alone).
"""

from __future__ import annotations


class PullBudget:
    def __init__(self, max_pulls: int, max_bytes: int):
        self.max_pulls, self.max_bytes = max_pulls, max_bytes
        self._held: dict[str, int] = {}  # request id -> bytes it holds
        self.bytes = 0
        self.refusals = 0  # cumulative: asks refused

    @property
    def in_flight(self) -> int:
        return len(self._held)

    def take(self, request_id: str, nbytes: int) -> bool:
        """Reserve for `request_id`'s ask and pull; False (counted) if that would pass a bound."""
        if request_id in self._held:
            return True
        if self._held and (len(self._held) >= self.max_pulls or self.bytes + nbytes > self.max_bytes):
            self.refusals += 1
            return False
        if self.max_pulls <= 0:
            self.refusals += 1
            return False
        self._held[request_id] = nbytes
        self.bytes += nbytes
        return True

    def give(self, request_id: str) -> None:
        """The ask found nothing, or the pull ended, or its lease went back: free the reservation."""
        self.bytes -= self._held.pop(request_id, 0)

"""Leases that wait for a prefill in progress (the cluster KV pool under a burst).

A peer asks this worker to lend a prefix that a request running here is computing right now: the router
counts a routed prompt's blocks as held from the moment it routes it (speculative entries), so at a burst
of requests sharing a new prefix (a system prompt every conversation starts with) the first request's
worker is named the holder before it has computed anything. Answered at once, the lease lends the few
blocks computed so far and the peer recomputes the rest beside it: every worker computed the shared
prefix once (issue 27: at 16 workers that was 0.03 of all prompt tokens, the whole gap to the oracle).
Instead a lease waits while a sequence here is about to fill the next block of the asked run (its prefill
is stepping, or it is itself pulling or loading that prefix), until G1 holds the run, no such sequence
extends it, or `LEND_WAIT_S` passes; then it pins what G1 holds, exactly as an immediate lease does
(block_leases.py).

Invariants: every `Lease` command is resolved exactly once (at once, when settled, or with [] when
cancelled or the engine stops); a waiting lease pins nothing; a lease never waits on a queued sequence
(WAITING), and never past `LEND_WAIT_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvrelay.workers.core.commands import Lease
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.kv_sources.peer import LEND_WAIT_S
from kvrelay.workers.core.sequence import Status
from kvrelay.workers.core.streams import resolve

# A sequence in these states will have its blocks' KV soon: its prefill is stepping (RUNNING), or KV from
# elsewhere is arriving or has arrived (itself pulling the prefix from a peer, or loading it from a tier).
# Never WAITING: that is a queue, and the asker would do better to compute.
_FILLING = frozenset({Status.RUNNING, Status.WAITING_FOR_KV, Status.READY})


def _answer(cmd: Lease, block_ids: list[int]) -> None:
    cmd.future.get_loop().call_soon_threadsafe(resolve, cmd.future, block_ids)


class LeaseWaits:
    def __init__(self, core: EngineCore, clock: Callable[[], float] = time.monotonic,
                 max_wait_s: float = LEND_WAIT_S):
        self.core, self.clock, self.max_wait_s = core, clock, max_wait_s
        self._waiting: dict[str, tuple[Lease, float]] = {}  # lease id -> (command, deadline)
        self.waited = 0  # cumulative: leases that waited for a prefill in progress

    def ask(self, cmd: Lease) -> None:
        if self.max_wait_s > 0 and cmd.lease_id not in self._waiting and self._computing_next(cmd.hashes):
            self._waiting[cmd.lease_id] = (cmd, self.clock() + self.max_wait_s)
            self.waited += 1
        else:
            self._lend(cmd)

    def settle(self) -> None:
        """After a step: lend what each waiting lease can have now, where waiting no longer pays."""
        if not self._waiting:
            return
        now = self.clock()
        for lease_id, (cmd, deadline) in list(self._waiting.items()):
            if now >= deadline or not self._computing_next(cmd.hashes):
                del self._waiting[lease_id]
                self._lend(cmd)

    def cancel(self, lease_id: str) -> bool:
        """The asker gave up before the lease was answered: answer nothing, pin nothing."""
        waiting = self._waiting.pop(lease_id, None)
        if waiting is None:
            return False
        _answer(waiting[0], [])
        return True

    def cancel_all(self) -> None:
        for lease_id in list(self._waiting):
            self.cancel(lease_id)

    def _lend(self, cmd: Lease) -> None:
        _answer(cmd, self.core.leases.lease(cmd.lease_id, cmd.hashes))

    def _computing_next(self, hashes: list[int]) -> bool:
        """Whether a sequence here will fill the first block of `hashes` that G1 lacks. Block
        hashes are chained, so equal hashes at one index mean equal prefixes up to it."""
        have = len(self.core.kv.lookup(hashes))
        if have >= len(hashes):
            return False
        want, end = hashes[have], (have + 1) * self.core.block_size
        return any(seq.status in _FILLING and len(seq.hasher.hashes) > have
                   and seq.hasher.hashes[have] == want and seq.num_computed < end
                   for seq in self.core.seqs.values())

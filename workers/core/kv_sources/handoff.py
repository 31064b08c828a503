"""The prefill -> decode handoff as a KV source (core half): a request that brings a prefill worker's
`KvHandle` continues from the handle's first token, and its prompt's blocks that G1 does not hold are
pulled (`PullJob`, run by handoff_loop.py) instead of computed. docs/ARCHITECTURE.md "Disaggregation".

Invariants: a handle is used only if it describes exactly this sequence's prompt under this engine's
model fingerprint and block size; anything else is recomputed (a wrong pull is never possible: at worst
a handle is ignored). Every handle's lease is given back exactly once: by its pull (whose notification
frees it) or, when nothing is pulled, by a `PullJob` with no blocks (`report=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvrelay.workers.api.messages import EngineRequest, KvHandle
from kvrelay.workers.core.commands import Command, KvLoaded
from kvrelay.workers.core.kv_sources.source import NO_MATCH, Match
from kvrelay.workers.core.sequence import Sequence

NAME = "handoff"


@dataclass(frozen=True)
class PullJob:
    """Pull `handle.block_ids[start:]` into `local_block_ids`; `report`: tell the core (a KvLoaded).
    `source`: the source whose loop half runs it (the handoff's, or the peer pool's: peer.py)."""

    request_id: str
    handle: KvHandle
    local_block_ids: list[int]
    start: int
    report: bool = True
    source: str = NAME

    def failed(self) -> Command | None:
        """The report if the job cannot run at all."""
        return KvLoaded(self.source, self.request_id, [False] * len(self.local_block_ids)) if self.report else None


@dataclass
class HandoffCounters:
    remote_prefills: int = 0  # requests that came with a handle
    pulled_blocks: int = 0
    pull_failures: int = 0  # handles recomputed instead (no blocks, unusable handle, failed pull)


class HandoffSource:
    name = NAME

    def __init__(self, block_size: int, fingerprint: str):
        self.block_size, self.fingerprint = block_size, fingerprint
        self.handles: dict[str, KvHandle] = {}  # usable handles not pulled yet
        self.stats = HandoffCounters()
        self._jobs: list[PullJob] = []

    def add(self, seq: Sequence, request: EngineRequest, hint: Any) -> None:
        handle = request.kv_handle
        if handle is None:
            return
        self.stats.remote_prefills += 1
        seq.continue_from(handle.first_token)
        usable = (handle.fingerprint == self.fingerprint and handle.num_tokens == len(seq.prompt)
                  and len(handle.block_ids) == -(-handle.num_tokens // self.block_size))
        if usable:
            self.handles[seq.request_id] = handle
        else:
            self._give_back(seq.request_id, handle, failure=True)

    def match(self, seq: Sequence, local_blocks: int) -> Match | None:
        handle = self.handles.get(seq.request_id)
        if handle is None:
            return NO_MATCH
        missing = len(seq.prompt) - local_blocks * self.block_size
        if missing <= 0:  # G1 holds the whole prompt: nothing to pull
            self._give_back(seq.request_id, self.handles.pop(seq.request_id), failure=False)
            return NO_MATCH
        return Match(missing, counts_as_cached=False)

    def allocated(self, seq: Sequence, fresh: list[int] | None) -> None:
        handle = self.handles.pop(seq.request_id)
        if fresh is None:  # blocks are short: recompute
            self._give_back(seq.request_id, handle, failure=True)
            return
        self._jobs.append(PullJob(seq.request_id, handle, [seq.blocks[i].block_id for i in fresh], fresh[0]))

    def arrived(self, seq: Sequence, fresh: list[int], kept: int) -> None:
        if kept > fresh[-1]:
            self.stats.pulled_blocks += len(fresh)
        else:
            self.stats.pull_failures += 1

    def answered(self, request_id: str, answer: Any) -> None:
        pass

    def preempted(self, seq: Sequence, computed_blocks: int) -> None:
        pass

    def finished(self, request_id: str) -> None:
        handle = self.handles.pop(request_id, None)
        if handle is not None:
            self._give_back(request_id, handle, failure=False)

    def saved(self, block_ids: list[int]) -> None:
        pass

    def _give_back(self, request_id: str, handle: KvHandle, failure: bool) -> None:
        """Pull nothing: the job only frees the prefill worker's lease."""
        self.stats.pull_failures += failure
        self._jobs.append(PullJob(request_id, handle, [], len(handle.block_ids), report=False))

    def take_jobs(self) -> list[Any]:
        jobs, self._jobs = self._jobs, []
        return jobs

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        pass

    def counters(self) -> dict[str, int]:
        s = self.stats
        return {"remote_prefills": s.remote_prefills, "pulled_blocks": s.pulled_blocks,
                "pull_failures": s.pull_failures}

    def close(self) -> None:
        pass

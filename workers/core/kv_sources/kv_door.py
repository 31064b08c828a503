"""`KvDoor`: the scheduler's one way to KV that this engine's steps did not compute. It asks its
sources in order (the handoff first: a request that brings a prefill worker's KV takes nothing else)
and routes each report to the source that asked for it.

Invariants: a sequence has at most one load in flight, from one source (`_loading`); every
`allocated(seq, fresh)` with blocks is answered by exactly one `arrived` for that sequence, unless it
ended first (then its blocks are freed when the source reports, engine_core.py `loading_aborted`).
"""

from __future__ import annotations

from typing import Any

from kvrelay.workers.api.messages import EngineRequest
from kvrelay.workers.core.kv_sources.source import NO_MATCH, KvSource, Match
from kvrelay.workers.core.sequence import Sequence


class KvDoor:
    def __init__(self) -> None:
        self.sources: list[KvSource] = []
        self._matched: dict[str, KvSource] = {}  # the source of each sequence's last match
        self._loading: dict[str, KvSource] = {}  # request id -> the source filling its blocks

    def add_source(self, source: KvSource) -> None:
        if any(s.name == source.name for s in self.sources):
            raise ValueError(f"KV source {source.name!r} is already open")
        self.sources.append(source)

    def source(self, name: str) -> KvSource | None:
        return next((s for s in self.sources if s.name == name), None)

    # -- what the scheduler asks ------------------------------------------------------------------------
    def add(self, seq: Sequence, request: EngineRequest, hints: dict[str, Any]) -> None:
        for s in self.sources:
            s.add(seq, request, hints.get(s.name))

    def match(self, seq: Sequence, local_blocks: int) -> Match | None:
        """The first source that can supply tokens after G1's hit (None: one is still looking)."""
        for s in self.sources:
            m = s.match(seq, local_blocks)
            if m is None:
                return None
            if m.num_tokens > 0:
                self._matched[seq.request_id] = s
                return m
        return NO_MATCH

    def allocated(self, seq: Sequence, fresh: list[int] | None) -> None:
        source = self._matched.pop(seq.request_id)
        if fresh is not None:
            self._loading[seq.request_id] = source
        source.allocated(seq, fresh)

    def preempted(self, seq: Sequence, computed_blocks: int) -> None:
        for s in self.sources:
            s.preempted(seq, computed_blocks)

    # -- what the sources' loop halves report (through the core) ----------------------------------------
    def arrived(self, seq: Sequence, fresh: list[int], kept: int) -> None:
        source = self._loading.pop(seq.request_id, None)
        if source is not None:
            source.arrived(seq, fresh, kept)

    def answered(self, source: str, request_id: str, answer: Any) -> None:
        s = self.source(source)
        if s is not None:
            s.answered(request_id, answer)

    def saved(self, source: str, block_ids: list[int]) -> None:
        s = self.source(source)
        if s is not None:
            s.saved(block_ids)

    def finished(self, request_id: str) -> None:
        """The request ended. A load still in flight keeps its record until the source reports."""
        self._matched.pop(request_id, None)
        for s in self.sources:
            s.finished(request_id)

    def dropped(self, request_id: str) -> None:
        """An ended request's load reported: forget it."""
        self._loading.pop(request_id, None)

    # -- around each step -------------------------------------------------------------------------------
    def take_jobs(self) -> list[Any]:
        return [job for s in self.sources for job in s.take_jobs()]

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        for s in self.sources:
            s.observe_step(prefill_tokens, seconds)

    def counters(self) -> dict[str, int]:
        """The sources' counters, by `EngineStats` field name."""
        out: dict[str, int] = {}
        for s in self.sources:
            out.update(s.counters())
        return out

    def close(self) -> None:
        for s in self.sources:
            s.close()

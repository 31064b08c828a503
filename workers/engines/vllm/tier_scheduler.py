"""The scheduler half of kvrelay's tier connector under vLLM: which prompt blocks to load from G2/G3/G4,
and which newly computed blocks to save (tier_connector.py calls it; no vLLM import here).

Block identity is kvrelay's (docs/ARCHITECTURE.md "Block identity"): each request's hashes are computed from its
tokens, its cache salt and its LoRA name, chained from the engine's fingerprint. So a block stored by
one vLLM worker is found by another, and by the same worker after a restart (vLLM's own hashes are
per process and leave the model out).

Per step, vLLM asks, in this order:
1. `matched(req, num_computed)` for a request it is about to admit (also again, if admission failed):
   the worker process answers which of the blocks after vLLM's own hits to load (tier_lookup.py: the
   tiers and the cost model live there); until it answers, the request waits (`None`).
2. `allocated(req_id, block_ids, num_external)`: vLLM's blocks for those tokens -> a `LoadJob`.
3. `step(...)`: this step's loads, and a `SaveJob` for every block that becomes full and computed in
   this step (write-through: saved once, when computed; a block any tier holds is skipped by the
   worker half).

Invariants: a load job names exactly the blocks vLLM reserved for the external tokens it was told
about; a block is offered for saving at most once per request, and only once all its tokens are known
(with async scheduling a just-sampled token may not be in `all_token_ids` yet: its block waits a step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.workers.engines.vllm.tier_lookup import LookupClient

log = logging.getLogger("kvrelay.vllm.tiers")
LOOKUP_WAIT_S = 0.005  # how long `matched` waits for a lookup before asking vLLM to come back later


@dataclass(frozen=True)
class LoadJob:
    req_id: str
    hashes: list[int]
    tiers: list[str]
    block_ids: list[int]  # vLLM's blocks, one per hash


@dataclass(frozen=True)
class SaveJob:
    hashes: list[int]
    block_ids: list[int]


@dataclass
class _Request:
    hasher: BlockHasher
    fed: int = 0  # tokens fed to the hasher
    saved: int | None = None  # blocks below this index are saved or were there already
    lookup: str | None = None  # the key of the lookup asked and not yet answered
    lookup_local: int = 0  # vLLM's own hit (blocks) when the lookup was asked
    asked: int = 0  # lookups asked (keys are req_id#n)
    plan: tuple[int, list[int], list[str]] | None = None  # (first block, hashes, tiers) offered to vLLM
    loaded_from: dict[str, int] = field(default_factory=dict)  # tier -> tokens of the last load planned

    def hashes(self, tokens: Sequence[int], blocks: int, block_size: int) -> list[int]:
        """The first `blocks` block hashes (fewer if fewer tokens are known)."""
        upto = min(blocks * block_size, len(tokens))
        if upto > self.fed:
            self.hasher.extend(tokens[self.fed:upto])
            self.fed = upto
        return self.hasher.hashes[:blocks]


class TierScheduler:
    def __init__(self, block_size: int, fingerprint: str, lookups: LookupClient):
        self.block_size, self.fingerprint, self.lookups = block_size, fingerprint, lookups
        self.reqs: dict[str, _Request] = {}
        self.live: dict[str, Any] = {}  # req_id -> vLLM's Request, from admission to finish
        self._loads: list[LoadJob] = []

    def _state(self, req_id: str, salt: str, lora: str) -> _Request:
        st = self.reqs.get(req_id)
        if st is None:
            st = self.reqs[req_id] = _Request(BlockHasher(self.block_size, root_hash(self.fingerprint, salt),
                                                          lora.encode()))
        return st

    def matched(self, req_id: str, prompt: Sequence[int], salt: str, lora: str,
                num_computed: int) -> tuple[int | None, bool]:
        """prompt: every token vLLM would compute (a preempted request's outputs included)."""
        st = self._state(req_id, salt, lora)
        bs = self.block_size
        local = num_computed // bs
        loadable = (len(prompt) - 1) // bs  # vLLM computes at least the last token
        if loadable <= local:
            return 0, False
        hashes = st.hashes(prompt, loadable, bs)
        if st.lookup is None or st.lookup_local > local:  # first ask, or vLLM lost some of its hit since
            if st.lookup is not None:
                self.lookups.forget(st.lookup)
            st.asked += 1
            st.lookup, st.lookup_local = f"{req_id}#{st.asked}", local
            self.lookups.ask(st.lookup, hashes, local)
        run = self.lookups.result(st.lookup, LOOKUP_WAIT_S)
        if run is None:
            return None, False  # vLLM asks again next step (G4's HEADs take a round trip)
        first = st.lookup_local
        cut = max(0, first + len(run) - local)  # blocks past vLLM's hit now (it may have grown)
        run = run[len(run) - cut:] if cut else []
        st.lookup = None
        if not run:
            st.plan = None
            return 0, False
        st.plan = (local, hashes[local:local + len(run)], run)
        return len(run) * bs, True

    def allocated(self, req_id: str, block_ids: Sequence[int], num_external: int) -> None:
        st = self.reqs.get(req_id)
        if st is None or st.plan is None or num_external <= 0:
            if st is not None and num_external <= 0:
                st.plan = None
            return
        first, hashes, tiers = st.plan
        n = min(len(hashes), num_external // self.block_size)
        self._loads.append(LoadJob(req_id, hashes[:n], tiers[:n], list(block_ids[first:first + n])))
        st.loaded_from = {}
        for t in tiers[:n]:
            st.loaded_from[t] = st.loaded_from.get(t, 0) + self.block_size
        st.plan = None

    def step(self, scheduled: Sequence[tuple[str, int, int, Sequence[int], Callable[[], Sequence[int]]]]) -> tuple[
            list[LoadJob], list[SaveJob]]:
        """scheduled: (req_id, tokens computed before this step, tokens it computes, all known token
        ids, a function giving vLLM's block ids) per request in this step (the ids are asked for only
        when a block is to be saved: most steps are decode steps that fill none)."""
        loads, self._loads = self._loads, []
        saves: list[SaveJob] = []
        bs = self.block_size
        for req_id, computed, scheduled_tokens, tokens, get_block_ids in scheduled:
            st = self.reqs.get(req_id)
            if st is None:
                continue
            if st.saved is None:
                st.saved = computed // bs  # vLLM's own hits and loaded blocks: already somewhere
            full = min((computed + scheduled_tokens) // bs, len(tokens) // bs)
            if full <= st.saved:
                continue
            block_ids = get_block_ids()
            full = min(full, len(block_ids))
            hashes = st.hashes(tokens, full, bs)
            saves.append(SaveJob(hashes[st.saved:full], list(block_ids[st.saved:full])))
            st.saved = full
        return loads, saves

    def hit_sources(self, req_id: str) -> dict[str, int]:
        st = self.reqs.get(req_id)
        return dict(st.loaded_from) if st is not None else {}

    def finished(self, req_id: str) -> None:
        self.live.pop(req_id, None)
        st = self.reqs.pop(req_id, None)
        if st is not None and st.lookup is not None:
            self.lookups.forget(st.lookup)

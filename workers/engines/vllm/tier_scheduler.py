"""The scheduler half of kvrelay's tier connector under vLLM: vLLM's scheduler calls mapped onto the one
tier source every engine uses (workers/core/kv_sources/tiers.py `TierSource`: which blocks to load, from
which tier), plus the write-through saves vLLM's connector API asks for (tier_connector.py calls it; no
vLLM import here).

Block identity is kvrelay's (docs/ARCHITECTURE.md "Block identity"): each request's hashes are computed from its
tokens, its cache salt and its LoRA name, chained from the engine's fingerprint. So a block stored by
one vLLM worker is found by another, and by the same worker after a restart (vLLM's own hashes are
per process and leave the model out).

Per step, vLLM asks, in this order:
1. `matched(req, num_computed)` -> `TierSource.match`: for a request it is about to admit (again, if
   admission failed). The source's `TierLookup` goes to the worker process (tier_lookup.py: the tiers
   and the cost model live there); until it answers the request waits (`None`) and the answer comes
   back as `TierSource.answered`.
2. `allocated(req_id, block_ids, num_external)` -> `TierSource.allocated`: a `TierLoad` into vLLM's blocks.
3. `step(...)`: this step's loads, and a `TierSave` for every block that becomes full and computed in
   this step (write-through: saved once, when computed; a block any tier holds is skipped by the
   worker half).

Invariants: a load names exactly the blocks vLLM reserved for the external tokens it was told about; a
block is offered for saving at most once per request, and only once all its tokens are known (with
async scheduling a just-sampled token may not be in `all_token_ids` yet: its block waits a step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.workers.api.messages import KvHandle
from kvrelay.workers.core.kv_sources.source import Match
from kvrelay.workers.core.kv_sources.tiers import TierLoad, TierLookup, TierSave, TierSource
from kvrelay.workers.engines.vllm.peer_pool import PEER_TIER, PeerRead
from kvrelay.workers.engines.vllm.tier_lookup import LookupClient

log = logging.getLogger("kvrelay.vllm.tiers")
LOOKUP_WAIT_S = 0.005  # how long `matched` waits for a lookup before asking vLLM to come back later


@dataclass(frozen=True)
class _Block:
    block_id: int


@dataclass
class _Request:
    """A vLLM request as the tier source reads it (`TierSeq`), and what its saves have reached."""

    request_id: str
    hasher: BlockHasher
    num_tokens: int = 0
    blocks: list[_Block] = field(default_factory=list)
    admitted: bool = False  # it was admitted before (vLLM asking again means it was preempted)
    running: bool = False  # admitted and not asked about since
    fed: int = 0  # tokens fed to the hasher
    saved: int | None = None  # blocks below this index are saved or were there already

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
        # The cost model lives with the tiers in the worker process: answers come cut by it.
        self.source = TierSource(block_size, cost=None, ask_first=True)
        self.reqs: dict[str, _Request] = {}
        self.live: dict[str, Any] = {}  # req_id -> vLLM's Request, from admission to finish
        self._loads: list[TierLoad] = []
        self._hit_sources: dict[str, dict[str, int]] = {}
        # req_id -> its leased peer (the cluster KV pool); None once a load has read it (the lender gives
        # the rows back after one read: a preempted request asking again must not read them twice)
        self.peers: dict[str, tuple[KvHandle, float] | None] = {}
        self._reads: dict[str, PeerRead] = {}  # this step's loads' peer blocks, by request

    def _state(self, req_id: str, salt: str, lora: str) -> _Request:
        st = self.reqs.get(req_id)
        if st is None:
            hasher = BlockHasher(self.block_size, root_hash(self.fingerprint, salt), lora.encode())
            st = self.reqs[req_id] = _Request(req_id, hasher)
        return st

    def matched(self, req_id: str, prompt: Sequence[int], salt: str, lora: str,
                num_computed: int, peer: tuple[KvHandle, float] | None = None) -> tuple[int | None, bool]:
        """prompt: every token vLLM would compute (a preempted request's outputs included). peer: the
        request's leased peer (its handle and read deadline; peer_pool.py): blocks no local tier holds
        are planned from it."""
        if req_id not in self.peers:  # the first time vLLM asks; a lease is read at most once (below)
            self.peers[req_id] = peer if peer is not None and peer[0].fingerprint == self.fingerprint else None
        st = self._state(req_id, salt, lora)
        local = num_computed // self.block_size
        if st.running:  # preempted: the blocks it had saved may be in a tier while vLLM lost them
            st.running = False
            self.source.preempted(st, st.saved or 0)
        st.num_tokens = len(prompt)
        st.hashes(prompt, (len(prompt) - 1) // self.block_size, self.block_size)
        m = self._match(st, local)
        if m is None:
            answer = self.lookups.result(req_id, LOOKUP_WAIT_S)
            if answer is None:
                return None, False  # vLLM asks again next step (G4's HEADs take a round trip)
            self.source.answered(req_id, answer)
            m = self._match(st, local)
        return (None, False) if m is None else (m.num_tokens, m.num_tokens > 0)

    def _match(self, st: _Request, local: int) -> Match | None:
        m = self.source.match(st, local)
        self._route()
        return m

    def allocated(self, req_id: str, block_ids: Sequence[int], num_external: int) -> None:
        st = self.reqs.get(req_id)
        if st is None:
            return
        n = num_external // self.block_size
        plan = self.source.plans.get(req_id)
        st.admitted = st.running = True
        if n <= 0 or plan is None:
            self.source.allocated(st, None)  # vLLM loads nothing for it
            return
        st.blocks = [_Block(b) for b in block_ids]  # vLLM's blocks of the request, from its first
        fresh = [i for i, tier in enumerate(plan) if tier is not None][:n]  # after vLLM's own hit
        self.source.allocated(st, fresh)
        self._route()

    def _route(self) -> None:
        """The source's jobs: a lookup goes to the worker process now, a load with the step's metadata."""
        for job in self.source.take_jobs():
            match job:
                case TierLookup(request_id=rid, hashes=hashes, local=local):
                    peer = self.peers.get(rid)
                    self.lookups.ask(rid, hashes, local, len(peer[0].block_ids) if peer is not None else 0)
                case TierLoad():
                    self._loads.append(job)
                    self._plan_read(job)
                    split: dict[str, int] = {}
                    for t in job.tiers:
                        split[t] = split.get(t, 0) + self.block_size
                    self._hit_sources[job.request_id] = split

    def _plan_read(self, job: TierLoad) -> None:
        """Where the load's peer blocks are on the lender: block k of the prompt is the lease's k-th."""
        if PEER_TIER not in job.tiers:
            return
        peer, st = self.peers.get(job.request_id), self.reqs.get(job.request_id)
        if peer is None or st is None:
            return  # no read: the worker half reports the peer blocks missing, vLLM recomputes them
        handle, deadline = peer
        position = {h: k for k, h in enumerate(st.hasher.hashes)}
        ks = [position.get(h, -1) for h, t in zip(job.hashes, job.tiers, strict=True) if t == PEER_TIER]
        self.peers[job.request_id] = None  # read once, whatever comes of it
        if all(0 <= k < len(handle.block_ids) for k in ks):
            self._reads[job.request_id] = PeerRead(handle, [handle.block_ids[k] for k in ks], deadline)

    def take_reads(self) -> dict[str, PeerRead]:
        """The peer reads of the loads `step` hands out (to the worker half with them)."""
        reads, self._reads = self._reads, {}
        return reads

    def step(self, scheduled: Sequence[tuple[str, int, int, Sequence[int], Callable[[], Sequence[int]]]]) -> tuple[
            list[TierLoad], list[TierSave]]:
        """scheduled: (req_id, tokens computed before this step, tokens it computes, all known token
        ids, a function giving vLLM's block ids) per request in this step (the ids are asked for only
        when a block is to be saved: most steps are decode steps that fill none)."""
        loads, self._loads = self._loads, []
        saves: list[TierSave] = []
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
            saves.append(TierSave(hashes[st.saved:full], list(block_ids[st.saved:full])))
            st.saved = full
        return loads, saves

    def hit_sources(self, req_id: str) -> dict[str, int]:
        return dict(self._hit_sources.get(req_id, {}))

    def finished(self, req_id: str) -> None:
        self.live.pop(req_id, None)
        self._hit_sources.pop(req_id, None)
        self.peers.pop(req_id, None)
        self.source.finished(req_id)
        self.reqs.pop(req_id, None)
        self.lookups.forget(req_id)

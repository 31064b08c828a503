"""Continuous batching: decode-first, chunked prefill under a per-step token budget, preemption by
recompute when blocks run out, FCFS admission from a bounded waiting queue.

Each `schedule()` returns (sequence, num_tokens) pairs; the engine runs them as one batch and then
calls `commit()`. Invariants:
- Running sequences are served before waiting ones, in arrival order; a waiting sequence is admitted
  only when its whole next chunk fits in free blocks (admission never preempts).
- When a running sequence cannot get a block, the most recently arrived running sequence is preempted
  (blocks released, recomputed later from its prompt + output); no step is ever left with a running
  sequence that lacks blocks for its scheduled tokens.
- A prefix-cache hit never covers the last token: at least one token is computed, to get logits.

KV from elsewhere comes through one door (`KvDoor`, kv_sources/): before a waiting sequence is admitted
(when it is queued, and whenever it is at the head) the door says how many tokens after G1's own hit
its sources can supply. The sequence then waits for KV (WAITING_FOR_KV): in `asking` while a source
still looks (no blocks held), or in `loading` with blocks for the hit and fresh blocks for the source
to fill, which stay out of reach until `kv_arrived` (a finished sequence keeps them: `finish` returns
False). It then runs from the longest prefix that arrived intact. Invariant: a WAITING sequence is in
`waiting`; a WAITING_FOR_KV one in exactly one of `asking` and `loading`.

A sequence whose KV arrived while `max_num_seqs` sequences run waits READY, blocks held, in `ready`;
each step first fills free running slots from `ready`, then from `waiting`. So `len(running) <=
max_num_seqs` always, and a ready sequence is the first one preempted. HELD (`park`): out of the
scheduler's sight with its blocks kept (the prefill role's prompt, until the decode side has it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvrelay.kvbm.block_pool import Block
from kvrelay.workers.core.kv_cache import KvCache
from kvrelay.workers.core.kv_sources.kv_door import KvDoor
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.core.sequence import Sequence, Status


@dataclass(frozen=True)
class _Fetch:
    """A load in flight for a sequence: `fresh` (indices into its blocks) are being filled, up to token
    `end`; `first`: this is the sequence's first admission (its cached-token count is set here)."""

    fresh: list[int]
    end: int
    counts_as_cached: bool
    first: bool


class Scheduler:
    def __init__(self, cfg: EngineLimits, kv: KvCache, door: KvDoor):
        self.cfg, self.kv = cfg, kv  # blocks, prefix cache and their events: only through `kv`
        self.door = door  # KV from anywhere but this engine's steps: only through `door`
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.ready: deque[Sequence] = deque()  # READY: KV in place, no running slot yet (FIFO)
        self.asking: dict[str, Sequence] = {}  # WAITING_FOR_KV, no blocks: a source is still looking
        self.loading: dict[str, tuple[Sequence, _Fetch]] = {}  # WAITING_FOR_KV, blocks being filled
        self.preemptions = 0
        self.prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        """Queue `seq` (WAITING); if a source has its KV, the load starts now, not at its turn."""
        self.waiting.append(seq)
        self._fetch(seq)

    # -- scheduling -------------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.cfg.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        while self.ready and len(self.running) < self.cfg.max_num_seqs:
            seq = self.ready.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self._reserve(seq, seq.num_computed + n):
                victim = self.ready[-1] if self.ready else self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
                budget -= n
        while (self.waiting and budget > 0 and not preempted and not self.ready
               and len(self.running) < self.cfg.max_num_seqs):
            seq = self.waiting[0]
            if self._fetch(seq):
                continue
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.block_size)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        need = self._blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.kv.num_free:
            return False
        seq.blocks += self.kv.allocate(need)
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Take a prefix hit and blocks for the first chunk; 0 (and no side effects) if they don't fit."""
        max_hit_blocks = (seq.num_tokens - 1) // self.cfg.block_size
        hits = self.kv.lookup(seq.hasher.hashes[:max_hit_blocks])
        computed = len(hits) * self.cfg.block_size
        n = min(seq.num_tokens - computed, budget)
        need = self._blocks_for(computed + n) - len(hits)
        hits_free = sum(1 for b in hits if b.ref_count == 0)  # touching these removes them from free
        if need > self.kv.num_free - hits_free:
            return 0
        self.kv.touch(hits)
        seq.blocks = hits + self.kv.allocate(need)
        seq.num_computed = computed
        seq.num_published = len(hits)
        if not seq.admitted:
            seq.admitted = True
            seq.num_cached_prompt = min(computed, len(seq.prompt))
            self.prefix_hit_tokens += seq.num_cached_prompt
        seq.status = Status.RUNNING
        return n

    def _fetch(self, seq: Sequence) -> bool:
        """Ask the door about waiting `seq`. True if it left `waiting` to wait for KV: in `asking` (a
        source is looking), or in `loading` with its blocks (G1's hit, G1 blocks the source may reuse,
        fresh blocks for the rest). False: nothing to load, or blocks are short (the match is dropped)
        and it is admitted as usual."""
        bs, hashes = self.cfg.block_size, seq.hasher.hashes
        hits = self.kv.lookup(hashes[:(seq.num_tokens - 1) // bs])
        match = self.door.match(seq, len(hits))
        if match is None:
            self.waiting.remove(seq)
            seq.status = Status.WAITING_FOR_KV
            self.asking[seq.request_id] = seq
            return True
        if match.num_tokens <= 0:
            return False
        end = len(hits) * bs + match.num_tokens
        src: list[Block | None] = list(hits)  # a block G1 has, or None: fresh, to be filled
        for i in range(len(hits), self._blocks_for(end)):
            src.append(self.kv.cached.get(hashes[i]) if match.reuse_cached and i < len(hashes) else None)
        fresh = [i for i, b in enumerate(src) if b is None]
        cached = [b for b in src if b is not None]
        if not fresh or len(fresh) > self.kv.num_free - sum(1 for b in cached if b.ref_count == 0):
            self.door.allocated(seq, None)
            return False
        self.waiting.remove(seq)
        self.kv.touch(cached)
        new = iter(self.kv.allocate(len(fresh)))
        seq.blocks = [b if b is not None else next(new) for b in src]
        self.door.allocated(seq, fresh)  # before `admitted` changes: a source may count re-admissions
        seq.num_computed, seq.num_published = len(hits) * bs, len(hits)
        first = not seq.admitted
        if first:
            seq.admitted = True
            seq.num_cached_prompt = min(seq.num_computed, len(seq.prompt))
            self.prefix_hit_tokens += seq.num_cached_prompt
        seq.status = Status.WAITING_FOR_KV
        self.loading[seq.request_id] = (seq, _Fetch(fresh, end, match.counts_as_cached, first))
        return True

    def kv_answered(self, seq: Sequence) -> None:
        """A source that was looking for `seq`'s KV has its answer: `seq` waits at the head again."""
        if self.asking.pop(seq.request_id, None) is not None:
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    def kv_arrived(self, seq: Sequence, ok: list[bool]) -> tuple[list[int], int]:
        """The load into `seq`'s fresh blocks ended (`ok` per fresh block, in order): keep the leading
        blocks that are all intact, release the rest, and run `seq` from there (the rest is computed).
        Returns (the fresh indices, how many leading blocks were kept)."""
        entry = self.loading.pop(seq.request_id, None)
        if entry is None:
            return [], 0
        fetch = entry[1]
        kept = next((i for i, fine in zip(fetch.fresh, ok, strict=True) if not fine), len(seq.blocks))
        self.kv.release(reversed(seq.blocks[kept:]))  # a failed block and all after it: recompute
        seq.blocks = seq.blocks[:kept]
        computed = min(kept * self.cfg.block_size, fetch.end)
        if fetch.first and fetch.counts_as_cached:
            cached = min(computed, len(seq.prompt))
            self.prefix_hit_tokens += cached - seq.num_cached_prompt
            seq.num_cached_prompt = cached
        self.commit(seq, computed - seq.num_computed)  # publish what arrived
        self._run_or_ready(seq)
        return fetch.fresh, kept

    def _preempt(self, seq: Sequence) -> None:
        self.door.preempted(seq, seq.num_computed // self.cfg.block_size)
        (self.ready if seq.status is Status.READY else self.running).remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.kv.release(reversed(seq.blocks))
        seq.blocks = []
        seq.num_published = 0

    def _run_or_ready(self, seq: Sequence) -> None:
        """`seq`'s KV is in place: run it if a slot is free, else it waits READY (blocks held)."""
        if len(self.running) < self.cfg.max_num_seqs and not self.ready:
            seq.status = Status.RUNNING
            self.running.append(seq)
        else:
            seq.status = Status.READY
            self.ready.append(seq)

    def park(self, seq: Sequence) -> None:
        """Stop scheduling running `seq` but keep its blocks (HELD) until `finish` (the prefill role:
        the decode side pulls them)."""
        self.running.remove(seq)
        seq.status = Status.HELD

    # -- after the step ---------------------------------------------------------------------------------
    def commit(self, seq: Sequence, n: int) -> None:
        """`n` more tokens of `seq` now have K/V in the cache: publish its newly full blocks."""
        seq.num_computed += n
        full = min(seq.num_computed // self.cfg.block_size, len(seq.hasher.hashes))
        if full > seq.num_published:  # most decode steps fill no block
            self.kv.publish(seq.blocks, seq.hasher.hashes, seq.num_published, full)
            seq.num_published = full

    def finish(self, seq: Sequence, reason: str) -> bool:
        """End `seq`. Returns False if its blocks are kept (a source is filling them): call
        `release_blocks` once the source has reported."""
        seq.finish_reason = reason
        loading = self.loading.pop(seq.request_id, None) is not None
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.READY:
            self.ready.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.WAITING_FOR_KV:
            self.asking.pop(seq.request_id, None)
        seq.status = Status.FINISHED
        if not loading:
            self._release(seq)
        return not loading

    def release_blocks(self, seq: Sequence) -> None:
        self._release(seq)

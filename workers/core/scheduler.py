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

A sequence whose KV arrived (pulled from a prefill worker, or loaded from a lower tier) while
`max_num_seqs` sequences run waits READY, blocks held, in `ready`; each step first fills free running
slots from `ready`, then from `waiting`. So `len(running) <= max_num_seqs` always (a decode worker fed
by handoffs used to run unbounded batches), and a ready sequence is the first one preempted.

Disaggregation adds two states outside `running`/`waiting`, each holding blocks: HELD (prefill role:
`park` after the first token, until the engine aborts it once pulled or expired) and PULLING (decode
role: `take_remote` allocated the prompt's blocks; `pulled` then runs it, or sends it back to waiting
to be recomputed). Onboarding from lower tiers uses PULLING too: `take_onboard` gives a waiting
sequence its G1 prefix hits plus fresh blocks for the blocks the tiers hold, `onboarded` runs it from
the longest prefix that arrived intact. `finish` frees the blocks of a sequence in any state, except
that a PULLING sequence keeps them (`keep_blocks`) until its loader reports: a transport or tier may
still be writing them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from kvrelay.kvbm.block_pool import Block
from kvrelay.workers.core.kv_cache import KvCache
from kvrelay.workers.core.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_waiting: int = 1024
    max_model_len: int = 4096


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KvCache):
        self.cfg, self.kv = cfg, kv  # blocks, prefix cache and their events: only through `kv`
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.ready: deque[Sequence] = deque()  # READY: KV in place, no running slot yet (FIFO)
        self.preemptions = 0
        self.prefix_hit_tokens = 0
        # With lower tiers (set by the engine): a preempted sequence whose blocks left G1 while it waited
        # is parked in `looking` and its hashes queued in `lookups` for the engine to look up in the
        # tiers; `end_lookup` puts it back at the head. Invariant: a WAITING sequence is in exactly one of
        # `waiting` and `looking`.
        self.track_preempted = False
        self.looking: dict[str, Sequence] = {}
        self.lookups: list[tuple[str, list[int]]] = []

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
            if seq.lost_blocks and self._park_for_lookup(seq):
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
        seq.lower_hint = None  # admitted (and recomputed) before a load could be planned
        if not seq.admitted:
            seq.admitted = True
            seq.num_cached_prompt = min(computed, len(seq.prompt))
            self.prefix_hit_tokens += seq.num_cached_prompt
        seq.status = Status.RUNNING
        return n

    def _park_for_lookup(self, seq: Sequence) -> bool:
        """`seq` (preempted, at the head) lost blocks from G1 while it waited: park it and queue a lookup
        of those blocks in the lower tiers, so they are loaded rather than recomputed. False (and it
        is admitted as usual) if G1 still has them all."""
        hashes = seq.hasher.hashes[:seq.lost_blocks]
        seq.lost_blocks = 0
        if len(self.kv.lookup(hashes)) == len(hashes):
            return False
        self.waiting.popleft()
        self.looking[seq.request_id] = seq
        self.lookups.append((seq.request_id, hashes))
        return True

    def end_lookup(self, seq: Sequence) -> bool:
        """The lookup for a parked `seq` came back: it waits at the head again. False if it ended meanwhile."""
        if self.looking.pop(seq.request_id, None) is None:
            return False
        self.waiting.appendleft(seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        if self.track_preempted and not seq.hold_kv:  # a prefill-role caller takes one ticket, first
            seq.lost_blocks = seq.num_computed // self.cfg.block_size
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

    # -- disaggregation ---------------------------------------------------------------------------------
    def take_remote(self, seq: Sequence) -> int | None:
        """Decode role: take `seq` (waiting; prompt + the remote first token) out of the queue and give it
        blocks for its prompt: prefix hits from this pool, fresh blocks for the rest. Returns how many
        leading prompt blocks were hits (the puller fills the rest), or None if blocks are short now:
        `seq` then stays waiting and is recomputed like a preempted sequence."""
        bs, n_prompt = self.cfg.block_size, len(seq.prompt)
        hits = self.kv.lookup(seq.hasher.hashes[:n_prompt // bs])
        need = self._blocks_for(n_prompt) - len(hits)
        if need > self.kv.num_free - sum(1 for b in hits if b.ref_count == 0):
            return None
        self.waiting.remove(seq)
        self.kv.touch(hits)
        seq.blocks = hits + self.kv.allocate(need)
        seq.num_computed = len(hits) * bs
        seq.num_published = len(hits)
        seq.admitted = True
        seq.num_cached_prompt = seq.num_computed
        self.prefix_hit_tokens += seq.num_computed
        seq.status = Status.PULLING
        return len(hits)

    def pulled(self, seq: Sequence, ok: bool) -> None:
        """The pull for a PULLING `seq` ended: run it (its prompt KV is in place), or recompute it."""
        if seq.status is not Status.PULLING:
            return  # aborted meanwhile, or never pulled (take_remote found no blocks)
        if ok:
            self.commit(seq, len(seq.prompt) - seq.num_computed)  # publish the pulled full blocks
            self._run_or_ready(seq)
        else:
            self._release(seq)
            seq.num_computed = 0
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    def take_onboard(self, seq: Sequence, in_lower: Seq[bool], cut: Callable[[list[bool]], int]) -> list[int] | None:
        """`seq` is waiting: just added, or preempted (then its tokens include output). `in_lower[i]`: a
        lower tier holds block i. Walk its full blocks (never the last token's) while each is in G1 or
        a lower tier; `cut(needs_load)` says how many leading ones are worth taking. Returns the
        indices (into `seq.blocks`) of the fresh blocks to fill, with `seq` now PULLING; None (no side
        effects) if nothing is to be loaded or blocks are short."""
        bs = self.cfg.block_size
        src: list[Block | None] = []  # a G1 hit, or None: to be loaded
        for i, h in enumerate(seq.hasher.hashes[:(seq.num_tokens - 1) // bs]):
            block = self.kv.cached.get(h)
            if block is None and not (i < len(in_lower) and in_lower[i]):
                break
            src.append(block)
        src = src[:cut([b is None for b in src])]
        fresh_idx = [i for i, b in enumerate(src) if b is None]
        hits = [b for b in src if b is not None]
        if not fresh_idx or len(fresh_idx) > self.kv.num_free - sum(1 for b in hits if b.ref_count == 0):
            return None
        self.waiting.remove(seq)
        self.kv.touch(hits)
        fresh = iter(self.kv.allocate(len(fresh_idx)))
        seq.blocks = [b if b is not None else next(fresh) for b in src]
        seq.num_computed = seq.num_published = 0
        seq.status = Status.PULLING
        return fresh_idx

    def onboarded(self, seq: Sequence, fresh_idx: list[int], ok: list[bool]) -> int:
        """The load into `seq.blocks[fresh_idx]` ended (`ok` per block): keep the leading blocks that are
        all intact, release the rest, and run `seq` from there. Returns the blocks loaded and kept."""
        if seq.status is not Status.PULLING:
            return 0
        good = next((i for i, fine in zip(fresh_idx, ok, strict=True) if not fine), len(seq.blocks))
        self.kv.release(reversed(seq.blocks[good:]))  # a failed block and all after it: recompute
        seq.blocks = seq.blocks[:good]
        if not seq.admitted:  # a preempted sequence loaded back keeps its first admission's numbers
            seq.admitted = True
            seq.num_cached_prompt = min(good * self.cfg.block_size, len(seq.prompt))
            self.prefix_hit_tokens += seq.num_cached_prompt
        self.commit(seq, good * self.cfg.block_size)  # publish the loaded blocks
        self._run_or_ready(seq)
        return sum(1 for i in fresh_idx if i < good)

    def _run_or_ready(self, seq: Sequence) -> None:
        """`seq`'s KV is in place: run it if a slot is free, else it waits READY (blocks held)."""
        if len(self.running) < self.cfg.max_num_seqs and not self.ready:
            seq.status = Status.RUNNING
            self.running.append(seq)
        else:
            seq.status = Status.READY
            self.ready.append(seq)

    def park(self, seq: Sequence) -> None:
        """Prefill role: `seq` has its first token; keep its blocks, stop scheduling it."""
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
        """End `seq`. Returns False if its blocks are kept (it was PULLING): call `release_blocks` once
        the loader has reported."""
        seq.finish_reason = reason
        loading = seq.status is Status.PULLING
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.READY:
            self.ready.remove(seq)
        elif seq.status is Status.WAITING and self.looking.pop(seq.request_id, None) is None:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        if not loading:
            self._release(seq)
        return not loading

    def release_blocks(self, seq: Sequence) -> None:
        self._release(seq)

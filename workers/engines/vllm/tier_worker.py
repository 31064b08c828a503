"""The worker half of kvrelay's tier connector under vLLM: bytes between vLLM's KV tensors and the
tiers, through the staging rows of `TierRuntime` (tier_connector.py calls it; no vLLM import here).

- Loads (`start_loads`, before the forward): take rows, and let the tier loop copy each job's blocks
  from G2/G3/G4 into them (`TieredKv.onboard`, slower tiers retried on a miss). `finished_loads` (after
  the forward, every step) scatters what arrived into vLLM's blocks, on this thread, and reports the
  request; blocks from the first one that did not arrive are reported as load errors, so vLLM
  recomputes them (policy "recompute"; a corrupt G3 block or truncated G4 object is such a miss).
- Loads with blocks from a peer (tier "peer", the cluster KV pool): the tier loop reads them from the
  lender's rows into this worker's (peer_pool.py `PeerPool.load`) while local tiers fill the others;
  the scatter and the error report are the same.
- Saves (`save`, after the forward): gather each new full block (every layer) into a row, on this
  thread, before vLLM can reuse the block; the tier loop then writes the rows to every tier
  (`TieredKv.offload`) and frees them. vLLM's blocks are never held for a save.

Invariants: every load started is reported in `finished_loads` exactly once (vLLM keeps a waiting
request's blocks until then, also when it is aborted meanwhile); rows go back to the runtime exactly
once, after the last copy that reads or writes them.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Mapping, Sequence
from time import perf_counter

import torch

from kvrelay.kernels.layer_pages import LayerPages, block_bytes, gather_layer_pages, scatter_layer_pages
from kvrelay.kvbm.tiered_kv import OnboardPlan
from kvrelay.workers.core.kv_sources.tiers import TierLoad, TierSave
from kvrelay.workers.engines.vllm.peer_pool import PEER_TIER, PeerRead
from kvrelay.workers.engines.vllm.tier_runtime import TierRuntime

log = logging.getLogger("kvrelay.vllm.tiers")


def _layer_order(name: str) -> tuple:
    """Layer names sort by their numeric parts ("model.layers.10..." after "model.layers.9...")."""
    return tuple(int(p) if p.isdigit() else p for p in name.replace(".", " ").split())


class TierWorker:
    def __init__(self, runtime: TierRuntime, num_blocks: int):
        self.rt, self.num_blocks = runtime, num_blocks
        self.pages: list[LayerPages] = []
        self.enabled = False
        self._loads: dict[str, tuple[TierLoad, list[int], concurrent.futures.Future | None]] = {}
        self._errors: set[int] = set()
        self._t0 = 0.0

    def register(self, kv_caches: Mapping[str, torch.Tensor], step_blocks: int = 0) -> None:
        """vLLM's caches, one per attention layer; opens the tiers sized to a block of all of them, with
        staging rows for at least two steps' worth of new blocks (`step_blocks`: vLLM's token budget per
        step in blocks), so a long prompt's prefill is saved whole."""
        seen: set[int] = set()
        pages = []
        for name in sorted(kv_caches, key=_layer_order):
            t = kv_caches[name]
            if t.data_ptr() in seen:  # layers sharing one cache (KV sharing) are stored once
                continue
            seen.add(t.data_ptr())
            pages.append(LayerPages.of(t, self.num_blocks))
        self.pages = pages
        dtype = str(pages[0].view.dtype).removeprefix("torch.") if pages else None
        self.enabled = bool(pages) and self.rt.open(block_bytes(pages), min_rows=2 * step_blocks, dtype=dtype)

    # -- loads ------------------------------------------------------------------------------------------
    def mark_step(self) -> None:
        self._t0 = perf_counter()

    def start_loads(self, jobs: Sequence[TierLoad], reads: Mapping[str, PeerRead] | None = None) -> None:
        """reads: where each load's blocks from a peer are (the cluster KV pool); a load with peer blocks
        but no read (or no pool here) reports them missing, so vLLM recomputes them."""
        for job in jobs:
            rows = self.rt.take_rows(len(job.hashes), save=False) if self.enabled else None
            fut = None
            read = (reads or {}).get(job.request_id)
            if rows is not None and PEER_TIER not in job.tiers:
                fut = self.rt.submit(self.rt.kv.onboard(OnboardPlan(job.hashes, rows, job.tiers)))
            elif rows is not None and read is not None and self.rt.pool is not None:
                fut = self.rt.submit(self.rt.pool.load(job, rows, read))
            elif rows is not None:  # nothing will fill them
                self.rt.give_rows(rows, save=False)
                rows = None
            self._loads[job.request_id] = (job, rows or [], fut)

    def finished_loads(self) -> set[str]:
        done = set()
        for req_id, (job, rows, fut) in list(self._loads.items()):
            if fut is not None and not fut.done():
                continue
            del self._loads[req_id]
            done.add(req_id)
            ok: list[bool] = [False] * len(job.hashes)
            if fut is not None:
                try:
                    ok = fut.result()
                except Exception:
                    log.exception("kvrelay tier load failed; recomputing")
            n = next((i for i, arrived in enumerate(ok) if not arrived), len(ok))  # the intact prefix
            try:
                if n:
                    scatter_layer_pages(self.pages, job.block_ids[:n], self.rt.staging, rows[:n])
            except Exception:
                log.exception("copying loaded KV into vLLM's cache failed; recomputing")
                n = 0
            finally:
                if rows:
                    self.rt.give_rows(rows, save=False)
            self.rt.onboarded += n
            if self.rt.pool is not None:
                self.rt.pool.loaded(job, n)
            self._errors.update(job.block_ids[n:])
        return done

    def take_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    # -- saves ------------------------------------------------------------------------------------------
    def save(self, jobs: Sequence[TierSave]) -> None:
        if not self.enabled:
            return
        for job in jobs:
            keep = [i for i, h in enumerate(job.hashes) if h not in self.rt.known]
            if not keep:
                continue
            rows = self.rt.take_rows(len(keep), save=True) or []  # as many as are free: the leading blocks
            self.rt.save_skipped += len(keep) - len(rows)
            if not rows:
                continue
            keep = keep[:len(rows)]
            hashes = [job.hashes[i] for i in keep]
            try:
                gather_layer_pages(self.pages, [job.block_ids[i] for i in keep], self.rt.staging, rows)
            except Exception:
                log.exception("copying KV out of vLLM's cache failed; blocks not saved")
                self.rt.give_rows(rows, save=True)
                continue
            self.rt.call(self.rt.kv.offload, hashes, rows, self._saved)

    def _saved(self, rows: list[int]) -> None:  # on the tier loop, once every tier has the rows' bytes
        self.rt.give_rows(rows, save=True)

    def observe_step(self, prompt_tokens: int) -> None:
        """The forward that just ran computed `prompt_tokens` prompt tokens: the cost model's prefill speed."""
        if self.enabled and prompt_tokens and self._t0:
            self.rt.kv.cost.observe_prefill(prompt_tokens, perf_counter() - self._t0)

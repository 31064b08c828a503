"""`ModelRunner`: the native engine's `Executor` (workers/core/executor.py): one scheduled step is one
forward of the model over the paged KV cache, the structured-output masks (grammar_mask.py), then
sampling, then the grammars advanced with the sampled tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvrelay.workers.core.executor import Scheduled, StepResult
from kvrelay.workers.engines.native.batch import build_batch
from kvrelay.workers.engines.native.grammar_cache import GrammarCache
from kvrelay.workers.engines.native.grammar_mask import GrammarMask
from kvrelay.workers.engines.native.sampler import sample


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int, device: str,
                 eos_ids: Iterable[int] = (), grammars: GrammarCache | None = None):
        self.model, self.kv_cache, self.block_size, self.device = model, kv_cache, block_size, device
        self.eos_ids = frozenset(eos_ids)  # what min_tokens keeps from being sampled (with stop_token_ids)
        self.grammar = GrammarMask(grammars) if grammars is not None else None

    @torch.inference_mode()
    def execute(self, scheduled: Scheduled) -> StepResult:
        batch = build_batch(scheduled, self.block_size, self.device)
        logits = self.model(batch.input_ids, batch.meta, self.kv_cache, batch.logits_index)
        seqs = batch.sample_seqs
        rows: list[int] = []
        failed: list[int] = []
        if self.grammar is not None:
            rows, failed = self.grammar.apply(logits, seqs)
        tokens, logprobs, sample_failed, top = sample(logits, seqs, [s.next_generator() for s in seqs],
                                                      self.eos_ids)
        failed += sample_failed
        stopped: list[int] = []
        if rows:
            assert self.grammar is not None
            stopped, refused = self.grammar.advance(seqs, rows, tokens, set(failed))
            failed += refused
        return StepResult(seqs, tokens, logprobs, tuple(sorted(set(failed))), top, tuple(stopped))

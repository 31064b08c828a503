"""Turning a scheduled step into model inputs: the flat token batch and its attention metadata.

Order in the flat batch: single-token entries first (decode, and 1-token prefill chunks — both attend
through the paged cache), then multi-token prefill chunks. `logits_index` lists, in the order of
`sample_seqs`, the last token of every sequence whose scheduled tokens reach its end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrelay.kernels import plan_decode_host
from kvrelay.workers.core.sequence import Sequence
from kvrelay.workers.engines.native.model import BatchMetadata, PrefillChunk


@dataclass
class Batch:
    input_ids: torch.Tensor
    meta: BatchMetadata
    logits_index: torch.Tensor
    sample_seqs: list[Sequence]


def build_batch(scheduled: list[tuple[Sequence, int]], block_size: int, device: str) -> Batch:
    # Built from Python lists, one tensor per field: a b16 decode step's metadata is a few dozen
    # small tensors otherwise, which cost more than a tiny model's GEMMs.
    decodes = [(s, n) for s, n in scheduled if n == 1]
    chunks = [(s, n) for s, n in scheduled if n > 1]
    ids: list[int] = []
    positions: list[int] = []
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    logits_index: list[int] = []
    sample_seqs: list[Sequence] = []

    def add(seq: Sequence, n: int) -> None:
        start = seq.num_computed
        ids.extend(seq.tokens(start, start + n))
        positions.extend(range(start, start + n))
        table = seq.blocks
        slot_blocks.extend(table[p // block_size].block_id for p in range(start, start + n))
        slot_offsets.extend(p % block_size for p in range(start, start + n))
        if start + n == seq.num_tokens:
            logits_index.append(len(ids) - 1)
            sample_seqs.append(seq)

    for seq, n in decodes:
        add(seq, n)
    meta = BatchMetadata(positions=torch.empty(0), slot_blocks=torch.empty(0), slot_offsets=torch.empty(0),
                         num_decode=len(decodes))
    if decodes:
        tables = [[b.block_id for b in s.blocks] for s, _ in decodes]
        context_lens = [s.num_computed + 1 for s, _ in decodes]
        width = max(len(t) for t in tables)
        meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                                device=device)
        meta.decode_context_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        if torch.device(device).type == "cpu":  # the CUDA kernel reads the tables itself
            meta.decode_plan = plan_decode_host(tables, context_lens, block_size, device)
    for seq, n in chunks:
        start = len(ids)
        add(seq, n)
        nblocks = -(-(seq.num_computed + n) // block_size)
        table = torch.tensor([b.block_id for b in seq.blocks[:nblocks]], dtype=torch.int64, device=device)
        meta.prefills.append(PrefillChunk(start, start + n, seq.num_computed, table))
    meta.positions = torch.tensor(positions, dtype=torch.int64, device=device)
    meta.slot_blocks = torch.tensor(slot_blocks, dtype=torch.int64, device=device)
    meta.slot_offsets = torch.tensor(slot_offsets, dtype=torch.int64, device=device)
    return Batch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        meta=meta,
        logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
        sample_seqs=sample_seqs,
    )

"""min_p on sampled rows (greedy cannot show it): after the temperature, a token survives only if its
probability is at least min_p times the top token's; every survivor stays drawable."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvrelay.workers.api.messages import SamplingParams
from kvrelay.workers.engines.native.sampler import sample

LOGITS = torch.tensor([3.0, 2.6, 2.2, 1.5, 1.0, 0.0, -1.0, -3.0])


@dataclass
class Seq:
    sampling: SamplingParams
    prompt: list[int] = field(default_factory=lambda: [0])
    output: list[int] = field(default_factory=list)

    @property
    def penalized_output(self) -> list[int]:
        return self.output


def survivors(temperature: float, min_p: float) -> set[int]:
    probs = torch.softmax(LOGITS / temperature, dim=-1)
    return {i for i, q in enumerate(probs.tolist()) if q >= min_p * max(probs.tolist())}


def drawn(temperature: float, min_p: float, rows: int = 600) -> set[int]:
    seqs = [Seq(SamplingParams(temperature=temperature, min_p=min_p)) for _ in range(rows)]
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    out = sample(LOGITS.repeat(rows, 1), seqs, gens)
    assert not out.failed
    return set(out.tokens)


def test_min_p_keeps_exactly_the_tokens_above_its_share_of_the_top():
    for temperature, min_p in ((1.0, 0.5), (1.0, 0.2), (3.0, 0.5), (0.5, 0.05)):
        assert drawn(temperature, min_p) == survivors(temperature, min_p), (temperature, min_p)
    assert survivors(1.0, 0.5) != survivors(3.0, 0.5)  # applied after the temperature, as vLLM does
    assert drawn(1.0, 0.0) > survivors(1.0, 0.2)  # off: the tail is drawn too
    assert drawn(5.0, 1.0, rows=50) == {0}  # min_p=1: only the top token


def test_min_p_rows_leave_their_neighbours_alone():
    rows = 64
    plain = [Seq(SamplingParams(temperature=1.0)) for _ in range(rows)]
    mixed = [Seq(SamplingParams(temperature=1.0, min_p=0.9 if i % 2 else 0.0)) for i in range(rows)]
    a = sample(LOGITS.repeat(rows, 1), plain, [torch.Generator().manual_seed(i) for i in range(rows)]).tokens
    b = sample(LOGITS.repeat(rows, 1), mixed, [torch.Generator().manual_seed(i) for i in range(rows)]).tokens
    assert [t for i, t in enumerate(a) if i % 2 == 0] == [t for i, t in enumerate(b) if i % 2 == 0]
    assert all(t == 0 for i, t in enumerate(b) if i % 2)

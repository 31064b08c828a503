"""A request's state inside the native engine."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from kvrelay.kvbm.block_pool import Block
from kvrelay.kvbm.hashing import BlockHasher
from kvrelay.workers.protocol import SamplingParams

if TYPE_CHECKING:
    import torch  # imported lazily below: the mocker engine reuses Sequence without torch


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens are prompt + generated output. `num_computed` tokens have their K/V in `blocks`.

    Invariants: len(blocks) * block_size >= num_computed; hasher.hashes[i] is the hash of block i's
    tokens for every full block; blocks[i] is published in the prefix cache only once computed.
    """

    def __init__(self, request_id: str, prompt: list[int], sampling: SamplingParams, hasher: BlockHasher,
                 arrival: int):
        self.request_id = request_id
        self.prompt = list(prompt)
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.sampling = sampling
        self.status = Status.WAITING
        self.blocks: list[Block] = []
        self.num_computed = 0
        self.num_cached_prompt = 0  # prompt tokens served by the prefix cache on first admission
        self.num_published = 0  # leading blocks already offered to the prefix cache
        self.hasher = hasher
        hasher.extend(self.prompt)
        self.arrival = arrival
        self.admitted = False
        self.finish_reason: str | None = None
        self.num_emitted = 0  # output tokens already sent to the caller
        self.generator: torch.Generator | None = None
        if sampling.seed is not None:
            import torch

            self.generator = torch.Generator().manual_seed(sampling.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        return (self.prompt + self.output)[start:end]

    def append(self, token: int, logprob: float | None) -> None:
        self.output.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        self.hasher.extend((token,))

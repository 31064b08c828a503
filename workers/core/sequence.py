"""A request's state inside the engine core (scheduler, KV blocks, output so far)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import xxhash

from kvrelay.kvbm.block_pool import Block
from kvrelay.kvbm.hashing import BlockHasher
from kvrelay.workers.api.messages import EngineOutput, SamplingParams, TopLogprobs

if TYPE_CHECKING:
    import torch  # imported lazily below: the core (and the mocker) run without torch


def position_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed for sampling position `position` of a request seeded with `seed`."""
    return xxhash.xxh3_64_intdigest(f"{seed}:{position}".encode())


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # KV from elsewhere (kv_sources/): the door is still asking where it is (no blocks held), or blocks
    # are allocated and a source is filling them (they stay out of reach until it reports).
    WAITING_FOR_KV = "waiting_for_kv"
    HELD = "held"  # finished for the scheduler, blocks kept for a consumer (prefill role: the decode pull)
    READY = "ready"  # KV in place (it came from elsewhere), waiting for a running slot (max_num_seqs)
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
        self.top_logprobs: list[TopLogprobs] = []  # kept only when sampling.top_logprobs > 0
        # The prompt's last this-many tokens were generated before (a migrated request, re-sent as prompt
        # + output so far): frequency and presence penalties count them as output (`penalized_output`).
        self.num_prior_output = 0
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

    def next_generator(self) -> torch.Generator | None:
        """The generator for the token about to be sampled (position `num_tokens`), re-seeded from
        (seed, position). Why per position: a seeded request then draws the same tokens wherever each
        one is sampled: aggregated, first token on a prefill worker and the rest on a decode worker, or
        continued on another worker after a migration (whose prompt is prompt + tokens so far)."""
        if self.generator is not None:
            assert self.sampling.seed is not None
            self.generator.manual_seed(position_seed(self.sampling.seed, self.num_tokens))
        return self.generator

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

    @property
    def penalized_output(self) -> list[int]:
        """The tokens frequency/presence penalties count: this request's output, including what a previous
        worker generated before a migration."""
        if not self.num_prior_output:
            return self.output
        return self.prompt[len(self.prompt) - self.num_prior_output:] + self.output

    def stop_reason(self, token: int, eos_ids: frozenset[int] | set[int], max_model_len: int) -> str | None:
        """Why `token` (just appended) ends the sequence, or None to go on."""
        p = self.sampling
        # A stop token counts only after min_tokens (the native sampler never samples one before; the
        # mocker's token source may).
        if len(self.output) > p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids)):
            return "stop"
        if len(self.output) >= p.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None

    def take_output(self) -> EngineOutput:
        """The tokens generated since the last call (and the finish reason once finished)."""
        new = self.output[self.num_emitted:]
        lps = self.logprobs[self.num_emitted:] if self.sampling.logprobs else None
        top = self.top_logprobs[self.num_emitted:] if self.sampling.top_logprobs else None
        self.num_emitted = len(self.output)
        return EngineOutput(request_id=self.request_id, token_ids=new, logprobs=lps, top_logprobs=top,
                            finish_reason=self.finish_reason, num_prompt_tokens=len(self.prompt),
                            num_cached_tokens=self.num_cached_prompt)

    def continue_from(self, first_token: int) -> None:
        """The first token was sampled elsewhere (a prefill worker): it is output, already emitted."""
        self.append(first_token, 0.0 if self.sampling.logprobs else None,
                    TopLogprobs([], []) if self.sampling.top_logprobs else None)  # never emitted: placeholders
        self.num_emitted = 1

    def append(self, token: int, logprob: float | None, top: TopLogprobs | None = None) -> None:
        self.output.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        self.hasher.extend((token,))

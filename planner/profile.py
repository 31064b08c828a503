"""A worker configuration's profile: the curves the `sla` policy sizes pools with.

    prefill: TTFT of one request (no queue) against its uncached input length
    decode:  ITL against concurrency per worker, one curve per context length

Written by `kvrelay planner profile` (measured against a running engine) as JSON. Lookups interpolate
linearly and clamp at the ends (never extrapolate a curve past what was measured).
"""

from __future__ import annotations

import bisect
from typing import Protocol

import msgspec


class Profile(msgspec.Struct, frozen=True):
    prefill_isl: list[float]
    prefill_ttft_s: list[float]
    decode_concurrency: list[float]
    decode_context: list[float]
    decode_itl_s: list[list[float]]  # [context index][concurrency index]
    max_num_seqs: int = 0

    def check(self) -> str | None:
        if len(self.prefill_isl) < 1 or len(self.prefill_isl) != len(self.prefill_ttft_s):
            return "prefill_isl and prefill_ttft_s must be non-empty and of equal length"
        if len(self.decode_itl_s) != len(self.decode_context) or any(
                len(row) != len(self.decode_concurrency) for row in self.decode_itl_s) or not self.decode_itl_s:
            return "decode_itl_s must be [len(decode_context)][len(decode_concurrency)]"
        for name in ("prefill_isl", "decode_concurrency", "decode_context"):
            xs = getattr(self, name)
            if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
                return f"{name} must be strictly increasing"
        return None

    def ttft(self, isl: float) -> float:
        return interp(isl, self.prefill_isl, self.prefill_ttft_s)

    def itl(self, concurrency: float, context: float) -> float:
        rows = [interp(concurrency, self.decode_concurrency, row) for row in self.decode_itl_s]
        return interp(context, self.decode_context, rows)


def interp(x: float, xs: list[float], ys: list[float]) -> float:
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class ProfileError(ValueError):
    pass


def load_profile(path: str) -> Profile:
    try:
        with open(path, "rb") as f:
            profile = msgspec.json.decode(f.read(), type=Profile)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProfileError(f"{path}: not a planner profile ({e})") from None
    problem = profile.check()
    if problem:
        raise ProfileError(f"{path}: {problem}")
    return profile


def save_profile(profile: Profile, path: str) -> None:
    with open(path, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(profile)))


class StepCost(Protocol):
    """An engine's step timing (the mocker's TimingModel is one): what profiles and simulations price."""

    def prefill_seconds(self, new_tokens: int, context: int = 0) -> float: ...

    def decode_seconds(self, batch: int, kv_blocks: int) -> float: ...


def profile_from_cost(cost: StepCost, block_size: int, max_num_seqs: int,
                      isls: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192),
                      contexts: tuple[int, ...] = (256, 1024, 4096, 8192)) -> Profile:
    """The curves a timing model implies (one prompt alone; c sequences decoding together)."""
    conc = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_num_seqs} & set(range(1, max_num_seqs + 1)))
    return Profile(prefill_isl=[float(i) for i in isls], prefill_ttft_s=[cost.prefill_seconds(i) for i in isls],
                   decode_concurrency=[float(c) for c in conc], decode_context=[float(x) for x in contexts],
                   decode_itl_s=[[cost.decode_seconds(c, c * -(-x // block_size)) for c in conc] for x in contexts],
                   max_num_seqs=max_num_seqs)

"""When is loading a KV block from a lower tier cheaper than recomputing it? (kvbm/README.md "Cost model")

Two measured rates, each an exponentially weighted moving average:
- per tier: `latency_s` (a batch's fixed cost) and `bytes_per_s` (its streaming rate), fitted from every
  onboard batch (seconds, bytes) the tier served;
- the engine's prefill speed in tokens/s, from steps that computed prompt tokens.

A run of blocks is worth loading when `latency + bytes / bandwidth < tokens / prefill_speed`. `best_cut`
applies it to a request's leading blocks: it keeps the prefix that saves the most time, so an expensive
tier at the tail (a G4 run too short to pay its round trip) is recomputed while the G2 head is loaded.

Priors (used until a tier has been measured) are conservative on purpose: they are an order of magnitude
below what the tiers do on the dev VM, so a tier must prove itself faster before it loses requests.
A tier that stores through a codec (kvbm/codecs) has an effective bandwidth, in the raw bytes G1 gets:
its I/O moves `ratio` x fewer bytes and each block is then decoded, so per raw byte it costs
1 / (io_rate * ratio) + 1 / decode_rate. `fold_codec` applies that to the tier's prior with the codec's
ratio and decode speed measured when the tier opened (kvbm/codecs/calibrate.py); every measured load
after that times the tier's `get`, decode included, so the measured rate is the effective one as is.
Reads and writes of these floats from the engine thread and the event loop need no lock: each is one
attribute store, and a stale value only shifts one decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# (latency_s, bytes_per_s) before the first measurement.
PRIORS: dict[str, tuple[float, float]] = {"G2": (50e-6, 2e9), "G3": (2e-3, 200e6), "G4": (30e-3, 30e6)}
PREFILL_PRIOR_TOKENS_PER_S = 2_000.0


@dataclass
class TierRate:
    latency_s: float
    bytes_per_s: float
    samples: int = 0

    def seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


class CostModel:
    def __init__(self, block_bytes: int, block_size: int, alpha: float = 0.2, always: bool = False):
        """always: load every block a tier holds, whatever it costs (`--kv-onboard always`)."""
        self.block_bytes, self.block_size, self.alpha, self.always = block_bytes, block_size, alpha, always
        self.tiers = {t: TierRate(*p) for t, p in PRIORS.items()}
        self.prefill_tokens_per_s = PREFILL_PRIOR_TOKENS_PER_S
        self.prefill_samples = 0
        self.codecs: dict[str, tuple[float, float]] = {}  # tier -> (ratio, decode bytes/s) folded in

    def fold_codec(self, tier: str, ratio: float, decode_bytes_per_s: float) -> None:
        """The tier stores through a codec: its prior becomes the effective rate (module doc). A tier
        already measured keeps its measurement (which includes the decode)."""
        if ratio <= 0 or decode_bytes_per_s <= 0:
            return
        rate = self.tiers.setdefault(tier, TierRate(*PRIORS.get(tier, (1e-3, 100e6))))
        self.codecs[tier] = (ratio, decode_bytes_per_s)
        if rate.samples == 0:
            rate.bytes_per_s = 1.0 / (1.0 / (rate.bytes_per_s * ratio) + 1.0 / decode_bytes_per_s)

    # -- measurements -----------------------------------------------------------------------------------
    def observe_load(self, tier: str, blocks: int, seconds: float) -> None:
        """One onboard batch from `tier`: `blocks` blocks in `seconds` (wall time of the tier's get)."""
        if blocks <= 0 or seconds <= 0:
            return
        rate = self.tiers.setdefault(tier, TierRate(*PRIORS.get(tier, (1e-3, 100e6))))
        a = 1.0 if rate.samples == 0 else self.alpha
        rate.samples += 1
        if blocks <= 2:  # a small batch is mostly its fixed cost
            rate.latency_s += a * (seconds - rate.latency_s)
            return
        streaming = max(seconds - rate.latency_s, seconds * 0.5)  # the part the latency does not explain
        rate.bytes_per_s += a * (blocks * self.block_bytes / streaming - rate.bytes_per_s)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """An engine step that computed `tokens` prompt tokens took `seconds`."""
        if tokens < self.block_size or seconds <= 0:
            return  # decode-only steps say nothing about prefill speed
        speed = tokens / seconds
        a = 1.0 if self.prefill_samples == 0 else self.alpha
        self.prefill_tokens_per_s += a * (speed - self.prefill_tokens_per_s)
        self.prefill_samples += 1

    # -- decisions --------------------------------------------------------------------------------------
    def load_seconds(self, tier: str, blocks: int) -> float:
        rate = self.tiers.get(tier) or TierRate(*PRIORS.get(tier, (1e-3, 100e6)))
        return rate.seconds(blocks * self.block_bytes)

    def compute_seconds(self, blocks: int) -> float:
        return blocks * self.block_size / self.prefill_tokens_per_s

    def best_cut(self, sources: Sequence[str | None]) -> int:
        """`sources[i]`: the tier block i would be loaded from, or None if G1 already holds it (free).
        Returns how many leading blocks to take: the prefix whose load beats recompute by the most
        (0 = recompute everything). Each tier's latency is paid once, at its first block."""
        if self.always:
            return len(sources)
        best, best_at, saved = 0.0, 0, 0.0
        seen: set[str] = set()
        per_block = self.compute_seconds(1)
        for i, tier in enumerate(sources):
            if tier is not None:
                rate = self.tiers.get(tier) or TierRate(*PRIORS.get(tier, (1e-3, 100e6)))
                cost = self.block_bytes / rate.bytes_per_s
                if tier not in seen:
                    seen.add(tier)
                    cost += rate.latency_s
                saved += per_block - cost
            else:
                saved += per_block
            if saved > best:
                best, best_at = saved, i + 1
        return best_at

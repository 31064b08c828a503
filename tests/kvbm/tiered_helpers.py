"""Driving a NativeEngine with lower tiers: greedy generation, stats, and evicting G1 on purpose."""

from __future__ import annotations

import asyncio
import random

from kvrelay.kvbm.hashing import BlockHasher, root_hash
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.api.messages import EngineRequest, SamplingParams, TierCounters
from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig
from kvrelay.workers.models.tiny import ensure_tiny_model

BLOCK = 16


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 2000) for _ in range(length)]


def engine(tiers: TierConfig | None, num_blocks: int = 48, **kw) -> NativeEngine:
    return NativeEngine(NativeEngineConfig(model=str(ensure_tiny_model()), num_blocks=num_blocks,
                                           tiers=tiers, **kw))


async def generate(eng: NativeEngine, tokens: list[int], n: int = 12, rid: str | None = None) -> tuple[list[int], int]:
    """Greedy tokens and the prompt tokens served from cache (G1 hits + onboarded)."""
    req = EngineRequest(request_id=rid or f"r{random.random()}", prompt_token_ids=tokens,
                        sampling=SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
    out, cached = [], 0
    async for o in eng.generate(req):
        out += o.token_ids
        cached = max(cached, o.num_cached_tokens)
    return out, cached


async def settle(eng: NativeEngine, timeout: float = 10.0) -> None:
    """Wait until no tier copy is in flight (every pinned block was released, every load reported)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    tiers = eng.loops.get("tiers") if eng.loops is not None else None
    while loop.time() < end:
        if tiers is not None:
            await tiers.drain()
        await asyncio.sleep(0.05)
        if (eng.stats().offload_pinned == 0 and (tiers is None or not tiers.tiers._offloads)
                and not eng.core.loading_aborted):
            return
    raise AssertionError("offloads did not settle")


async def flush_g1(eng: NativeEngine, seed: int = 1000) -> None:
    """Fill G1 with other prompts until every earlier block is evicted (and, write-back, offloaded)."""
    for i in range(3):
        await generate(eng, prompt(eng.core.pool.num_blocks * BLOCK // 2, seed + i), n=1)
        await settle(eng)


async def serve_then_evict(eng: NativeEngine, tokens: list[int]) -> list[int]:
    """Serve `tokens` once (cold), let its blocks reach the lower tiers, evict them from G1."""
    out, _ = await generate(eng, tokens)
    await settle(eng, timeout=30)
    await flush_g1(eng)
    return out


def block_hashes(eng: NativeEngine, tokens: list[int]) -> list[int]:
    hasher = BlockHasher(BLOCK, root_hash(eng.core.fingerprint, ""), b"")
    hasher.extend(tokens)
    return list(hasher.hashes)


def tier(eng: NativeEngine, name: str) -> TierCounters:
    return next(t for t in eng.stats().tiers if t.tier == name)

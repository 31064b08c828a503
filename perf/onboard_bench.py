"""Time to first token of a long prompt: cold prefill vs onboarded from G2 vs from G3 (issue #5).

    python -m kvrelay.perf.onboard_bench [--tokens 4096] [--repeats 7] [--model DIR] [--dir DIR]

Three native engines on the same model, each with a G1 pool that holds just one prompt, so two prompts
A and B served in turn evict each other from G1 every time:
- cold: no lower tier; every request prefills all its tokens.
- G2: host memory only (`--kv-host-bytes`); A's blocks come back from G2.
- G3: disk only (O_DIRECT where the filesystem allows it); A's blocks come back from disk.
Each run is one request with max_tokens=1, timed from `generate()` to its first token (lookup, onboard
and the prefill of the last partial block included). The three engines alternate within a repeat, so
machine noise hits all of them alike. Goals: G2 >= 20x, G3 >= 10x faster than cold.
Onboarding is forced on (`onboard="always"`) so the tiers are measured even where the cost model would
decline; the printed cost-model numbers show what it would decide.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from typing import Any

from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig


async def ttft(eng: NativeEngine, tokens: list[int]) -> tuple[float, int]:
    req = EngineRequest(request_id=f"b{time.monotonic_ns()}", prompt_token_ids=tokens,
                        sampling=SamplingParams(max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    async for out in eng.generate(req):
        return time.perf_counter() - t0, out.num_cached_tokens
    raise RuntimeError("no output")


def _tiers(eng: NativeEngine) -> Any:
    """The engine's tier source loop half (TiersLoop), or None."""
    return eng.loops.get("tiers") if eng.loops is not None else None


async def settle(eng: NativeEngine) -> None:
    while True:
        tiers = _tiers(eng)
        if tiers is not None:
            await tiers.drain()
        await asyncio.sleep(0.02)
        if eng.stats().offload_pinned == 0:
            return


async def main(args: argparse.Namespace) -> dict:
    model = args.model
    if not model:
        from kvrelay.workers.models.tiny import ensure_tiny_model

        model = str(ensure_tiny_model())
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 2000) for _ in range(args.tokens)] for _ in range(2)]
    blocks = args.tokens // 16 + 8  # one prompt fits, two do not
    base = dict(model=model, num_blocks=blocks, limits=EngineLimits(max_model_len=args.tokens + 16,
                                                                   max_num_batched_tokens=args.tokens + 16))
    workdir = args.dir or tempfile.mkdtemp(prefix="onboard-bench-")
    engines = {
        "cold": NativeEngine(NativeEngineConfig(**base)),
        "G2": NativeEngine(NativeEngineConfig(**base, tiers=TierConfig(
            host_bytes=4 * blocks * (1 << 15) * 4, disk_dir="off", onboard="always"))),
        "G3": NativeEngine(NativeEngineConfig(**base, tiers=TierConfig(
            host_bytes=0, disk_dir=workdir, disk_bytes=1 << 30, onboard="always"))),
    }
    for eng in engines.values():
        await eng.start()
    times: dict[str, list[float]] = {k: [] for k in engines}
    cached: dict[str, list[int]] = {k: [] for k in engines}
    try:
        for eng in engines.values():  # warm up: both prompts seen once (and offloaded)
            for p in prompts:
                await ttft(eng, p)
                await settle(eng)
        for r in range(args.repeats):
            for name, eng in engines.items():
                p = prompts[r % 2]
                t, c = await ttft(eng, p)
                times[name].append(t)
                cached[name].append(c)
                await settle(eng)
        cost = _tiers(engines["G2"]).tiers.cost if _tiers(engines["G2"]) else None
        result = {
            "tokens": args.tokens, "repeats": args.repeats,
            "block_bytes": engines["cold"].kv_layout().block_bytes,
            "median_ttft_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()},
            "cached_tokens": {k: statistics.median(v) for k, v in cached.items()},
            "speedup_vs_cold": {k: round(statistics.median(times["cold"]) / statistics.median(times[k]), 1)
                                for k in ("G2", "G3")},
            "g3_direct_io": (_tiers(engines["G3"]).tiers.stores[0].direct_io
                         if _tiers(engines["G3"]) else None),
            "prefill_tokens_per_s": round(cost.prefill_tokens_per_s) if cost else None,
        }
    finally:
        for eng in engines.values():
            await eng.close()
    return result


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="")
    ap.add_argument("--dir", default="", help="G3 directory (default: a new temporary directory)")
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))  # noqa: T201


if __name__ == "__main__":
    cli()

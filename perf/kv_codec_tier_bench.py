"""KV codecs in the tiers (issue 32): TTFT of a long prompt onboarded from G3 and from G4 per codec, and
how many blocks a fixed G3 budget holds (with the multi-turn prefix hit rate it gives) per codec.

    python -m kvrelay.perf.kv_codec_tier_bench ttft [--tokens 4000] [--repeats 3] [--tiers G3 G4]
    python -m kvrelay.perf.kv_codec_tier_bench hitrate [--g3-blocks 48] [--users 6] [--turns 4]

Native engine, SmolLM2-135M-Instruct by default (float32 KV, 720 KiB per 16-token block: its real values,
so the codecs' ratios are the real ones), `--kv-onboard always`, one engine at a time (`--codecs`, `none`
first), the same prompts for every codec.

ttft: the G1 pool holds one prompt, so two prompts A and B of `--tokens` random token ids served in turn
evict each other; write-back puts each into the tier (G3 on this machine's disk, G4 on a moto S3 server
on loopback started here). TTFT = `generate()` to the first token of max_tokens=1, lookup, onboard
(I/O and decode) and the last partial block's prefill included; median of `--repeats` per prompt, after
one warm-up round. A cold engine (no tier) gives the reference.

hitrate: `--users` conversations of `--turns` turns (each turn the whole history + `--input-len` new
tokens, `--output-len` greedy tokens), turns taken round-robin across users, so G1 (`--g1-blocks`) holds
about one conversation and the rest must come back from G3, whose budget is `--g3-blocks` raw blocks
(the same bytes for every codec). Reported: prefix hit rate (cached / prompt tokens over all turns after
the first), G3 blocks held at the end and the most it held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.kvbm.tiers.disk_index import DiskIndex
from kvrelay.perf.kv_codec_bench import settle
from kvrelay.runtime.free_port import free_port
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig
from kvrelay.workers.models.registry import resolve_model

CODECS = ["none", "lossless", "fp16", "int8", "int7z", "int6z"]


async def serve(eng: NativeEngine, tokens: list[int], n: int = 1) -> tuple[float, int, list[int]]:
    """(seconds to the first token, prompt tokens from cache, output tokens)."""
    req = EngineRequest(request_id=f"t{time.monotonic_ns()}", prompt_token_ids=tokens,
                        sampling=SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
    t0, first, cached = time.perf_counter(), 0.0, 0
    out: list[int] = []
    async for o in eng.generate(req):
        if not out and o.token_ids:
            first = time.perf_counter() - t0
        out += o.token_ids
        cached = max(cached, o.num_cached_tokens)
    return first, cached, out


def tier_stats(eng: NativeEngine, name: str) -> Any:
    return next(t for t in eng.stats().tiers if t.tier == name)


class Moto:
    """A moto S3 server on a loopback port (the G4 of this benchmark)."""

    def __init__(self, workdir: Path):
        import os
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}.items():
            os.environ.setdefault(k, v)  # moto accepts any credentials; the workers' S3 client needs some

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "moto.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                httpx.get(self.url + "/", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("moto did not start")

    def bucket_url(self) -> str:
        name = f"kvrelay-{uuid.uuid4().hex[:12]}"
        httpx.put(f"{self.url}/{name}", timeout=10).raise_for_status()  # moto takes an unsigned CreateBucket
        return f"s3://{name}?endpoint={self.url}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def tier_config(tier: str, codec: str, workdir: Path, moto: Moto | None, disk_bytes: int) -> TierConfig | None:
    if tier == "cold":
        return None
    if tier == "G3":
        return TierConfig(host_bytes=0, disk_dir=str(workdir / f"g3-{codec}-{uuid.uuid4().hex[:6]}"),
                          disk_bytes=disk_bytes, onboard="always", compress_g3=codec)
    assert moto is not None
    return TierConfig(host_bytes=0, disk_dir="off", object_store=moto.bucket_url(), object_bytes=disk_bytes,
                      onboard="always", compress_g4=codec)


async def ttft(args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 2000) for _ in range(args.tokens)] for _ in range(2)]
    blocks = args.tokens // 16 + 8  # one prompt fits, two do not
    base = dict(model=model, num_blocks=blocks,
                limits=EngineLimits(max_model_len=args.tokens + 16, max_num_batched_tokens=args.tokens + 16))
    moto = Moto(workdir) if "G4" in args.tiers else None
    runs = [("cold", "none")] + [(t, c) for t in args.tiers for c in args.codecs]
    out: dict[str, Any] = {}
    try:
        for tier, codec in runs:
            eng = NativeEngine(NativeEngineConfig(**base, tiers=tier_config(tier, codec, workdir, moto, 4 << 30)))
            await eng.start()
            try:
                for p in prompts:  # warm-up: both prompts served once (and written back)
                    await serve(eng, p)
                    await settle(eng)
                times, cached = [], []
                for r in range(2 * args.repeats):
                    t, c, _ = await serve(eng, prompts[r % 2])
                    times.append(t)
                    cached.append(c)
                    await settle(eng)
                row: dict[str, Any] = {"ttft_ms_median": round(statistics.median(times) * 1e3, 1),
                                       "ttft_ms": [round(t * 1e3, 1) for t in times],
                                       "cached_tokens_median": statistics.median(cached)}
                if tier != "cold":
                    st = tier_stats(eng, tier)
                    row["stored_bytes_per_block"] = round(st.used_bytes / max(1, st.blocks))
                    row["onboard_GBps"] = round(st.onboard_bytes / max(1e-9, st.onboard_seconds) / 1e9, 3)
                out[f"{tier}/{codec}" if tier != "cold" else "cold"] = row
                print(f"{tier}/{codec}: {row['ttft_ms_median']} ms", file=sys.stderr, flush=True)
            finally:
                await eng.close()
    finally:
        if moto is not None:
            moto.stop()
    cold = out["cold"]["ttft_ms_median"]
    for v in out.values():
        v["speedup_vs_cold"] = round(cold / v["ttft_ms_median"], 2)
    return {"tokens": args.tokens, "repeats": args.repeats, "runs": out}


async def hitrate(args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    rng = random.Random(1)
    users = [[rng.randrange(4, 2000) for _ in range(args.input_len)] for _ in range(args.users)]
    turns = [[[rng.randrange(4, 2000) for _ in range(args.input_len)] for _ in range(args.users)]
             for _ in range(args.turns - 1)]
    max_len = args.turns * (args.input_len + args.output_len) + 32
    base = dict(model=model, num_blocks=args.g1_blocks,
                limits=EngineLimits(max_model_len=max_len, max_num_batched_tokens=max_len))
    probe = NativeEngine(NativeEngineConfig(**base))
    await probe.start()
    block_bytes = probe.kv_layout().block_bytes
    await probe.close()
    slot = -(-block_bytes // 4096) * 4096
    budget = args.g3_blocks * slot + DiskIndex.max_bytes(args.g3_blocks)  # what holds g3_blocks raw blocks
    out: dict[str, Any] = {"g3_budget_bytes": budget, "raw_block_bytes": block_bytes}
    for codec in args.codecs:
        eng = NativeEngine(NativeEngineConfig(**base, tiers=tier_config("G3", codec, workdir, None, budget)))
        await eng.start()
        try:
            history = [list(u) for u in users]
            prompt_tokens = cached_tokens = most = 0
            for t in range(args.turns):
                for u in range(args.users):
                    if t:
                        history[u] += turns[t - 1][u]
                    _, cached, gen = await serve(eng, history[u], args.output_len)
                    history[u] += gen
                    await settle(eng)
                    if t:  # the first turn has nothing to hit
                        prompt_tokens += len(history[u]) - len(gen)
                        cached_tokens += cached
                    most = max(most, tier_stats(eng, "G3").blocks)
            st = tier_stats(eng, "G3")
            out[codec] = {"hit_rate": round(cached_tokens / max(1, prompt_tokens), 4), "g3_blocks_end": st.blocks,
                          "g3_blocks_max": most, "g3_used_bytes": st.used_bytes,
                          "g3_footprint_bytes": st.footprint_bytes, "g3_evictions": st.evictions}
            print(f"{codec}: {out[codec]}", file=sys.stderr, flush=True)
        finally:
            await eng.close()
    none = out.get("none", {}).get("g3_blocks_max")
    if none:
        for codec in args.codecs:
            out[codec]["blocks_vs_none"] = round(out[codec]["g3_blocks_max"] / none, 2)
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    model = str(resolve_model(args.model).path)
    with tempfile.TemporaryDirectory(prefix="kv-codec-tier-bench-") as d:
        fn = ttft if args.what == "ttft" else hitrate
        return {"model": args.model, args.what: await fn(args, model, Path(d))}


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["ttft", "hitrate"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--codecs", nargs="+", default=CODECS)
    ap.add_argument("--tokens", type=int, default=4000, help="ttft: prompt length")
    ap.add_argument("--repeats", type=int, default=3, help="ttft: timed requests per prompt")
    ap.add_argument("--tiers", nargs="+", default=["G3", "G4"], help="ttft: where the KV comes back from")
    ap.add_argument("--g3-blocks", type=int, default=48, help="hitrate: the G3 budget, in raw blocks")
    ap.add_argument("--g1-blocks", type=int, default=40, help="hitrate: the G1 pool, in blocks")
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=96, help="hitrate: new tokens per turn")
    ap.add_argument("--output-len", type=int, default=16)
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))  # noqa: T201


if __name__ == "__main__":
    cli()

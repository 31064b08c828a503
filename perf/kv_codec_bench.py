"""KV codecs (kvbm/codecs): size, speed, and what the lossy ones do to the real model's output.

    python -m kvrelay.perf.kv_codec_bench [--prompts 20] [--model smollm2-135m-instruct] [--tokens 64]

Prompts: `--prompts N` windows of 500-2,000 tokens (lengths and offsets from a fixed seed) of one fixed
text: kvrelay's own docs (README.md, docs/*.md, kvbm/README.md, sorted), tokenized by the model. The
same N prompts on every run of the same tree.

Quality, per codec (native engine, the model's dtype, float32 for SmolLM2): one engine with no tier
(cold) and one per codec with G3 only (`--kv-compress-g3 <codec>`, `--kv-onboard always`) and a G1 pool
that holds one prompt. Each prompt is served once on the G3 engine, a flush prompt evicts it from G1
(write-back puts it into G3), and the prompt is served again, now from G3 (checked: cached tokens).
Reported against cold: first-token agreement, greedy `--tokens` continuations identical (and the mean
common prefix), and perplexity of each run's own greedy continuation (exp of minus the mean chosen-token
logprob; the goal for a lossy codec is within 1% of cold's).

Size and speed, per codec and dtype (the model's float32 KV, and the same values as bfloat16): bytes
per token (block frame / block_size, raw = the engine dtype's), and encode/decode throughput over the
real KV blocks the cold engine left in G1, in raw GB/s, against one torch `copy_` of the same bytes,
on this machine (single thread per call, as a tier's worker thread runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kvrelay.kvbm.codecs.registry import make_codec
from kvrelay.kvbm.codecs.shape import BlockShape
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native import NativeEngine, NativeEngineConfig
from kvrelay.workers.models.registry import resolve_model

REPO = Path(__file__).resolve().parents[1]
LOSSY = ["int8"]
MIN_LEN, MAX_LEN = 500, 2000


def text_prompts(model_dir: Path, n: int) -> tuple[list[list[int]], list[int]]:
    """(n prompts of 500-2,000 tokens, one flush prompt) cut from kvrelay's docs, deterministically."""
    from tokenizers import Tokenizer

    files = sorted([REPO / "README.md", REPO / "kvbm" / "README.md", *(REPO / "docs").glob("*.md")])
    text = "\n\n".join(f.read_text() for f in files if f.exists())
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
    rng = random.Random(0)
    prompts = []
    for _ in range(n):
        length = rng.randrange(MIN_LEN, MAX_LEN + 1)
        start = rng.randrange(0, max(1, len(ids) - length))
        prompts.append((ids * 2)[start:start + length])  # doubled: a short text still yields windows
    flush = list(reversed(ids))[:MAX_LEN + 200]  # shares no block with any prompt
    return prompts, flush


async def run(eng: NativeEngine, tokens: list[int], n: int) -> tuple[list[int], list[float], int]:
    req = EngineRequest(request_id=f"q{time.monotonic_ns()}", prompt_token_ids=tokens,
                        sampling=SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, logprobs=True))
    out, lps, cached = [], [], 0
    async for o in eng.generate(req):
        out += o.token_ids
        lps += o.logprobs or []
        cached = max(cached, o.num_cached_tokens)
    return out, lps, cached


async def settle(eng: NativeEngine) -> None:
    tiers = eng.loops.get("tiers") if eng.loops is not None else None
    while True:
        if tiers is not None:
            await tiers.drain()
        await asyncio.sleep(0.02)
        if eng.stats().offload_pinned == 0:
            return


def ppl(lps: list[float]) -> float:
    return math.exp(-sum(lps) / max(1, len(lps)))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


async def quality(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]], flush: list[int],
                  workdir: str) -> tuple[dict[str, Any], NativeEngine]:
    blocks = (len(flush) + args.tokens) // 16 + 8  # one prompt (or the flush) fits, two do not
    limits = EngineLimits(max_model_len=blocks * 16, max_num_batched_tokens=MAX_LEN + 256)
    base = dict(model=str(model_dir), num_blocks=blocks, limits=limits)
    cold_eng = NativeEngine(NativeEngineConfig(**base))
    await cold_eng.start()
    cold = [await run(cold_eng, p, args.tokens) for p in prompts]
    report: dict[str, Any] = {}
    for codec in args.codecs:
        eng = NativeEngine(NativeEngineConfig(**base, tiers=TierConfig(
            host_bytes=0, disk_dir=f"{workdir}/{codec}", disk_bytes=8 << 30, onboard="always",
            compress_g3=codec)))
        await eng.start()
        rows: list[dict[str, Any]] = []
        try:
            for p, (ref, ref_lps, _) in zip(prompts, cold, strict=True):
                await run(eng, p, 1)
                await settle(eng)
                await run(eng, flush, 1)  # evicts p from G1; write-back has put p's blocks into G3
                await settle(eng)
                out, lps, cached = await run(eng, p, args.tokens)
                await run(eng, flush, 1)  # and evict again, so the next prompt starts alike
                await settle(eng)
                rows.append({"len": len(p), "from_g3": cached, "first": out[:1] == ref[:1], "all": out == ref,
                             "prefix": common_prefix(out, ref), "ppl": ppl(lps), "ppl_cold": ppl(ref_lps)})
        finally:
            await eng.close()
        rel = [abs(r["ppl"] / r["ppl_cold"] - 1) for r in rows]
        report[codec] = {
            "prompts": len(rows),
            "loaded_from_g3_tokens_mean": round(statistics.mean(r["from_g3"] for r in rows)),
            "first_token_agreement": sum(r["first"] for r in rows) / len(rows),
            "continuation_identical": sum(r["all"] for r in rows) / len(rows),
            "common_prefix_mean": round(statistics.mean(r["prefix"] for r in rows), 1),
            "ppl_rel_diff_mean": round(statistics.mean(rel), 5),
            "ppl_rel_diff_max": round(max(rel), 5),
            "ppl_within_1pct": all(x <= 0.01 for x in rel),
        }
    return report, cold_eng


def size_and_speed(eng: NativeEngine, repeats: int) -> dict[str, Any]:
    """Over the blocks the engine's prefix cache holds: real KV of the prompts just served."""
    layout = eng.kv_layout()
    assert eng.core is not None
    ids = sorted({b.block_id for b in eng.core.pool.cached.values()})
    used_blocks = len(ids)
    rows = eng.core.kv_rows()[ids].clone()
    out: dict[str, Any] = {}
    for dtype in (layout.dtype, "bfloat16"):
        shape = BlockShape(dtype, layout.num_layers * 2, layout.block_size, layout.num_kv_heads * layout.head_dim)
        src = rows.view(-1).view(getattr(torch, layout.dtype)).to(shape.torch_dtype)
        blocks = list(src.view(torch.uint8).view(used_blocks, -1))
        nbytes = used_blocks * shape.block_bytes
        dst = torch.empty_like(src)
        copy_s = best(repeats, partial(torch.Tensor.copy_, dst, src))
        entry: dict[str, Any] = {"raw_bytes_per_token": shape.block_bytes // shape.tokens,
                                 "copy_GBps": round(nbytes / copy_s / 1e9, 2)}
        for name in ("lossless", "int8"):
            codec = make_codec(name, shape)
            assert codec is not None
            frames = [codec.encode(b) for b in blocks]
            enc_s = best(repeats, partial(encode_all, codec, blocks))
            outs = list(torch.empty((used_blocks, shape.block_bytes), dtype=torch.uint8))
            pairs = [(memoryview(bytearray(f)), o) for f, o in zip(frames, outs, strict=True) if f is not None]
            dec_s = best(repeats, partial(decode_all, codec, pairs))
            sizes = [len(f) for f in frames if f is not None]
            entry[name] = {"bytes_per_token": round(statistics.mean(sizes) / shape.tokens, 1),
                           "ratio": round(shape.block_bytes / statistics.mean(sizes), 3),
                           "encode_GBps": round(nbytes / enc_s / 1e9, 3), "decode_GBps": round(nbytes / dec_s / 1e9, 3),
                           "decode_vs_copy": round(copy_s / dec_s, 4)}
        out[dtype] = entry
    return out


def encode_all(codec: Any, blocks: list[torch.Tensor]) -> None:
    for b in blocks:
        codec.encode(b)


def decode_all(codec: Any, pairs: list[tuple[memoryview, torch.Tensor]]) -> None:
    for f, o in pairs:
        assert codec.decode(f, o)


def best(repeats: int, fn: Any) -> float:
    """The fastest of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    model_dir = resolve_model(args.model).path
    prompts, flush = text_prompts(model_dir, args.prompts)
    with tempfile.TemporaryDirectory(prefix="kv-codec-bench-") as workdir:
        report, cold_eng = await quality(args, model_dir, prompts, flush, workdir)
        try:
            dtype = cold_eng.kv_layout().dtype
            speed = size_and_speed(cold_eng, args.repeats)
        finally:
            await cold_eng.close()
    return {"model": args.model, "dtype": dtype,
            "prompt_lengths": [len(p) for p in prompts], "continuation_tokens": args.tokens,
            "quality_vs_cold": report, "size_and_speed": speed}


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64, help="greedy continuation length")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--codecs", nargs="+", default=["lossless", *LOSSY], help="G3 codecs to compare with cold")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is kept)")
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))  # noqa: T201


if __name__ == "__main__":
    cli()

"""kvrelay's tiers under vLLM (issue 16's benchmark). Run it from the vLLM virtualenv:

    $VENV/bin/python -m kvrelay.perf.vllm_tier_bench [--tokens 2000] [--repeats 5] [--out DIR]

1. TTFT of a repeated prompt that vLLM's own KV cache no longer holds, side by side on one
   `kvrelay serve --engine vllm` worker (float32, eager, block 32, a G1 of 72 blocks, G2 of 140 blocks,
   G3 on local disk; the cost model decides as in production). Per repeat, a fresh random prompt P:
   (a) cold: P computed for the first time; then another prompt evicts it from G1, and
   (c) G2: P again, loaded from host memory; then three more prompts push it out of G2 too, and
   (d) G3: P again, loaded from disk. (b), vLLM's native CPU offloading (its OffloadingConnector),
   runs only on CUDA/XPU (vLLM 0.32's CPU offload worker is CUDA-only), so it is reported as blocked
   on a CPU machine. A second worker with the tiers off gives (a') cold without them: the price of
   the connector on a cold prompt. TTFT: a streamed request, timed to its first token.
2. The save path: bytes per second of copying new full blocks out of vLLM's per-layer layout into
   the tiers, vs a plain torch `copy_` of the same bytes, in-process on tensors shaped like vLLM's CPU
   cache for SmolLM2 (30 layers): the gather kernel alone; then in a worker half with its tiers open,
   (i) the gather into staging rows, which is what vLLM's step waits for (`wait_for_save`), and
   (ii) gather plus the G2 write that follows on the tier loop (a second copy, on another thread). Each round starts with the machine quiet: on few cores, OpenMP worker
   threads left spinning by the tier loop's last copy slow any copy that follows.
Results: DIR/results.json and a table on stdout. Goals: (c) >= 10x (a), (d) >= 5x (a), (c) >= 1.0x (b),
save path >= 0.8x a torch copy.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from kvrelay.perf.serve_process import Serve
from kvrelay.workers.models.registry import SMOLLM2, resolve_model

BS = 32
TOKEN_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M, float32
MODEL = "smollm2"


def ttft(base_url: str, prompt: list[int], salt: str = "") -> tuple[float, int]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if salt:
        body["cache_salt"] = salt
    t0 = time.perf_counter()
    first = None
    cached = 0
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return first or 0.0, cached


def serve(tmp: Path, *tiers: str) -> Serve:
    tmp.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model(SMOLLM2).path)
    return Serve(tmp, "--engine", "vllm", "--dtype", "float32", "--block-size", str(BS),
                 "--vllm-args=--enforce-eager", "--max-model-len", "2048",
                 "--kv-cache-bytes", str(72 * BS * TOKEN_BYTES), *tiers, workers=1, model=model,
                 env={"KVRELAY_SERVED_MODEL_NAME": MODEL}).start(timeout=600)


def ttft_arms(args: argparse.Namespace, out: Path) -> dict:
    rng = random.Random(16)

    def prompt() -> list[int]:
        return [rng.randrange(3, 49000) for _ in range(args.tokens)]

    on = serve(out / "tiers", "--kv-host-bytes", str(140 * BS * TOKEN_BYTES), "--kv-disk-dir",
               str(out / "g3"), "--kv-disk-bytes", "2GiB")
    off = serve(out / "off", "--kv-host-bytes", "0", "--kv-disk-dir", "off")
    rows: dict[str, list[float]] = {"a_cold": [], "a_cold_tiers_off": [], "c_g2": [], "d_g3": []}
    cached: dict[str, list[int]] = {k: [] for k in rows}
    try:
        ttft(on.base_url, prompt())  # warm-up: first-request costs out of the numbers
        ttft(off.base_url, prompt())
        for _ in range(args.repeats):
            p = prompt()
            for arm, srv in (("a_cold", on), ("a_cold_tiers_off", off)):
                t, c = ttft(srv.base_url, p)
                rows[arm].append(t)
                cached[arm].append(c)
            ttft(on.base_url, prompt())  # 63 more blocks: vLLM evicts P's (LRU), G2 keeps both
            t, c = ttft(on.base_url, p)
            rows["c_g2"].append(t)
            cached["c_g2"].append(c)
            for _ in range(3):
                ttft(on.base_url, prompt())
            t, c = ttft(on.base_url, p)
            rows["d_g3"].append(t)
            cached["d_g3"].append(c)
    finally:
        on.stop()
        off.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"ttft_s": rows, "cached_tokens": cached, "median_s": med,
            "speedup_vs_cold": {"c_g2": med["a_cold"] / med["c_g2"], "d_g3": med["a_cold"] / med["d_g3"],
                                "a_cold_tiers_off": med["a_cold"] / med["a_cold_tiers_off"]},
            "b_vllm_cpu_offload": "blocked: vLLM 0.32's CPU offloading worker needs CUDA or XPU"}


def save_path(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from kvrelay.kernels.layer_pages import LayerPages, gather_layer_pages
    from kvrelay.kvbm.tier_config import TierConfig
    from kvrelay.workers.core.kv_sources.tiers import TierSave
    from kvrelay.workers.engines.vllm.tier_runtime import TierRuntime, TierSettings
    from kvrelay.workers.engines.vllm.tier_worker import TierWorker

    num_blocks, n = 256, 62  # a 2,000-token prompt's full blocks
    caches = {f"model.layers.{i}.attn": torch.randn(num_blocks, 3, BS, 128) for i in range(30)}
    block_bytes = BS * TOKEN_BYTES
    settings = TierSettings(key=str(out), fingerprint="bench", block_size=BS, staging_bytes=2 * n * block_bytes,
                            tiers=TierConfig(host_bytes=(args.repeats * 2 + 2) * n * block_bytes, disk_dir="off"))
    src = torch.randn(n * block_bytes // 4)
    dst = torch.empty_like(src)
    ids = list(range(40, 40 + n))
    # (i) alone: the conversion kernel and the copy, back to back, nothing else in the process
    pages = [LayerPages.of(c, num_blocks) for c in caches.values()]
    alone_rows = torch.zeros((n, block_bytes), dtype=torch.uint8)
    alone, alone_copy = [], []
    for _ in range(args.repeats * 3):
        t0 = time.perf_counter()
        dst.copy_(src)
        alone_copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gather_layer_pages(pages, ids, alone_rows, list(range(n)))
        alone.append(time.perf_counter() - t0)
    del alone_rows
    rt = TierRuntime(settings)
    worker = TierWorker(rt, num_blocks)
    worker.register(caches)
    gather, full, copy = [], [], []
    try:
        for r in range(args.repeats * 2):
            time.sleep(0.3)  # the tier loop's OpenMP team (the last G2 write) stops spinning first
            t0 = time.perf_counter()
            dst.copy_(src)
            copy.append(time.perf_counter() - t0)
            rows = rt.take_rows(n, save=True)
            assert rows is not None and len(rows) == n and rt.rows is not None
            t0 = time.perf_counter()
            gather_layer_pages(worker.pages, ids, rt.rows, rows)
            gather.append(time.perf_counter() - t0)
            rt.give_rows(rows, save=True)
            hashes = [(r + 1) * 1_000_003 + i for i in range(n)]  # new blocks every time
            t0 = time.perf_counter()
            worker.save([TierSave(hashes, ids)])
            while rt.rows_in_use:
                time.sleep(0.0002)
            full.append(time.perf_counter() - t0)
    finally:
        rt.close()
    nbytes = n * block_bytes
    best = {k: min(v) for k, v in (("copy_alone", alone_copy), ("gather_alone", alone), ("copy", copy),
                                   ("gather", gather), ("gather_and_g2", full))}
    gbps = {k: nbytes / v / 1e9 for k, v in best.items()}
    return {"bytes": nbytes, "best_s": best, "GB_per_s": gbps,
            "ratio_vs_copy": {"gather_alone": gbps["gather_alone"] / gbps["copy_alone"],
                              "gather": gbps["gather"] / gbps["copy"],
                              "gather_and_g2": gbps["gather_and_g2"] / gbps["copy"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--skip-ttft", action="store_true", help="only the save-path measurement")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kvrelay-vllm-tiers-"))
    out.mkdir(parents=True, exist_ok=True)
    result = {"save_path": save_path(args, out)}
    if not args.skip_ttft:
        result["ttft"] = ttft_arms(args, out)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    sp = result["save_path"]
    print(f"gather kernel alone: {sp['GB_per_s']['gather_alone']:.2f} GB/s vs copy {sp['GB_per_s']['copy_alone']:.2f}"
          f" ({sp['ratio_vs_copy']['gather_alone']:.2f}x)")
    print(f"save path in the worker, {sp['bytes'] / 2**20:.0f} MiB: torch copy {sp['GB_per_s']['copy']:.2f} GB/s, gather "
          f"{sp['GB_per_s']['gather']:.2f} GB/s ({sp['ratio_vs_copy']['gather']:.2f}x), gather + G2 "
          f"{sp['GB_per_s']['gather_and_g2']:.2f} GB/s ({sp['ratio_vs_copy']['gather_and_g2']:.2f}x)")
    if "ttft" in result:
        t = result["ttft"]
        for arm, s in t["median_s"].items():
            print(f"TTFT p50 {arm:18s} {s * 1000:8.1f} ms  cached {t['cached_tokens'][arm]}")
        print("speedup vs cold:", {k: round(v, 2) for k, v in t["speedup_vs_cold"].items()})
        print("(b) vLLM CPU offloading:", t["b_vllm_cpu_offload"])
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()

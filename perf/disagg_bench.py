"""Disaggregation benchmarks (issue #6), each side by side in one run.

handoff: a prefill worker process computes a prompt and holds it; a decode worker (in this process)
    takes the handle, allocates and pulls the blocks over NIXL. The handoff time runs from the decode
    engine receiving the request to the pull having finished (allocation, the engine-thread hops, the
    read and its release notification). Baseline: a bare `nixl_agent` in this same process READs the
    same blocks from the same prefill process into a buffer of its own — raw NIXL between the same
    two processes, same bytes (checked equal to what the decode worker pulled).
mixed: `kvrelay serve` aggregated (2 workers) vs disaggregated (1 prefill + 1 decode): steady decode
    streams run while long prompts arrive at a fixed rate; decode inter-token latency of the steady
    streams (p50, p99) and total output throughput.

    python -m kvrelay.perf.disagg_bench handoff --repeats 15
    python -m kvrelay.perf.disagg_bench mixed --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from kvrelay.perf.serve_process import Serve


# -- handoff -----------------------------------------------------------------------------------------------
def build_model(out: Path, layers: int, kv_heads: int, head_dim: int) -> Path:
    """A random-weight Llama checkpoint big enough that a 2,000-token prompt's KV is tens of MiB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=kv_heads * head_dim, intermediate_size=2 * kv_heads * head_dim,
                      num_hidden_layers=layers, num_attention_heads=kv_heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, dtype="float32")
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    from kvrelay.workers.models.tiny import ensure_tiny_model

    for name in ("tokenizer.json", "tokenizer_config.json"):  # same 2,048-token vocabulary
        shutil.copy(ensure_tiny_model() / name, out / name)
    return out


def handoff(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="disagg-bench-"))
    model = build_model(Path(args.model_dir or tmp / "model"), args.layers, args.kv_heads, args.head_dim)
    disc_dir = tmp / "discovery"
    common = ["--model", str(model), "--kv-cache-bytes", str(args.kv_cache_mib << 20),
                    "--kv-host-bytes", "0", "--kv-disk-dir", "off", "--discovery", "file",
              "--discovery-dir", str(disc_dir), "--events", "inproc", "--kv-transfer", "nixl",
              "--kv-host-bytes", "0", "--kv-disk-dir", "off"]  # the handoff alone, no tier traffic
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "kvrelay.cli.main", "worker", "--role", "prefill", *common],
                             stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout is not None  # PIPE
    try:
        line = child.stdout.readline()
        assert line.startswith("READY "), f"prefill worker did not start: {line!r}"
        return asyncio.run(_handoff(args, model, disc_dir, line.split()[1]))
    finally:
        child.terminate()
        child.wait(30)


async def _handoff(args: argparse.Namespace, model: Path, disc_dir: Path, prefill_addr: str) -> dict:
    import torch

    from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
    from kvrelay.runtime.events.inproc import InprocBroker, InprocEventPlane
    from kvrelay.transfer import decode_metadata, load_nixl_api
    from kvrelay.workers.api.client import WorkerClient
    from kvrelay.workers.api.messages import EngineRequest, SamplingParams
    from kvrelay.workers.config import WorkerConfig
    from kvrelay.workers.worker import Worker

    decode = Worker(WorkerConfig(role="decode", model=str(model), kv_cache_bytes=args.kv_cache_mib << 20,
                                 kv_transfer="nixl", kv_host_bytes=0, kv_disk_dir="off"),
                    make_discovery(DiscoveryConfig(discovery="file", discovery_dir=str(disc_dir))),
                    InprocEventPlane(InprocBroker()))
    await decode.start()
    pulled: dict[str, tuple[float, list[int]]] = {}  # request id -> (pull end, local block ids)
    puller = decode.puller
    assert puller is not None  # a decode worker has one once started
    real_pull = puller.pull

    async def timed_pull(handle, local_ids, start):
        assert start == 0, "the decode worker should hold none of a fresh random prompt"
        ok = await real_pull(handle, local_ids, start)
        pulled[handle.request_id] = (time.perf_counter(), local_ids)
        return ok

    puller.pull = timed_pull  # type: ignore[method-assign]  # a probe on this one instance: times each pull
    api = load_nixl_api()
    kv = decode.engine.kv_pool()
    block_bytes = decode.engine.kv_layout().block_bytes
    raw_buf = torch.empty_like(kv)
    raw = api.nixl_agent("bench-raw", api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    raw.register_memory(raw_buf)
    rpc = WorkerClient()
    rng = random.Random(1)
    ours, base, nbytes, peer = [], [], 0, None
    for i in range(args.repeats + 1):  # the first is a warm-up (connections, first-touch)
        prompt = [rng.randrange(3, 2000) for _ in range(args.tokens)]
        req = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                            sampling=SamplingParams(max_tokens=2, ignore_eos=True))
        async with rpc.prefill(prefill_addr, req) as stream:
            replies = [r async for r in stream]
        handle = replies[0].handle
        md = decode_metadata(handle.transfer_metadata)
        if peer is None:
            peer = raw.add_remote_agent(md.agent_metadata)
        remote_base = md.pool("g1").base_addr
        # ours: the decode engine takes the handle, allocates, pulls, then decodes one token
        t0 = time.perf_counter()
        async for _ in decode.engine.generate(msgspec_replace(req, handle)):
            pass
        t_end, local_ids = pulled[req.request_id]
        t_ours = t_end - t0
        # raw: the same remote blocks, one descriptor per block (as many as the handle has)
        loc = raw.get_xfer_descs([(raw_buf.data_ptr() + k * block_bytes, block_bytes, 0)
                                  for k in range(len(handle.block_ids))], "DRAM")
        rem = raw.get_xfer_descs([(remote_base + b * block_bytes, block_bytes, 0) for b in handle.block_ids],
                                 "DRAM")
        t0 = time.perf_counter()
        xfer = raw.initialize_xfer("READ", loc, rem, peer)
        state = raw.transfer(xfer)
        while state == "PROC":
            state = raw.check_xfer_state(xfer)
        t_raw = time.perf_counter() - t0
        raw.release_xfer_handle(xfer)
        assert state == "DONE", state
        n = len(handle.block_ids)
        assert torch.equal(raw_buf[:n], kv[local_ids[:n]]), "the decode worker pulled other bytes than raw NIXL"
        if i:
            ours.append(t_ours)
            base.append(t_raw)
            nbytes = n * block_bytes
    await rpc.close()
    await decode.close()
    med_ours, med_raw = statistics.median(ours), statistics.median(base)
    return {"tokens": args.tokens, "blocks": nbytes // block_bytes, "block_bytes": block_bytes, "bytes": nbytes,
            "repeats": args.repeats, "ours_ms_p50": med_ours * 1e3, "raw_ms_p50": med_raw * 1e3,
            "ours_gbps": nbytes / med_ours / 1e9, "raw_gbps": nbytes / med_raw / 1e9, "ratio": med_raw / med_ours}


def msgspec_replace(req, handle):
    import msgspec

    return msgspec.structs.replace(req, kv_handle=handle)


# -- mixed workload ----------------------------------------------------------------------------------------
async def _stream(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, gaps: list[float] | None) -> int:
    body = {"model": "kvrelay-tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    tokens, last = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if last is not None and gaps is not None:
                gaps.append(now - last)
            last = now
            tokens += 1  # one chunk per engine step for a lone stream; backlog merges are counted once
    return max_tokens if tokens else 0


async def mixed_run(base_url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(3)
    gaps: list[float] = []
    out_tokens = 0
    stop_at = time.perf_counter() + args.duration
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        async def steady():
            nonlocal out_tokens
            while time.perf_counter() < stop_at:
                out_tokens += await _stream(client, [rng.randrange(3, 2000) for _ in range(32)], args.decode_tokens,
                                            gaps)

        async def long_prompts():
            nonlocal out_tokens
            tasks = []
            while time.perf_counter() < stop_at:
                prompt = [rng.randrange(3, 2000) for _ in range(args.long_tokens)]
                tasks.append(asyncio.create_task(_stream(client, prompt, 8, None)))
                await asyncio.sleep(args.long_interval)
            out_tokens += sum(await asyncio.gather(*tasks))

        t0 = time.perf_counter()
        await asyncio.gather(long_prompts(), *(steady() for _ in range(args.streams)))
        elapsed = time.perf_counter() - t0
    gaps.sort()
    return {"itl_ms_p50": gaps[len(gaps) // 2] * 1e3, "itl_ms_p99": gaps[int(len(gaps) * 0.99)] * 1e3,
            "itl_samples": len(gaps), "output_tok_s": out_tokens / elapsed, "seconds": elapsed}


def mixed(args: argparse.Namespace) -> dict:
    results = {}
    shapes = {"aggregated": (["--workers", "2"]),
              "disaggregated": ["--prefill-workers", "1", "--decode-workers", "1", "--disagg-min-tokens", "1024"]}
    model = build_model(Path(args.model_dir or tempfile.mkdtemp(prefix="mixed-model-")), args.layers,
                        args.kv_heads, args.head_dim)
    for name, flags in shapes.items():
        tmp = Path(tempfile.mkdtemp(prefix=f"mixed-{name}-"))
        srv = Serve(tmp, *flags, "--max-num-batched-tokens", str(args.max_batched), "--model", str(model),
                    "--served-model-name", "kvrelay-tiny", "--kv-cache-bytes", str(args.kv_cache_mib << 20),
                    "--kv-host-bytes", "0", "--kv-disk-dir", "off",
                    workers=None).start()
        try:
            deadline = time.monotonic() + 60
            while "with workers:" not in srv.read_log() or httpx.get(f"{srv.base_url}/ready").json()["workers"] < 2:
                assert time.monotonic() < deadline, srv.read_log()
                time.sleep(0.05)
            results[name] = asyncio.run(mixed_run(srv.base_url, args))
        finally:
            srv.stop()
    a, d = results["aggregated"], results["disaggregated"]
    results["itl_p99_agg_over_disagg"] = a["itl_ms_p99"] / d["itl_ms_p99"]
    results["throughput_disagg_over_agg"] = d["output_tok_s"] / a["output_tok_s"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="which", required=True)
    h = sub.add_parser("handoff")
    h.add_argument("--tokens", type=int, default=2000)
    h.add_argument("--repeats", type=int, default=15)
    m = sub.add_parser("mixed")
    for a in (h, m):  # the model: random-weight Llama; KV per token = layers * 2 * kv_heads * head_dim * 4 B
        a.add_argument("--layers", type=int, default=8)
        a.add_argument("--kv-heads", type=int, default=8)
        a.add_argument("--head-dim", type=int, default=64)
        a.add_argument("--kv-cache-mib", type=int, default=512)
        a.add_argument("--model-dir", default="", help="reuse (or create) the model here")
    m.add_argument("--duration", type=float, default=40.0)
    m.add_argument("--streams", type=int, default=4)
    m.add_argument("--decode-tokens", type=int, default=128)
    m.add_argument("--long-tokens", type=int, default=2000)
    m.add_argument("--long-interval", type=float, default=2.0)
    m.add_argument("--max-batched", type=int, default=2048)
    args = p.parse_args()
    out = handoff(args) if args.which == "handoff" else mixed(args)
    print(json.dumps(out, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()

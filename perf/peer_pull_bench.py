"""The cluster KV pool (issue 31): time to first token of a long prompt on a worker that does not hold
it, pulled from a peer's G1 vs recomputed, side by side in one run.

Two real workers (native engine, real transfer engine: NIXL, or TCP with --transfer tcp) in this process,
on loopback, discovery in memory. Per repeat, with a fresh prompt each time: worker A computes it (cold);
worker B then serves it with `kv_peer` naming A (lease + pull of every full block, its last token
computed), and B computes another fresh prompt of the same length cold (recompute). Ratio = recompute /
pull TTFT, medians over the repeats.

`--g4` adds the third arm: a real S3 server (moto, `perf/moto_server.py`) as G4 shared by A and a third
worker C (both G4 only: no G2, no G3). A's blocks of each prompt are saved to G4 (write-back, once its
request let go of them; the bench waits until the objects are there), then C, which holds nothing,
serves the prompt from G4 (`onboard="always"`: the tier itself is timed, not the cost model's choice).

    python -m kvrelay.perf.peer_pull_bench --tokens 2000 --repeats 5            # SmolLM2 (the default model)
    python -m kvrelay.perf.peer_pull_bench --model tiny --tokens 2000 --repeats 5
    python -m kvrelay.perf.peer_pull_bench --tokens 2000 --repeats 3 --g4       # + fetched from G4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid

from kvrelay.perf.moto_server import MotoS3
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.discovery.mem import MemStore
from kvrelay.runtime.events.inproc import InprocBroker, InprocEventPlane
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import EngineRequest, KvPeer, SamplingParams
from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.worker import Worker


async def _ttft(client: WorkerClient, address: str, prompt: list[int], peer: KvPeer | None = None) -> tuple[float, int]:
    req = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt, kv_peer=peer,
                        sampling=SamplingParams(max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    cached = 0
    async with client.generate(address, req) as stream:
        async for out in stream:
            cached = out.num_cached_tokens
            break
    return time.perf_counter() - t0, cached


async def _saved_to_g4(s3: MotoS3, at_least: int, timeout: float = 120.0) -> int:
    """Waits until the bucket holds `at_least` objects (the holder's write-back is asynchronous)."""
    deadline = time.monotonic() + timeout
    while (n := await asyncio.to_thread(s3.objects)) < at_least:
        assert time.monotonic() < deadline, f"G4 holds {n} objects, {at_least} expected"
        await asyncio.sleep(0.05)
    return n


async def main(args: argparse.Namespace) -> dict:
    if args.g4:
        s3 = MotoS3().start()
        try:
            return await _run(args, s3)
        finally:
            s3.stop()
    return await _run(args, None)


async def _run(args: argparse.Namespace, s3: MotoS3 | None) -> dict:
    store, broker = MemStore(), InprocBroker()
    # No G2/G3 on any worker: G3's default directory outlives the run, and a later run's "fresh" prompts
    # (the same seed) would be onboarded from it instead of recomputed.
    common = dict(model=args.model, kv_transfer=args.transfer, kv_cache_bytes=args.kv_cache_mib << 20,
                  max_num_batched_tokens=args.tokens + 16, max_model_len=args.tokens + 64, metrics_port=-1,
                  kv_host_bytes=0, kv_disk_dir="off")
    cfg = WorkerConfig(**common)
    # A (holder) and C (the G4 arm's reader) share G4, A saves to it, C's hit can come from nowhere else.
    g4_cfg = WorkerConfig(**common, kv_object_store=s3.store_url(), kv_onboard="always") if s3 else cfg
    workers = []
    for c in (g4_cfg, cfg, *([g4_cfg] if s3 else [])):
        w = Worker(c, make_discovery(DiscoveryConfig(discovery="mem"), mem_store=store), InprocEventPlane(broker))
        await w.start()
        workers.append(w)
    a, b = workers[:2]
    g4_reader = workers[2] if s3 else None
    assert a.instance is not None and b.instance is not None
    addr_a, addr_b = a.instance.address, b.instance.address
    client = WorkerClient(RpcClient())
    rng = random.Random(0)
    vocab = 2000 if args.model == "tiny" else 40000

    def prompt() -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(args.tokens)]

    runs: dict[str, list[float]] = {"holder_cold": [], "pulled": [], "recomputed": [],
                                    **({"g4": []} if s3 else {})}
    cached_pulled: list[int] = []
    cached_recomputed: list[int] = []  # 0 each time, or the recompute arm is not one
    cached_g4: list[int] = []
    loads: list[float] = []
    try:
        await _ttft(client, addr_b, prompt())  # warm-up: first-call costs out of the runs
        if g4_reader is not None:
            assert g4_reader.instance is not None
            await _ttft(client, g4_reader.instance.address, prompt())
        for _ in range(args.repeats):
            p = prompt()
            t, _ = await _ttft(client, addr_a, p)
            runs["holder_cold"].append(t)
            peer = KvPeer(instance_id=a.instance_id, address=addr_a, blocks=len(p) // 16)
            t, cached = await _ttft(client, addr_b, p, peer)
            runs["pulled"].append(t)
            cached_pulled.append(cached)
            t, cached = await _ttft(client, addr_b, prompt())
            runs["recomputed"].append(t)
            cached_recomputed.append(cached)
            if s3 is not None and g4_reader is not None and g4_reader.instance is not None:
                # G4 holds C's warm-up prompt and A's prompts so far (each len // 16 full blocks; C's
                # onboarded blocks written back are the same objects): wait for this repeat's.
                await _saved_to_g4(s3, (len(runs["g4"]) + 2) * (len(p) // 16))
                t, cached = await _ttft(client, g4_reader.instance.address, p)
                runs["g4"].append(t)
                cached_g4.append(cached)
            loads.append(round(os.getloadavg()[0], 1))
        stats = b.engine.stats()
    finally:
        await client.close()
        for w in workers:
            await w.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": args.model, "tokens": args.tokens, "transfer": args.transfer, "repeats": args.repeats,
            "ttft_ms_median": {k: round(v * 1000, 2) for k, v in med.items()},
            "ttft_ms_runs": {k: [round(x * 1000, 2) for x in v] for k, v in runs.items()},
            "cached_tokens_pulled": cached_pulled, "cached_tokens_recomputed": cached_recomputed,
            "peer_pulled_blocks": stats.peer_pulled_blocks,
            "peer_pull_failures": stats.peer_pull_failures,
            "recompute_over_pull": round(med["recomputed"] / med["pulled"], 2),
            **({"cached_tokens_g4": cached_g4, "g4_over_pull": round(med["g4"] / med["pulled"], 2),
                "recompute_over_g4": round(med["recomputed"] / med["g4"], 2)} if s3 else {}),
            "load_average_per_repeat": loads}


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=WorkerConfig().model)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transfer", default="auto", choices=("auto", "nixl", "tcp"))
    ap.add_argument("--kv-cache-mib", type=int, default=512)
    ap.add_argument("--g4", action="store_true", help="add the G4 arm (starts a moto S3 server)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = asyncio.run(main(args))
    text = json.dumps(out, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)  # noqa: T201


if __name__ == "__main__":
    cli()

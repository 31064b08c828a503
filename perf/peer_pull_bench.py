"""The cluster KV pool (issue 31): time to first token of a long prompt on a worker that does not hold
it, pulled from a peer's G1 vs recomputed, side by side in one run.

Two real workers (native engine, real transfer engine: NIXL, or TCP with --transfer tcp) in this process,
on loopback, discovery in memory. Per repeat, with a fresh prompt each time: worker A computes it (cold);
worker B then serves it with `kv_peer` naming A (lease + pull of every full block, its last token
computed), and B computes another fresh prompt of the same length cold (recompute). Ratio = recompute /
pull TTFT, medians over the repeats.

    python -m kvrelay.perf.peer_pull_bench --tokens 2000 --repeats 5            # SmolLM2 (the default model)
    python -m kvrelay.perf.peer_pull_bench --model tiny --tokens 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid

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


async def main(args: argparse.Namespace) -> dict:
    store, broker = MemStore(), InprocBroker()
    cfg = WorkerConfig(model=args.model, kv_transfer=args.transfer, kv_cache_bytes=args.kv_cache_mib << 20,
                       max_num_batched_tokens=args.tokens + 16, max_model_len=args.tokens + 64, metrics_port=-1)
    workers = []
    for _ in range(2):
        w = Worker(cfg, make_discovery(DiscoveryConfig(discovery="mem"), mem_store=store), InprocEventPlane(broker))
        await w.start()
        workers.append(w)
    a, b = workers
    assert a.instance is not None and b.instance is not None
    addr_a, addr_b = a.instance.address, b.instance.address
    client = WorkerClient(RpcClient())
    rng = random.Random(0)
    vocab = 2000 if args.model == "tiny" else 40000

    def prompt() -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(args.tokens)]

    runs: dict[str, list[float]] = {"holder_cold": [], "pulled": [], "recomputed": []}
    cached_pulled: list[int] = []
    try:
        await _ttft(client, addr_b, prompt())  # warm-up: first-call costs out of the runs
        for _ in range(args.repeats):
            p = prompt()
            t, _ = await _ttft(client, addr_a, p)
            runs["holder_cold"].append(t)
            peer = KvPeer(instance_id=a.instance_id, address=addr_a, blocks=len(p) // 16)
            t, cached = await _ttft(client, addr_b, p, peer)
            runs["pulled"].append(t)
            cached_pulled.append(cached)
            t, _ = await _ttft(client, addr_b, prompt())
            runs["recomputed"].append(t)
        stats = b.engine.stats()
    finally:
        await client.close()
        for w in workers:
            await w.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": args.model, "tokens": args.tokens, "transfer": args.transfer, "repeats": args.repeats,
            "ttft_ms_median": {k: round(v * 1000, 2) for k, v in med.items()},
            "ttft_ms_runs": {k: [round(x * 1000, 2) for x in v] for k, v in runs.items()},
            "cached_tokens_pulled": cached_pulled, "peer_pulled_blocks": stats.peer_pulled_blocks,
            "peer_pull_failures": stats.peer_pull_failures,
            "recompute_over_pull": round(med["recomputed"] / med["pulled"], 2)}


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=WorkerConfig().model)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--transfer", default="auto", choices=("auto", "nixl", "tcp"))
    ap.add_argument("--kv-cache-mib", type=int, default=512)
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

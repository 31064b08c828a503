"""KV handoff throughput: our transfer engines vs a raw NIXL transfer of the same bytes (issue #6).

    python -m kvrelay.perf.transfer_bench [--blocks 256] [--block-kib 128] [--repeats 15] [--json PATH]

Two processes. The child registers one pool of random bytes three ways and serves: our
`NixlTransferEngine`, a bare `nixl_agent` on the same memory, and our `TcpTransferEngine`. The parent
pulls the blocks into its own pool (one tensor, registered with the same three) with:
- ours/nixl: `await NixlTransferEngine.read(...)` from an event loop (driver thread, prepped lists);
- raw nixl: the minimal direct code: per iteration `initialize_xfer(READ, local, remote)` over the
  same runs (one descriptor when the blocks are consecutive), `transfer`, busy-poll
  `check_xfer_state`, `release_xfer_handle`; descriptor lists built once, outside the timing;
- ours/tcp: `await TcpTransferEngine.read(...)`.
Patterns: `contiguous` (N consecutive blocks: one descriptor), `runs16` (runs of 16 blocks at
scattered places), `scattered` (N single blocks: N descriptors). Every method is timed interleaved
with the others, `--repeats` times after a warm-up, and checked for exact bytes. Reported: median
GB/s (1 GB = 1e9 B) and ours/raw ratios of medians (goal >= 0.8), plus 1-block latency p50.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import numpy as np
import torch

from kvrelay.runtime import aio
from kvrelay.transfer import NixlTransferEngine, TcpTransferEngine, load_nixl_api
from kvrelay.transfer.blocks import block_runs


def _pool(blocks: int, block_bytes: int, seed: int | None) -> torch.Tensor:
    if seed is None:
        return torch.zeros((blocks, block_bytes), dtype=torch.uint8)
    return torch.randint(0, 256, (blocks, block_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- child: serves the pool three ways ---------------------------------------------------------------------
async def serve(blocks: int, block_bytes: int, prog: bool) -> None:
    api = load_nixl_api()
    pool = _pool(blocks, block_bytes, seed=7)
    ours = NixlTransferEngine("bench-child", progress_thread=prog)
    ours.register_pool("kv", pool, block_bytes)
    raw = api.nixl_agent("bench-raw-child", api.nixl_agent_config(enable_prog_thread=prog, backends=["UCX"]))
    raw.register_memory(pool)
    tcp = TcpTransferEngine("bench-tcp-child")
    tcp.register_pool("kv", pool, block_bytes)
    await tcp.start()
    b64 = [base64.b64encode(x).decode() for x in (ours.metadata(), raw.get_agent_metadata(), tcp.metadata())]
    stop = threading.Event()
    if not prog:  # the target's UCX worker must progress (connection wireup): as our driver does, every 1 ms
        threading.Thread(target=lambda: [raw.get_new_notifs() for _ in iter(lambda: stop.wait(1e-3), True)],
                         daemon=True).start()
    print("READY", *b64, pool.data_ptr(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent is done
    stop.set()
    await ours.close()
    await tcp.close()


# -- parent ------------------------------------------------------------------------------------------------
class Raw:
    """The baseline: NIXL used directly, with the least code that does the job."""

    def __init__(self, api, local: torch.Tensor, remote_md: bytes, remote_base: int, block_bytes: int,
                 prog: bool):
        self.agent = api.nixl_agent("bench-raw-parent", api.nixl_agent_config(enable_prog_thread=prog,
                                                                              backends=["UCX"]))
        self.agent.register_memory(local)
        self.peer = self.agent.add_remote_agent(remote_md)
        self.local_base, self.remote_base, self.bb = local.data_ptr(), remote_base, block_bytes

    def descs(self, lids: list[int], rids: list[int]):
        runs = block_runs(np.array(lids), np.array(rids))
        loc = [(self.local_base + lo * self.bb, n * self.bb, 0) for lo, _, n in runs]
        rem = [(self.remote_base + ro * self.bb, n * self.bb, 0) for _, ro, n in runs]
        return self.agent.get_xfer_descs(loc, "DRAM"), self.agent.get_xfer_descs(rem, "DRAM")

    def read(self, descs) -> None:
        handle = self.agent.initialize_xfer("READ", descs[0], descs[1], self.peer)
        state = self.agent.transfer(handle)
        while state == "PROC":
            state = self.agent.check_xfer_state(handle)
        self.agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"raw nixl transfer failed: {state}")

    async def aread(self, descs) -> None:
        self.read(descs)  # blocking on purpose: the baseline has no event loop to keep responsive


def patterns(n: int, total: int) -> dict[str, tuple[list[int], list[int]]]:
    rng = random.Random(0)
    starts = sorted(rng.sample(range(total // 16), n // 16))
    runs16 = [s * 16 + i for s in starts for i in range(16)]
    return {
        "contiguous": (list(range(n)), list(range(n))),
        "runs16": (list(range(n)), runs16),
        "scattered": (list(range(n)), rng.sample(range(total), n)),
    }


async def measure(args: argparse.Namespace, child_md: list[bytes], remote_base: int) -> dict:
    bb, n = args.block_kib * 1024, args.blocks
    total = n * 2  # the child's pool is twice the transfer, so patterns can scatter
    local = _pool(n, bb, seed=None)
    expected = _pool(total, bb, seed=7)
    prog = args.nixl_progress_thread
    ours, tcp = NixlTransferEngine("bench-parent", progress_thread=prog), TcpTransferEngine("bench-tcp-parent")
    ours.register_pool("kv", local, bb)
    tcp.register_pool("kv", local, bb)
    await tcp.start()
    ours.add_peer("child", child_md[0])
    tcp.add_peer("child", child_md[2])
    raw = Raw(load_nixl_api(), local, child_md[1], remote_base, bb, prog)
    nbytes = n * bb
    out: dict = {"blocks": n, "block_bytes": bb, "bytes": nbytes, "repeats": args.repeats,
                 "nixl_progress_thread": prog, "patterns": {}}
    for name, (lids, rids) in patterns(n, total).items():
        descs = raw.descs(lids, rids)
        methods: dict[str, Callable[[], Awaitable[Any]]] = {
            "ours_nixl": functools.partial(ours.read, "child", "kv", rids, "kv", lids),
            "raw_nixl": functools.partial(raw.aread, descs),
            "ours_tcp": functools.partial(tcp.read, "child", "kv", rids, "kv", lids),
        }
        times: dict[str, list[float]] = {m: [] for m in methods}
        for m, fn in methods.items():  # warm-up, and exact bytes from each
            local.zero_()
            await fn()
            assert torch.equal(local[lids], expected[rids]), f"{m} moved the wrong bytes ({name})"
        for _ in range(args.repeats):
            for m, fn in methods.items():
                t = time.perf_counter()
                await fn()
                times[m].append(time.perf_counter() - t)
        gbps = {m: nbytes / statistics.median(ts) / 1e9 for m, ts in times.items()}
        out["patterns"][name] = {
            "descriptors": len(block_runs(np.array(lids), np.array(rids))),
            "gbps_median": gbps,
            "gbps_best": {m: nbytes / min(ts) / 1e9 for m, ts in times.items()},
            "ours_nixl_vs_raw": gbps["ours_nixl"] / gbps["raw_nixl"],
            "ours_tcp_vs_raw": gbps["ours_tcp"] / gbps["raw_nixl"],
        }
    lat: dict[str, list[float]] = {"ours_nixl": [], "raw_nixl": [], "ours_tcp": []}
    one = raw.descs([0], [1])
    for _ in range(args.latency_samples):
        for m, fn in (("ours_nixl", lambda: ours.read("child", "kv", [1], "kv", [0])),
                      ("raw_nixl", lambda: raw.aread(one)),
                      ("ours_tcp", lambda: tcp.read("child", "kv", [1], "kv", [0]))):
            t = time.perf_counter()
            await fn()
            lat[m].append(time.perf_counter() - t)
    out["one_block_p50_us"] = {m: statistics.median(v) * 1e6 for m, v in lat.items()}
    out["ours_nixl_stats"] = {k: v for k, v in msgspec.structs.asdict(ours.stats()).items()
                              if k in ("active_handles", "registered_regions", "prepped_dlists", "failures")}
    await ours.close()
    await tcp.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.transfer_bench")
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--block-kib", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--nixl-progress-thread", action="store_true",
                   help="give every NIXL agent (ours and raw) NIXL's own busy progress thread")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.blocks % 16:
        p.error("--blocks must be a multiple of 16")
    if args.serve:
        aio.run(serve(args.blocks * 2, args.block_kib * 1024, args.nixl_progress_thread))
        return 0
    child = subprocess.Popen([sys.executable, "-m", "kvrelay.perf.transfer_bench", "--serve",
                              "--blocks", str(args.blocks), "--block-kib", str(args.block_kib),
                              *(["--nixl-progress-thread"] if args.nixl_progress_thread else [])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None  # both PIPE
    try:
        words: list[str] = []
        while words[:1] != ["READY"]:  # UCX may log lines of its own to stdout
            line = child.stdout.readline()
            if not line:
                raise SystemExit("bench child exited before it was ready")
            words = line.split()
        result = aio.run(measure(args, [base64.b64decode(w) for w in words[1:4]], int(words[4])))
    finally:
        child.stdin.close()
        child.wait(30)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(f"\n{result['blocks']} blocks x {result['block_bytes'] // 1024} KiB = {result['bytes'] / 2**20:.0f} MiB "
          f"per transfer, median of {result['repeats']}\n\n| pattern | descriptors | raw nixl GB/s | ours nixl GB/s "
          f"| ours/raw | ours tcp GB/s | tcp/raw |\n|---|---|---|---|---|---|---|")
    for name, r in result["patterns"].items():
        g = r["gbps_median"]
        print(f"| {name} | {r['descriptors']} | {g['raw_nixl']:.2f} | {g['ours_nixl']:.2f} | "
              f"{r['ours_nixl_vs_raw']:.2f}x | {g['ours_tcp']:.2f} | {r['ours_tcp_vs_raw']:.2f}x |")
    lat = result["one_block_p50_us"]
    print(f"\n1-block read p50: raw nixl {lat['raw_nixl']:.0f} us, ours nixl {lat['ours_nixl']:.0f} us, "
          f"ours tcp {lat['ours_tcp']:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())

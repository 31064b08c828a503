"""The `gpu` lane: everything in kvrelay that only a GPU can show, in one run of under 8 minutes, with one
summary file. For a machine with one CUDA GPU, CUDA torch and Triton, and no network.

    python -m kvrelay.perf.gpu_lane [--wheels DIR] [--out gpu_lane.json]
    python perf/gpu_lane.py ...        (from a checkout where kvrelay is not installed yet)

Steps, each bounded in time and reported whatever happens:
1. environment: torch, CUDA device, Triton, nixl;
2. install: kvrelay itself (editable, no dependencies fetched) and, from `--wheels DIR` (pip
   `--no-index --find-links`), any dependency that does not import;
3. tests: `pytest -m gpu tests/gpu` (native engine greedy == transformers on CUDA, every Triton kernel vs
   its torch reference, NIXL VRAM <-> DRAM) and the compiled-kernel check in tests/kernels;
4. copy bandwidth: G1 (a CUDA KV pool) -> G2 (kvbm's HostStore, pinned) and back, through the store's
   own put/get, vs one `copy_` (cudaMemcpy) of the same bytes, side by side in this run.

On a machine without CUDA it is a dry run: every CUDA step is skipped and says so; the summary is still
written (so the lane itself is tested on CPU: tests/perf/test_gpu_lane.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
# import name -> distribution name, for what the lane's tests import
NEEDED = {"msgspec": "msgspec", "xxhash": "xxhash", "zmq": "pyzmq", "safetensors": "safetensors",
          "tokenizers": "tokenizers", "jinja2": "jinja2", "numpy": "numpy", "gguf": "gguf", "httpx": "httpx",
          "prometheus_client": "prometheus-client", "fastapi": "fastapi", "uvicorn": "uvicorn",
          "aetcd": "aetcd", "nats": "nats-py", "obstore": "obstore", "pytest": "pytest",
          "pytest_asyncio": "pytest-asyncio", "pytest_timeout": "pytest-timeout", "hypothesis": "hypothesis",
          "transformers": "transformers"}
NIXL = ("nixl", "nixl_cu12", "nixl_cu13")  # any one of NIXL's wheels (transfer/nixl_api.py)


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout), env=env)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        partial = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
        rc, out = 124, f"timed out after {timeout:.0f} s\n" + "".join(partial)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - t0, 1), "tail": out[-3000:]}


def _has_nixl() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in NIXL)


def _missing() -> list[str]:
    missing = [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]
    return missing + ([] if _has_nixl() else ["nixl"])


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "torch_cuda": torch.version.cuda, "triton": None, "nixl": _has_nixl()}
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name()
        env["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def install(wheels: str | None, deadline: float) -> dict:
    """kvrelay importable, and every dependency of the lane's tests (from `wheels` when missing)."""
    steps: list[dict] = []
    if importlib.util.find_spec("kvrelay") is None or importlib.util.find_spec("kvrelay.workers") is None:
        steps.append(_run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
                          deadline - time.monotonic()))
    missing = _missing()
    if missing and wheels:
        steps.append(_run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *missing],
                          deadline - time.monotonic()))
        importlib.invalidate_caches()
        missing = _missing()
    return {"steps": steps, "still_missing": missing}


def tests(deadline: float, cuda: bool) -> dict:
    if not cuda:
        return {"skipped": "no CUDA device: the gpu-marked tests would all skip"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-o", "addopts=",
            "--timeout", "300"]
    lane = _run([*base, "tests/gpu"], (deadline - time.monotonic()) * 0.85, env)
    compiled = _run([*base, "tests/kernels/test_kernels.py::test_compiled_kernels_on_cuda"],
                    deadline - time.monotonic() - 60, env)
    return {"tests/gpu": lane, "compiled_kernels": compiled}


def copy_bandwidth(cuda: bool, mib: int = 512, block_kib: int = 1440) -> dict:
    """G1 -> G2 -> G1 through kvbm's HostStore vs one cudaMemcpy of the same bytes (GB/s, ratios)."""
    if not cuda:
        return {"skipped": "no CUDA device"}
    import asyncio

    import torch

    from kvrelay.kvbm.tiers import HostStore

    block_bytes = block_kib * 1024
    n = mib * 2**20 // block_bytes
    g1 = torch.randint(0, 256, (n, block_bytes), dtype=torch.uint8, device="cuda")
    back = torch.zeros_like(g1)
    pinned = torch.empty((n, block_bytes), dtype=torch.uint8, pin_memory=True)
    nbytes = n * block_bytes

    def timed(fn) -> float:
        fn()  # warm
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    memcpy_d2h = timed(lambda: pinned.copy_(g1, non_blocking=True))
    memcpy_h2d = timed(lambda: back.copy_(pinned, non_blocking=True))

    async def store_rates() -> tuple[float, float]:
        store = HostStore(block_bytes, nbytes + block_bytes, pin_memory=True)
        hashes = list(range(1, n + 1))
        try:
            await store.put(hashes, list(g1))
            t0 = time.perf_counter()
            for _ in range(3):
                await store.remove(hashes)
                await store.put(hashes, list(g1))
            put = 3 * nbytes / (time.perf_counter() - t0) / 1e9
            t0 = time.perf_counter()
            for _ in range(3):
                ok = await store.get(hashes, list(back))
            get = 3 * nbytes / (time.perf_counter() - t0) / 1e9
            assert all(ok) and torch.equal(back, g1), "G2 round trip changed the bytes"
            return put, get
        finally:
            await store.close()

    put, get = asyncio.run(store_rates())
    return {"bytes": nbytes, "block_bytes": block_bytes,
            "cudaMemcpy_d2h_gbps": round(memcpy_d2h, 2), "cudaMemcpy_h2d_gbps": round(memcpy_h2d, 2),
            "g1_to_g2_gbps": round(put, 2), "g2_to_g1_gbps": round(get, 2),
            "g1_to_g2_vs_memcpy": round(put / memcpy_d2h, 3), "g2_to_g1_vs_memcpy": round(get / memcpy_h2d, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_lane", description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", help="folder of wheels to install missing dependencies from (no network)")
    ap.add_argument("--out", default="gpu_lane.json", help="summary file (JSON); default %(default)s")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget; default %(default)s")
    args = ap.parse_args(argv)
    if args.wheels and not Path(args.wheels).is_dir():
        ap.error(f"--wheels {args.wheels}: not a directory")
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    summary: dict = {"environment": environment()}
    cuda = bool(summary["environment"]["cuda"])
    if not cuda:
        print("gpu lane: no CUDA device here: DRY RUN, every CUDA step is skipped", flush=True)
    summary["install"] = install(args.wheels, deadline)
    summary["tests"] = tests(deadline, cuda)
    try:
        summary["copy_bandwidth"] = copy_bandwidth(cuda)
    except Exception as e:  # the summary still gets written
        summary["copy_bandwidth"] = {"error": repr(e)}
    summary["seconds"] = round(time.monotonic() - t0, 1)
    failed = [name for name, r in summary["tests"].items() if isinstance(r, dict) and r.get("rc", 0) != 0]
    summary["ok"] = not failed and not summary["install"]["still_missing"] and "error" not in summary["copy_bandwidth"]
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "tests"}, indent=2))
    for name, r in summary["tests"].items():
        print(f"--- {name}: " + (r if isinstance(r, str) else f"rc {r['rc']} in {r['seconds']} s\n{r['tail'][-1500:]}"))
    print(f"gpu lane: {'OK' if summary['ok'] else 'FAILED'} in {summary['seconds']} s; summary in {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    if importlib.util.find_spec("kvrelay") is None:  # run from a checkout: make `kvrelay.*` importable first
        sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                  "--no-build-isolation", "-e", str(ROOT)]) or
                 subprocess.call([sys.executable, "-m", "kvrelay.perf.gpu_lane", *sys.argv[1:]]))
    sys.exit(main())

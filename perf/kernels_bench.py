"""Paging overhead of the CPU decode attention: paged_attention_decode_ref vs SDPA on contiguous KV.

    python -m kvrelay.perf.kernels_bench [--batch 16] [--context 1024] [--q-heads 32] [--kv-heads 8]
                                         [--head-dim 64] [--block-size 16] [--dtype float32] [--iters 20]

Both sides run one decode step (one query token per sequence) for the same batch, heads and context,
in the same process. The baseline's K/V are already laid out as [B, Hkv, T, D] (what a contiguous,
per-sequence cache would hand SDPA); the paged side reads them from the block pool
[num_blocks, L, 2, bs, Hkv, D] through shuffled block tables, i.e. it pays the gather (and, for
ragged batches, the mask). Two batches: "full" (every sequence has `context` tokens, no mask) and
"ragged" (lengths uniform in [context/2, context], padding mask on both sides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kvrelay.kernels import paged_attention_decode_ref

LAYERS, LAYER = 4, 1  # pool holds a few layers so block strides are realistic; attend one of them


def _time_pair(a, b, iters: int) -> tuple[float, float]:
    """Median milliseconds per call of a and b, alternated call by call so machine noise (shared,
    2-core hosts) hits both sides alike."""
    for _ in range(3):
        a(), b()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(iters):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def run_case(args: argparse.Namespace, lens: list[int], dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    B, bs, hq, hkv, d = args.batch, args.block_size, args.q_heads, args.kv_heads, args.head_dim
    max_blocks = -(-args.context // bs)
    nb = B * max_blocks + 8
    kv = torch.randn(nb, LAYERS, 2, bs, hkv, d, generator=g).to(dtype)
    bt = torch.randperm(nb, generator=g)[: B * max_blocks].view(B, max_blocks).int()  # fragmented pool
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(B, hq, d, generator=g).to(dtype)
    scale = d**-0.5
    # Contiguous baseline over the same tokens: [B, Hkv, T, D].
    T = max_blocks * bs
    k = kv[bt.long(), LAYER, 0].reshape(B, T, hkv, d).transpose(1, 2).contiguous()
    v = kv[bt.long(), LAYER, 1].reshape(B, T, hkv, d).transpose(1, 2).contiguous()
    mask = None
    if min(lens) != T:
        mask = (torch.arange(T)[None, :] < ctx[:, None].long())[:, None, None, :]

    def contiguous():
        # In the cache dtype, as a contiguous engine would call it (for bf16/fp16 the paged reference
        # also pays its explicit fp32 upcast; torch's CPU SDPA accumulates in fp32 internally anyway).
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=hq != hkv)

    def paged():
        return paged_attention_decode_ref(q, kv, LAYER, bt, ctx, scale)

    torch.testing.assert_close(paged().float(), contiguous().squeeze(2).float(), rtol=2e-2, atol=2e-2)
    c_ms, p_ms = _time_pair(contiguous, paged, args.iters)
    kv_mb = 2 * sum(lens) * hkv * d * kv.element_size() / 2**20
    return {"contiguous_ms": c_ms, "paged_ms": p_ms, "ratio": p_ms / c_ms, "kv_read_mib": kv_mb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.perf.kernels_bench")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(1)
    ragged = torch.randint(args.context // 2, args.context + 1, (args.batch,), generator=g).tolist()
    result = {
        "config": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "full": run_case(args, [args.context] * args.batch, dtype),
        "ragged": run_case(args, ragged, dtype),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print("\n| batch | contiguous SDPA ms | paged ref ms | paged/contiguous |\n|---|---|---|---|")
    for name in ("full", "ragged"):
        r = result[name]
        print(f"| {name} | {r['contiguous_ms']:.2f} | {r['paged_ms']:.2f} | {r['ratio']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

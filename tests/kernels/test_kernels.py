"""kvrelay.kernels: Triton kernels (through TRITON_INTERPRET=1 on CPU) vs PyTorch references vs naive
float64 loops, on tiny shapes (the interpreter is slow)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / kvrelay.kernels are imported (also in conftest.py)

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kvrelay import kernels as K  # noqa: E402
from kvrelay.kernels import block_copy, paged_attention  # noqa: E402


def _interpreted() -> bool:
    fn = getattr(paged_attention, "_paged_decode_kernel", None)
    return fn is not None and type(fn).__name__ == "InterpretedFunction" and hasattr(block_copy, "_gather_kernel")


needs_interp = pytest.mark.skipif(
    not _interpreted(), reason="triton missing, or kvrelay.kernels was imported before TRITON_INTERPRET=1"
)


def make_cache(nb: int, L: int, bs: int, H: int, D: int, dtype=torch.float32, packed: bool = False):
    """A pool filled with NaN; with packed=False the block stride exceeds the block size (a view of a
    wider buffer), so kernels must honour stride(0) rather than assume a packed tensor."""
    numel = L * 2 * bs * H * D
    if packed:
        return torch.full((nb, L, 2, bs, H, D), float("nan"), dtype=dtype)
    wide = torch.full((nb, numel + 8), float("nan"), dtype=dtype)
    return wide[:, :numel].view(nb, L, 2, bs, H, D)


def make_decode_case(B, bs, group, D, ctx_lens, dtype=torch.float32, hkv=2, L=3, seed=0):
    """Random distinct, unordered blocks per sequence; garbage padding (out-of-range ids) in the
    table; only real tokens' slots hold numbers, everything else (tails, unused blocks) is NaN."""
    g = torch.Generator().manual_seed(seed)
    n_blk = [math.ceil(c / bs) for c in ctx_lens]
    max_blocks = max(n_blk) + 2
    nb = sum(n_blk) + 3
    kv = make_cache(nb, L, bs, hkv, D, dtype)
    perm = torch.randperm(nb, generator=g)[: sum(n_blk)].tolist()
    bt = torch.tensor([[-7, nb + 100] * max_blocks for _ in range(B)], dtype=torch.int32)[:, :max_blocks].clone()
    for b, (c, n) in enumerate(zip(ctx_lens, n_blk, strict=True)):
        for j in range(n):
            blk = perm.pop()
            bt[b, j] = blk
            ntok = min(bs, c - j * bs)
            kv[blk, :, :, :ntok] = torch.randn(L, 2, ntok, hkv, D, generator=g).to(dtype)
    q = torch.randn(B, hkv * group, D, generator=g).to(dtype)
    return q, kv, bt, torch.tensor(ctx_lens, dtype=torch.int32)


def naive_decode(q, kv, layer, bt, ctx, scale):
    """Per sequence, per head, token by token, float64."""
    B, hq, D = q.shape
    bs, hkv = kv.shape[3], kv.shape[4]
    out = torch.empty(B, hq, D, dtype=torch.float64)
    for b in range(B):
        c = int(ctx[b])
        toks = [(int(bt[b, t // bs]), t % bs) for t in range(c)]
        for h in range(hq):
            kh = h // (hq // hkv)
            k = torch.stack([kv[blk, layer, 0, off, kh] for blk, off in toks]).double()
            v = torch.stack([kv[blk, layer, 1, off, kh] for blk, off in toks]).double()
            p = torch.softmax(k @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ v
    return out


# (B, block_size, gqa ratio, head_dim, context lens): ragged, incl. 1, exact multiples and not.
DECODE_CASES = [
    (1, 4, 1, 16, [1]),
    (3, 4, 2, 32, [1, 9, 12]),
    (4, 16, 1, 32, [17, 3, 32, 40]),
    (2, 16, 2, 16, [16, 33]),
    (5, 4, 2, 16, [2, 5, 8, 13, 4]),
]


@pytest.mark.parametrize("B,bs,group,D,ctx", DECODE_CASES)
def test_decode_ref_matches_naive(B, bs, group, D, ctx):
    q, kv, bt, cl = make_decode_case(B, bs, group, D, ctx)
    scale = D**-0.5
    got = K.paged_attention_decode_ref(q, kv, 2, bt, cl, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), naive_decode(q, kv, 2, bt, cl, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.paged_attention_decode(q, kv, 2, bt, cl, scale), got)  # CPU dispatch


@needs_interp
@pytest.mark.parametrize("B,bs,group,D,ctx", DECODE_CASES)
def test_decode_triton_matches_ref(B, bs, group, D, ctx):
    q, kv, bt, cl = make_decode_case(B, bs, group, D, ctx, seed=1)
    for layer in (0, 2):
        want = K.paged_attention_decode_ref(q, kv, layer, bt, cl, 0.3)
        got = K.paged_attention_decode_triton(q, kv, layer, bt, cl, 0.3)
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half_ref_and_triton(dtype):
    q, kv, bt, cl = make_decode_case(3, 4, 2, 16, [1, 7, 11], dtype=dtype, seed=2)
    want = naive_decode(q, kv, 1, bt, cl, 0.25)
    ref = K.paged_attention_decode_ref(q, kv, 1, bt, cl, 0.25)
    assert ref.dtype == dtype
    torch.testing.assert_close(ref.double(), want, rtol=2e-2, atol=2e-2)
    if _interpreted():
        tri = K.paged_attention_decode_triton(q, kv, 1, bt, cl, 0.25)
        torch.testing.assert_close(tri.double(), want, rtol=2e-2, atol=2e-2)


def test_decode_ref_workspace_reuse():
    """The CPU reference reuses a per-thread scratch: results must not alias it, shapes may shrink/grow."""
    qa, kva, bta, cla = make_decode_case(4, 16, 2, 32, [40, 3, 33, 17], seed=5)
    qb, kvb, btb, clb = make_decode_case(2, 4, 1, 16, [5, 2], seed=6)
    a = K.paged_attention_decode_ref(qa, kva, 0, bta, cla, 0.2)
    a_copy = a.clone()
    b = K.paged_attention_decode_ref(qb, kvb, 0, btb, clb, 0.2)
    assert torch.equal(a, a_copy)  # the second call did not write into the first result
    torch.testing.assert_close(b.double(), naive_decode(qb, kvb, 0, btb, clb, 0.2), rtol=1e-5, atol=1e-5)
    K.release_workspace()
    torch.testing.assert_close(K.paged_attention_decode_ref(qa, kva, 0, bta, cla, 0.2), a)


def test_decode_workspace_from_inference_mode_is_not_reused_outside_it():
    """The engine thread fills the scratch under inference_mode; a later plain call must still work."""
    q, kv, bt, cl = make_decode_case(2, 4, 2, 16, [7, 5], seed=8)
    K.release_workspace()
    with torch.inference_mode():
        inside = K.paged_attention_decode_ref(q, kv, 0, bt, cl, 0.3)
    torch.testing.assert_close(K.paged_attention_decode_ref(q, kv, 0, bt, cl, 0.3), inside)


@pytest.mark.parametrize("ctx", [[16, 16, 32], [1, 17, 40, 3], [33]])
def test_plan_decode_host_equals_plan_decode(ctx):
    """The engine's host-built plan is the tensor-built one, field for field (padding rows hold garbage)."""
    bs, width = 16, 4
    gen = torch.Generator().manual_seed(len(ctx))
    tables = [torch.randint(1, 50, (width,), generator=gen).tolist() for _ in ctx]
    bt, cl = torch.tensor(tables, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32)
    want, got = K.plan_decode(bt, cl, bs), K.plan_decode_host(tables, ctx, bs)
    assert got.tokens == want.tokens and torch.equal(got.bt, want.bt)
    for a, b in ((got.mask, want.mask), (got.pad, want.pad)):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match=">= 1"):
        K.plan_decode_host(tables, [0] * len(ctx), bs)
    with pytest.raises(ValueError, match="needs 5 blocks"):
        K.plan_decode_host(tables, [65] * len(ctx), bs)


def test_decode_argument_errors():
    q, kv, bt, cl = make_decode_case(2, 4, 2, 16, [3, 5])
    with pytest.raises(ValueError, match="multiple"):
        K.paged_attention_decode_ref(q[:, :3], kv, 0, bt, cl, 1.0)
    with pytest.raises(ValueError, match="layer"):
        K.paged_attention_decode_ref(q, kv, 3, bt, cl, 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        K.paged_attention_decode_ref(q, kv, 0, bt, torch.tensor([0, 5], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="blocks"):
        K.paged_attention_decode_ref(q, kv, 0, bt[:, :1], cl, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        K.paged_attention_decode_ref(q.double(), kv, 0, bt, cl, 1.0)


def naive_prefill(q, k, v, scale, num_cached):
    n_new, hq, _ = q.shape
    hkv = k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(n_new):
        for h in range(hq):
            kk = k[: num_cached + i + 1, h // (hq // hkv)].double()
            vv = v[: num_cached + i + 1, h // (hq // hkv)].double()
            out[i, h] = torch.softmax(kk @ q[i, h].double() * scale, 0) @ vv
    return out


@pytest.mark.parametrize("num_cached,n_new,group", [(0, 5, 1), (0, 4, 2), (7, 3, 2), (16, 1, 1), (5, 6, 1)])
def test_prefill_ref_matches_naive(num_cached, n_new, group):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n_new, 2 * group, 16, generator=g)
    k, v = torch.randn(2, num_cached + n_new, 2, 16, generator=g)
    got = K.prefill_attention_ref(q, k, v, 0.25, num_cached)
    torch.testing.assert_close(got.double(), naive_prefill(q, k, v, 0.25, num_cached), rtol=1e-5, atol=1e-5)
    half = K.prefill_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25, num_cached)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), got.double(), rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="num_cached"):
        K.prefill_attention_ref(q, k, v, 0.25, num_cached + 1)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_scatter_round_trip(packed, dtype):
    kv = make_cache(9, 2, 4, 2, 8, dtype, packed)
    kv.copy_(torch.randn(kv.shape).to(dtype))
    ids = torch.tensor([7, 0, 3, 3])  # gathers may repeat a block
    buf = K.gather_blocks_ref(kv, ids)
    assert buf.is_contiguous() and buf.shape == (4, *kv.shape[1:])
    for i, b in enumerate(ids.tolist()):
        assert torch.equal(buf[i], kv[b])
    out = torch.empty_like(buf)
    assert K.gather_blocks(kv, ids, out=out) is out and torch.equal(out, buf)
    dst = make_cache(9, 2, 4, 2, 8, dtype, packed).zero_()
    K.scatter_blocks(dst, torch.tensor([1, 8, 4]), buf[:3])
    for i, b in enumerate([1, 8, 4]):
        assert torch.equal(dst[b], buf[i])
    assert int((dst != 0).flatten(1).any(1).sum()) == 3  # nothing else written
    if _interpreted():
        assert torch.equal(K.gather_blocks_triton(kv, ids), buf)
        out2 = torch.empty_like(buf)
        assert K.gather_blocks_triton(kv, ids, out=out2) is out2 and torch.equal(out2, buf)
        dst2 = make_cache(9, 2, 4, 2, 8, dtype, packed).zero_()
        K.scatter_blocks_triton(dst2, torch.tensor([1, 8, 4], dtype=torch.int32), buf[:3])
        assert torch.equal(dst2, dst)


@needs_interp
def test_block_copy_triton_multi_chunk():
    # block_numel = 2*2*8*2*20 = 1280 > the kernel's 1024-element chunk, and not a multiple of it.
    kv = torch.randn(5, 2, 2, 8, 2, 20)
    ids = torch.tensor([4, 1])
    assert torch.equal(K.gather_blocks_triton(kv, ids), K.gather_blocks_ref(kv, ids))
    src = torch.randn(2, *kv.shape[1:])
    a, b = kv.clone(), kv.clone()
    K.scatter_blocks_triton(a, ids, src)
    K.scatter_blocks_ref(b, ids, src)
    assert torch.equal(a, b)
    assert K.gather_blocks_triton(kv, torch.empty(0, dtype=torch.long)).shape == (0, *kv.shape[1:])


@pytest.mark.parametrize("gather", [K.gather_blocks_ref, K.gather_blocks_triton])
def test_block_copy_errors(gather):
    kv = torch.zeros(4, 1, 2, 4, 1, 8)
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        gather(kv, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        gather(kv, torch.tensor([-1]))
    with pytest.raises(ValueError, match="int32 or int64"):
        gather(kv, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="1-D"):
        gather(kv, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="shape"):
        gather(kv, torch.tensor([0]), out=torch.empty(2, 1, 2, 4, 1, 8))
    with pytest.raises(ValueError, match="kv_cache must be"):
        gather(kv[0], torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous"):
        gather(kv.transpose(3, 5), torch.tensor([0]))
    for scatter in (K.scatter_blocks_ref, K.scatter_blocks_triton):
        with pytest.raises(ValueError, match="dtype"):
            scatter(kv, torch.tensor([1]), torch.zeros(1, 1, 2, 4, 1, 8, dtype=torch.float16))
        with pytest.raises(ValueError, match="distinct"):
            scatter(kv, torch.tensor([1, 1]), torch.zeros(2, 1, 2, 4, 1, 8))
        with pytest.raises(ValueError, match="shape"):
            scatter(kv, torch.tensor([1]), torch.zeros(1, 1, 2, 4, 1, 7))


def test_write_kv_ref():
    nb, L, bs, H, D = 5, 3, 4, 2, 8
    kv = make_cache(nb, L, bs, H, D).zero_()
    slots = torch.tensor([13, 0, 7, 19, 4])  # distinct, unordered, across blocks
    k, v = torch.randn(2, 5, H, D)
    K.write_kv_ref(kv, 1, slots, k, v)
    expect = torch.zeros(nb, L, 2, bs, H, D)
    for i, s in enumerate(slots.tolist()):
        expect[s // bs, 1, 0, s % bs] = k[i]
        expect[s // bs, 1, 1, s % bs] = v[i]
    assert torch.equal(kv, expect)  # other layers and slots untouched
    K.write_kv_ref(kv, 0, slots[:0], k[:0], v[:0])  # empty step is a no-op
    with pytest.raises(ValueError, match="slots"):
        K.write_kv_ref(kv, 0, torch.tensor([nb * bs]), k[:1], v[:1])
    with pytest.raises(ValueError, match="slots"):
        K.write_kv_ref(kv, 0, torch.tensor([-1]), k[:1], v[:1])
    with pytest.raises(ValueError, match="must be"):
        K.write_kv_ref(kv, 0, slots, k[:4], v)
    with pytest.raises(ValueError, match="layer"):
        K.write_kv_ref(kv, 3, slots, k, v)


def test_write_then_decode_end_to_end():
    """The engine's decode loop: write K/V of each step's token, then attend over the pool."""
    g = torch.Generator().manual_seed(4)
    bs, H, D, steps = 4, 2, 16, 6
    kv = make_cache(8, 2, bs, H, D)
    bt = torch.tensor([[5, 2], [1, 6]], dtype=torch.int32)
    ks, vs = torch.randn(2, 2, steps, H, D, generator=g)
    for t in range(steps):
        slots = torch.tensor([int(bt[b, t // bs]) * bs + t % bs for b in range(2)])
        K.write_kv_ref(kv, 1, slots, ks[:, t], vs[:, t])
        q = torch.randn(2, 2 * H, D, generator=g)
        got = K.paged_attention_decode_ref(q, kv, 1, bt, torch.tensor([t + 1, t + 1], dtype=torch.int32), 0.25)
        for b in range(2):
            # Same attention as a one-query prefill over the contiguous history.
            want = K.prefill_attention_ref(q[b : b + 1], ks[b, : t + 1], vs[b, : t + 1], 0.25, t)
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)


_GPU_CHECK = """
import torch
from kvrelay import kernels as K
torch.manual_seed(0)
kv = torch.randn(64, 4, 2, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
bt = torch.randperm(64, device="cuda")[:48].view(4, 12).int()
cl = torch.tensor([1, 100, 192, 77], device="cuda", dtype=torch.int32)
q = torch.randn(4, 16, 128, device="cuda", dtype=torch.bfloat16)
d = (K.paged_attention_decode(q, kv, 3, bt, cl, 0.088).float()
     - K.paged_attention_decode_ref(q, kv, 3, bt, cl, 0.088).float()).abs().max().item()
assert d < 2e-2, d
ids = torch.tensor([5, 9, 1], device="cuda")
assert torch.equal(K.gather_blocks(kv, ids), K.gather_blocks_ref(kv, ids))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernels_on_cuda():
    # A subprocess without TRITON_INTERPRET, so the kernels are compiled rather than interpreted.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _GPU_CHECK], env=env, check=True, timeout=300)

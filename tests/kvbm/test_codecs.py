"""The codecs alone: lossless is bit-identical (hypothesis over dtypes, shapes, special values), int8
stays within its per-channel bound, and a frame of another codec, version or shape is refused."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrelay.kvbm.codecs.frame import HEADER_BYTES, open_frame
from kvrelay.kvbm.codecs.lossless import LosslessCodec
from kvrelay.kvbm.codecs.quant import Int8Codec
from kvrelay.kvbm.codecs.registry import make_codec
from kvrelay.kvbm.codecs.shape import BlockShape

SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, 65504.0, -3.0e38]


def decoded(codec, block: torch.Tensor) -> torch.Tensor:
    frame = codec.encode(block)
    assert frame is not None and len(frame) <= codec.max_bytes
    out = torch.full_like(block, 0xA5)
    assert codec.decode(memoryview(frame), out)
    return out


@st.composite
def blocks(draw):
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    shape = BlockShape(dtype, draw(st.integers(1, 4)) * 2, draw(st.sampled_from([1, 4, 16])),
                       draw(st.sampled_from([1, 8, 64])))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.numel, generator=g) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
    n_special = draw(st.integers(0, min(8, shape.numel)))
    idx = torch.randint(0, shape.numel, (n_special,), generator=g)
    x[idx] = torch.tensor([SPECIALS[i % len(SPECIALS)] for i in range(n_special)])
    raw = draw(st.booleans())  # random bits: NaN payloads, subnormals, everything
    block = (torch.randint(0, 256, (shape.block_bytes,), dtype=torch.uint8, generator=g) if raw
             else x.to(shape.torch_dtype).view(torch.uint8))
    return shape, block


@settings(max_examples=150, deadline=None)
@given(blocks())
def test_lossless_round_trip_is_bit_identical(case):
    shape, block = case
    assert torch.equal(decoded(LosslessCodec(shape), block), block)


def test_lossless_shrinks_kv_like_bfloat16_and_never_grows_noise():
    shape = BlockShape("bfloat16", 8, 16, 128)
    kv = torch.randn(shape.numel).to(torch.bfloat16).view(torch.uint8)
    codec = LosslessCodec(shape)
    assert len(codec.encode(kv)) < 0.85 * shape.block_bytes  # the exponent plane compresses
    noise = torch.randint(0, 256, (shape.block_bytes,), dtype=torch.uint8)
    assert len(codec.encode(noise)) <= codec.max_bytes  # stored raw, one mode byte over


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_int8_error_is_within_half_a_step_per_channel(dtype):
    shape = BlockShape(dtype, 6, 16, 40)
    g = torch.Generator().manual_seed(3)
    # Channels of very different magnitude, as keys have (outlier lanes): a per-block scale would fail.
    x = torch.randn(shape.groups, shape.tokens, shape.channels, generator=g)
    x *= torch.logspace(-3, 2, shape.channels)
    x[0, :, 0] = 0.0  # an all-zero channel decodes to zeros
    x = x.to(shape.torch_dtype)
    codec = Int8Codec(shape)
    y = decoded(codec, x.view(-1).view(torch.uint8)).view(shape.torch_dtype).view_as(x)
    absmax = x.float().abs().amax(dim=1, keepdim=True)
    step = torch.clamp(absmax / 127 * (1 + 2**-8), min=2**-14)
    rounding = absmax * torch.finfo(shape.torch_dtype).eps  # the engine dtype's own rounding of x'
    err = (y.float() - x.float()).abs()
    assert bool((err <= step / 2 + rounding).all()), float((err - step / 2 - rounding).max())
    assert bool((y[0, :, 0] == 0).all())
    assert len(codec.encode(x.view(-1).view(torch.uint8))) == codec.max_bytes  # fixed size
    assert codec.max_bytes < shape.block_bytes * (0.3 if dtype == "float32" else 0.6)


def test_int8_refuses_non_finite_blocks():
    shape = BlockShape("float16", 2, 16, 8)
    x = torch.randn(shape.numel).half()
    x[5] = float("inf")
    assert Int8Codec(shape).encode(x.view(torch.uint8)) is None


def test_int8_needs_a_layout():
    with pytest.raises(ValueError):
        make_codec("int8", BlockShape.opaque(4096))
    assert make_codec("lossless", BlockShape.opaque(4096)) is not None  # bytes of any structure
    assert make_codec("none", BlockShape.opaque(4096)) is None


def test_a_frame_of_another_codec_version_or_shape_is_refused():
    shape = BlockShape("float16", 2, 16, 8)
    block = torch.randn(shape.numel).half().view(torch.uint8)
    lossless, int8 = LosslessCodec(shape), Int8Codec(shape)
    out = torch.empty_like(block)
    frame = bytearray(lossless.encode(block))
    assert not int8.decode(memoryview(frame), out)  # codec id
    assert not LosslessCodec(BlockShape("bfloat16", 2, 16, 8)).decode(memoryview(frame), out)  # shape tag
    bumped = bytearray(frame)
    bumped[5] += 1  # version
    assert not lossless.decode(memoryview(bumped), out)
    assert not lossless.decode(memoryview(frame[:HEADER_BYTES + 3]), out)  # truncated
    zeros = bytearray(len(frame))
    assert not lossless.decode(memoryview(zeros), out)  # no frame at all
    long = bytearray(frame)
    struct.pack_into("<I", long, 12, 10**6)  # a length beyond the buffer
    assert open_frame(memoryview(long), 1, 1, shape.tag) is None
    garbled = bytearray(frame)
    garbled[HEADER_BYTES:HEADER_BYTES + 9] = b"\x01" + b"\xff" * 8  # zstd mode, data that is no zstd frame
    assert not lossless.decode(memoryview(garbled), out)
    garbled[HEADER_BYTES] = 7  # a mode this version does not know
    assert not lossless.decode(memoryview(garbled), out)


def test_fp16_error_is_float16_rounding_relative_to_each_value():
    """Channels from 1e-6 to 1e4 (beyond float16's range at the top, subnormal at the bottom without
    the per-channel power-of-two scale): every value within 2^-11 of itself, zeros stay zeros."""
    shape = BlockShape("float32", 4, 16, 48)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(shape.groups, shape.tokens, shape.channels, generator=g)
    x *= torch.logspace(-6, 4, shape.channels) * 10
    x[1, :, 3] = 0.0
    codec = make_codec("fp16", shape)
    y = decoded(codec, x.view(-1).view(torch.uint8)).view(torch.float32).view_as(x)
    absmax = x.abs().amax(dim=1, keepdim=True)
    # float16's step at the top of [2^14, 2^15) is 2^4 = absmax * 2^-11 at most; below, relative 2^-11
    assert bool(((y - x).abs() <= torch.maximum(x.abs() * 2**-11, absmax * 2**-24)).all())
    assert bool((y[1, :, 3] == 0).all())
    assert len(codec.encode(x.view(-1).view(torch.uint8))) < 0.5 * shape.block_bytes + 1000  # half, or less


def test_fp16_refuses_non_finite_blocks_and_16_bit_engines():
    shape = BlockShape("float32", 2, 16, 8)
    x = torch.randn(shape.numel)
    x[3] = float("nan")
    assert make_codec("fp16", shape).encode(x.view(torch.uint8)) is None
    with pytest.raises(ValueError):
        make_codec("fp16", BlockShape("bfloat16", 2, 16, 8))  # saves nothing on a 16-bit dtype
    frame = bytearray(make_codec("fp16", shape).encode(torch.randn(shape.numel).view(torch.uint8)))
    out = torch.empty(shape.block_bytes, dtype=torch.uint8)
    assert not make_codec("lossless", shape).decode(memoryview(frame), out)  # another codec's frame
    assert not make_codec("fp16", shape).decode(memoryview(frame[:-5]), out)  # truncated


@pytest.mark.parametrize(("name", "levels"), [("int7z", 63), ("int6z", 31)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_entropy_coded_quantisers_stay_within_half_their_step(name, levels, dtype):
    """int7z/int6z: int8's quantiser with fewer levels, then zstd; the error bound is half their step,
    and what decodes is exactly the uncompressed quantiser's output (the zstd stage is lossless)."""
    shape = BlockShape(dtype, 6, 16, 40)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape.groups, shape.tokens, shape.channels, generator=g) * torch.logspace(-3, 2, shape.channels)
    x[2, :, 7] = 0.0
    x = x.to(shape.torch_dtype)
    block = x.view(-1).view(torch.uint8)
    codec = make_codec(name, shape)
    y = decoded(codec, block)
    assert torch.equal(y, decoded(Int8Codec(shape, levels), block))  # exactly the same values
    y = y.view(shape.torch_dtype).view_as(x)
    absmax = x.float().abs().amax(dim=1, keepdim=True)
    step = torch.clamp(absmax / levels * (1 + 2**-8), min=2**-14)
    err = (y.float() - x.float()).abs()
    assert bool((err <= step / 2 + absmax * torch.finfo(shape.torch_dtype).eps).all())
    assert bool((y[2, :, 7] == 0).all())
    # Gaussian values in `levels` levels: zstd's entropy stage takes them well under a byte each
    assert len(codec.encode(block)) < Int8Codec(shape).max_bytes * (0.92 if levels == 63 else 0.82)


def test_entropy_coded_quantisers_refuse_what_they_cannot_decode():
    shape = BlockShape("float32", 4, 16, 64)
    block = torch.randn(shape.numel).view(torch.uint8)
    int7z, int6z = make_codec("int7z", shape), make_codec("int6z", shape)
    out = torch.empty_like(block)
    frame = bytearray(int7z.encode(block))
    assert not int6z.decode(memoryview(frame), out)  # another codec id
    assert not Int8Codec(shape).decode(memoryview(frame), out)
    sb = shape.groups * shape.channels * 2
    assert frame[HEADER_BYTES + sb] == 1  # the zstd mode
    garbled = bytearray(frame)
    garbled[HEADER_BYTES + sb + 1:HEADER_BYTES + sb + 9] = b"\xff" * 8  # zstd data that is no zstd frame
    assert not int7z.decode(memoryview(garbled), out)
    garbled[HEADER_BYTES + sb] = 9  # a mode this version does not know
    assert not int7z.decode(memoryview(garbled), out)
    assert not int7z.decode(memoryview(frame[:HEADER_BYTES + sb]), out)  # truncated before the mode byte
    bad = torch.randn(shape.numel)
    bad[3] = float("nan")
    assert int7z.encode(bad.view(torch.uint8)) is None  # non-finite: not stored
    with pytest.raises(ValueError, match="int7z needs"):
        make_codec("int7z", BlockShape.opaque(4096))

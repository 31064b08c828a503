"""Codec name (names.py) -> a codec for one block shape."""

from __future__ import annotations

from collections.abc import Callable

from .base import Codec
from .half import Fp16Codec
from .lossless import LosslessCodec
from .quant import Int8Codec
from .quant_zstd import Int6ZCodec, Int7ZCodec
from .shape import BlockShape

_BUILDERS: dict[str, Callable[[BlockShape], Codec]] = {"lossless": LosslessCodec, "int8": Int8Codec,
                                                        "fp16": Fp16Codec, "int7z": Int7ZCodec,
                                                        "int6z": Int6ZCodec}


def make_codec(name: str, shape: BlockShape) -> Codec | None:
    """None for "none" (the tier stores raw blocks, in the format it always had); ValueError for a
    name that is not a codec, or a codec this shape cannot feed (int8 without a layout)."""
    if name == "none":
        return None
    if name not in _BUILDERS:
        raise ValueError(f"unknown KV codec {name!r}")
    return _BUILDERS[name](shape)

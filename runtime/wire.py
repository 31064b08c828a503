"""Wire encoding: every message between processes is a msgspec.Struct encoded as msgpack.

No pickle anywhere. Decoders are cached per type because building one costs far more than a decode.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(obj: Any) -> bytes:
    """Encode a Struct (or any msgspec-supported value) as msgpack."""
    return _encoder.encode(obj)


@lru_cache(maxsize=256)
def decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    """`type_`: any type msgspec decodes (a Struct class, int, list[int], ...); the decoder is cached."""
    return msgspec.msgpack.Decoder(type_)


def decode(data: bytes | memoryview, type_: type[T]) -> T:
    """Decode msgpack bytes into `type_`; raises msgspec.DecodeError / ValidationError on bad input."""
    key: type = type_  # a plain `type` is Hashable to mypy (the cache key), a `type[T]` is not
    return decoder(key).decode(data)

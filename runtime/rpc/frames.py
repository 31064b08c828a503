"""Request-plane frames: 4-byte big-endian length, then one msgpack-encoded frame struct.

Frames are array-like tagged structs (smallest msgpack form). Payloads are encoded inline on send and
decoded lazily as `msgspec.Raw` on receipt, so each payload is serialized exactly once and decoded
once, into the type the receiver asks for.

Invariant of `FrameParser`: a frame whose declared length exceeds `max_frame` or whose body is not a
valid frame raises `ProtocolError` and nothing after it is parsed; the owner then drops the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from kvrelay.runtime.rpc.errors import FrameTooLarge

HEADER = 4
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


class Call(msgspec.Struct, tag=1, array_like=True):
    id: int
    endpoint: str
    payload: msgspec.Raw | Any


class Cancel(msgspec.Struct, tag=2, array_like=True):
    id: int


class Item(msgspec.Struct, tag=3, array_like=True):
    id: int
    payload: msgspec.Raw | Any


class End(msgspec.Struct, tag=4, array_like=True):
    id: int


class Fail(msgspec.Struct, tag=5, array_like=True):
    id: int
    kind: str  # exception class name, or "EndpointNotFound" / "Cancelled"
    message: str


class Auth(msgspec.Struct, tag=6, array_like=True):
    """The client's first frame when the server requires the internal token (docs/ARCHITECTURE.md "Trust
    boundary"); a server without a token ignores it."""

    token: str


class _CallIn(msgspec.Struct, tag=1, array_like=True):
    id: int
    endpoint: str
    payload: msgspec.Raw


class _ItemIn(msgspec.Struct, tag=3, array_like=True):
    id: int
    payload: msgspec.Raw


ServerInbound = _CallIn | Cancel | Auth
ClientInbound = _ItemIn | End | Fail


class ProtocolError(Exception):
    pass


class FrameEncoder:
    """Encodes a frame with its length prefix into a fresh bytearray (one allocation per frame)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._enc = msgspec.msgpack.Encoder()

    def encode(self, frame: Any) -> bytearray:
        buf = bytearray(HEADER)
        self._enc.encode_into(frame, buf, HEADER)
        size = len(buf) - HEADER
        if size > self.max_frame:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the maximum frame size {self.max_frame}")
        buf[:HEADER] = size.to_bytes(HEADER, "big")
        return buf


class FrameParser:
    """Incremental parser: feed it received chunks, it calls `on_frame` for each complete frame."""

    def __init__(self, inbound: Any, on_frame: Callable[[Any], None], max_frame: int = DEFAULT_MAX_FRAME):
        self._dec = msgspec.msgpack.Decoder(inbound)
        self._on_frame = on_frame
        self._max = max_frame
        self._pending = bytearray()  # an incomplete frame's bytes so far
        self._need = 0  # bytes `_pending` must reach before parsing is worth trying

    def feed(self, data: bytes) -> None:
        if self._pending:
            # Accumulate a large frame linearly instead of re-joining on every chunk.
            self._pending += data
            if len(self._pending) < self._need:
                return
            data, self._pending = bytes(self._pending), bytearray()
        # Decoded Raw payloads reference `data`; it is immutable bytes, so no copy and no resize hazard.
        view = memoryview(data)
        pos, end = 0, len(data)
        need = HEADER
        while end - pos >= HEADER:
            size = int.from_bytes(view[pos:pos + HEADER], "big")
            if size > self._max:
                raise ProtocolError(f"frame of {size} bytes exceeds maximum {self._max}")
            need = HEADER + size
            if end - pos < need:
                break
            try:
                frame = self._dec.decode(view[pos + HEADER:pos + need])
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise ProtocolError(f"malformed frame: {e}") from None
            pos += need
            need = HEADER
            self._on_frame(frame)
        if pos < end:
            self._pending = bytearray(view[pos:])
            self._need = need

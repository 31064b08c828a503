"""Reading a GGUF file: its metadata, and its tensors dequantized to float32 with llama.cpp names.

The `gguf` package (llama.cpp's own reader) parses the file; this module adds what a server needs on
top: every way a file can be wrong becomes one `GgufError` whose message names the tensor, type or
key at fault (a truncated file, a tensor type the reader does not know, a type it cannot
dequantize, a missing hyperparameter), raised before anything is written.

Shapes: GGUF lists dimensions fastest-first (`ne[0]` = row length); tensors come back in torch's
order (rows first), so `token_embd.weight` is `[vocab, hidden]` as in Hugging Face checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class GgufError(ValueError):
    """A GGUF file kvrelay cannot serve; the message is one line and names what is wrong."""


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type_name: str  # F32, F16, BF16, Q8_0, Q4_1, Q4_K, ...
    shape: tuple[int, ...]  # torch order (rows first)
    n_bytes: int


def _reader_class() -> type:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        """GGUFReader that checks each tensor's type and byte range before mapping it, so a bad file
        names the tensor at fault instead of failing in numpy's reshape."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:  # noqa: D102 - overrides gguf's
            size = len(self.data)
            spans = []  # (start, end, name, type)
            for field in fields:
                _len, name_data, _nd, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                try:
                    qtype = GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise GgufError(f"tensor {name!r} has unknown GGML type id {int(raw_dtype[0])}") from None
                block, type_size = GGML_QUANT_SIZES[qtype]
                n_elems = int(np.prod(dims))
                if n_elems % block:
                    raise GgufError(f"tensor {name!r}: {n_elems} elements are not whole {qtype.name} blocks")
                start = int(start_offs + offset[0])
                end = start + n_elems * type_size // block
                if end > size:
                    raise GgufError(f"file is truncated: tensor {name!r} ({qtype.name}) ends at byte {end}, "
                                    f"the file has {size}")
                spans.append((start, end, name, qtype.name))
            # Writers lay tensors out back to back, each padded to the alignment. A type field that was
            # changed gives a tensor another byte length, so it overlaps its successor or leaves a gap:
            # GGUF has no checksum, and this is how such a file is caught instead of served as noise.
            spans.sort()
            for (start, end, name, qname), (nxt, _e, nname, _q) in zip(spans, spans[1:], strict=False):
                if end > nxt or nxt - end >= self.alignment:
                    raise GgufError(f"tensor {name!r}: as {qname} it takes {end - start} bytes, which does not fit "
                                    f"before tensor {nname!r} (wrong type or offset)")
            super()._build_tensors(start_offs, fields)

    return CheckedReader


class GgufFile:
    """An open GGUF file (memory-mapped; nothing is read until a tensor is asked for)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GgufError(f"{self.path}: no such file")
        try:
            self._reader = _reader_class()(str(self.path), "r")
        except GgufError as e:
            raise GgufError(f"{self.path.name}: {e}") from None
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
            # The header itself is cut or malformed (gguf raises whatever numpy raised).
            raise GgufError(f"{self.path.name}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise GgufError(f"{self.path.name}: metadata key {key!r} is malformed ({e})") from None

    # -- metadata ---------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GgufError(f"{self.path.name}: metadata key {key!r} is missing")
        return self.metadata[key]

    # -- tensors ----------------------------------------------------------------------------------

    def tensors(self) -> list[GgufTensor]:
        return [GgufTensor(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                           int(t.n_bytes)) for t in self._reader.tensors]

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as a float32 array in torch's dimension order."""
        from gguf.quants import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise GgufError(f"{self.path.name}: tensor {name!r} is missing")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            out = dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise GgufError(f"{self.path.name}: tensor {name!r} has type {t.tensor_type.name}, which the gguf "
                            f"package cannot dequantize") from None
        return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for t in self._reader.tensors:
            yield t.name, self.tensor(t.name)

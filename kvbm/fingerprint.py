"""Model fingerprint: the root of every block hash (docs/ARCHITECTURE.md "Block identity").

Two workers serving the same weights must agree on it wherever the files live, and different weights
must not collide. It covers config.json, and for every safetensors file its size, its header (tensor
names, dtypes, shapes, offsets) and its first and last MiB of data. Hashing whole multi-GB files at
startup would cost more than it protects against.
"""

from __future__ import annotations

from pathlib import Path

import xxhash

_SAMPLE = 1 << 20


def model_fingerprint(model_dir: str | Path) -> str:
    model_dir = Path(model_dir)
    h = xxhash.xxh3_128()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, size)))
            h.update(fh.read(_SAMPLE))
            fh.seek(max(0, size - _SAMPLE))
            h.update(fh.read(_SAMPLE))
    return h.hexdigest()

"""The codec names a tier may be configured with (`--kv-compress-g3/-g4`), importable without torch.

TierConfig (the worker's flags) checks its values against these; the codecs themselves (which import
torch and zstandard) live in the sibling modules and are built by `registry.make_codec`.
"""

from __future__ import annotations

CODEC_NAMES = ("none", "lossless", "fp16", "int8", "int7z", "int6z")
LOSSY = frozenset({"fp16", "int8", "int7z", "int6z"})  # changes the KV: off by default, quality measured by perf/kv_codec_bench.py


def check_codec_name(value: str) -> str | None:
    """A setting check: None if `value` names a codec, else why not."""
    return None if value in CODEC_NAMES else f"unknown codec {value!r} (choose from {', '.join(CODEC_NAMES)})"

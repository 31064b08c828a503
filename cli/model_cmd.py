"""`kvrelay model list | tiny [--out DIR] | convert MODEL`: the models kvrelay serves offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvrelay.runtime.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="list, build or convert the models kvrelay can serve offline")
    model.add_argument("action", choices=["list", "tiny", "convert"],
                       help="list: what can be served and where it is cached; tiny: build the deterministic "
                            "tiny Llama + BPE tokenizer; convert: convert MODEL (a .gguf file or a packaged "
                            "name) into the cache now and print its directory")
    model.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help="convert: smollm2-135m-instruct, a .gguf file, or a directory holding one")
    model.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="tiny: output directory (default: the user cache, reused when already built)")
    model.set_defaults(func=_model)


def _model(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list()
    if args.action == "convert":
        return _convert(args.model)
    if args.model is not None:
        raise ConfigError(f"MODEL: 'kvrelay model tiny' takes no model, got {args.model!r}")
    # Imported here: the builder pulls in torch, which `kvrelay --help` should not pay for.
    from kvrelay.workers.models.tiny import build_tiny_model, ensure_tiny_model

    try:
        out = build_tiny_model(args.out) if args.out is not None else ensure_tiny_model()
    except FileExistsError as e:  # the target holds something that is not a tiny-model build
        raise ConfigError(f"--out: {e}" if args.out is not None else str(e)) from None
    except OSError as e:
        sys.stderr.write(f"kvrelay model: error: {e}\n")
        return 1
    print(out)
    return 0


def _convert(spec: str | None) -> int:
    from kvrelay.workers.models.gguf_file import GgufError
    from kvrelay.workers.models.registry import ModelNotFound, resolve_model

    if not spec:
        raise ConfigError("MODEL: 'kvrelay model convert' needs a model (a .gguf file or a packaged name)")
    try:
        print(resolve_model(spec).path)
    except (ModelNotFound, GgufError) as e:
        raise ConfigError(f"MODEL: {e}") from None
    return 0


def _list() -> int:
    from kvrelay.workers.models.catalog import catalog

    rows = catalog()
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.state:<13}  {r.description}")
        print(f"{'':<{width}}  {'source':<13}  {r.source}")
        if r.cache_dir:
            print(f"{'':<{width}}  {'cached':<13}  {r.cache_dir} ({r.cache_bytes / 1e6:.0f} MB)")
    return 0

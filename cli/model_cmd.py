"""`kvrelay model tiny [--out DIR]`: build the embedded default model (offline, byte-identical every run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvrelay.runtime.config import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="build models kvrelay can serve without network access")
    model.add_argument("action", choices=["tiny"],
                       help="tiny: the deterministic tiny Llama checkpoint + BPE tokenizer `kvrelay serve` uses")
    model.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="output directory (default: the user cache, reused when already built)")
    model.set_defaults(func=_model)


def _model(args: argparse.Namespace) -> int:
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

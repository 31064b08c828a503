"""`kvrelay cache list|clean`: what kvrelay keeps on this user's disk, and removing what is not in use.

Kinds (every default that takes disk is cleanable; docs/ARCHITECTURE.md "Tiers"):
- `g3`: G3 slots, `<kv dir>/<fingerprint>/slot-<n>` (blocks.dat grows as blocks are written: its size counts).
  A slot whose lock a live worker holds is `in use` and never removed.
- `model-card`: tokenizer files frontends cached per model card (re-fetched from a worker when needed).
- `run`: `kvrelay serve` run directories (`run/serve-<pid>-*`); `stale` once that pid is gone (a
  SIGKILLed serve cannot remove its own).
Downloaded or converted models are not touched here (see `kvrelay model`).
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvrelay.runtime.paths import cache_dir, default_run_dir

KINDS = ("g3", "model-card", "run")


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    bytes: int
    in_use: bool

    @property
    def state(self) -> str:
        if self.kind == "run":
            return "in use" if self.in_use else "stale"
        return "in use" if self.in_use else "free"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list or remove kvrelay's on-disk caches (G3 slots, model cards, runs)")
    p.add_argument("action", choices=["list", "clean"])
    p.add_argument("--kind", choices=KINDS, action="append", default=None,
                   help="only this kind (repeatable; default: all)")
    p.set_defaults(func=_cache)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def entries(kinds: tuple[str, ...] = KINDS) -> list[Entry]:
    from kvrelay.kvbm.tier_config import (  # the tiers import torch: not at startup
        default_cache_dir,
        slot_in_use,
    )

    found: list[Entry] = []
    kv = default_cache_dir()
    if "g3" in kinds and kv.is_dir():
        for slot in sorted(kv.glob("*/slot-*")):
            found.append(Entry("g3", slot, _size(slot), slot_in_use(slot)))
    cards = cache_dir() / "model-cards"
    if "model-card" in kinds and cards.is_dir():
        found += [Entry("model-card", c, _size(c), False) for c in sorted(cards.iterdir())]
    runs = default_run_dir()
    if "run" in kinds and runs.is_dir():
        for run in sorted(runs.glob("serve-*")):
            pid = run.name.split("-")[1]
            found.append(Entry("run", run, _size(run), pid.isdigit() and _pid_alive(int(pid))))
    return found


def _cache(args: argparse.Namespace) -> int:
    kinds = tuple(args.kind or KINDS)
    listed = entries(kinds)
    if args.action == "list":
        for e in listed:
            print(f"{e.kind:<11} {e.bytes / 2**20:>10.1f} MiB  {e.state:<7} {e.path}")
        print(f"{'total':<11} {sum(e.bytes for e in listed) / 2**20:>10.1f} MiB")
        return 0
    freed = 0
    for e in listed:
        if e.in_use:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        freed += e.bytes
        print(f"removed {e.kind} {e.path}")
    for fingerprint_dir in {e.path.parent for e in listed if e.kind == "g3" and not e.in_use}:
        if not any(fingerprint_dir.iterdir()):  # its last slot went
            fingerprint_dir.rmdir()
    print(f"freed {freed / 2**20:.1f} MiB")
    return 0

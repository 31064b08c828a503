"""What `kvrelay serve` takes from the disk, stated in one startup line (issue 30: 8 GB were taken
unannounced): the model directory it serves and the G3 ceiling of its workers, with where each lives.

G3 files grow as blocks are written (kvbm/tiers/disk.py), so the ceiling is what they may reach, not
what they take at start; a slot that holds no block when its worker stops is removed.
"""

from __future__ import annotations

from pathlib import Path

from kvrelay.workers.config import WorkerConfig


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (a file: its size)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def g3_ceiling(wk: WorkerConfig) -> tuple[Path | None, int]:
    """(G3 base directory, most bytes one worker's slot may take), or (None, 0) with G3 off."""
    if wk.kv_disk_dir == "off":
        return None, 0
    from kvrelay.kvbm.tier_config import default_cache_dir, disk_bytes_bound

    base = default_cache_dir() if wk.kv_disk_dir == "auto" else Path(wk.kv_disk_dir)
    return base, disk_bytes_bound(base, wk.kv_disk_bytes)[0]


def disk_statement(wk: WorkerConfig, workers: int) -> str:
    """One line: 'disk: model 540.3 MiB in DIR; G3 KV cache up to 2 x 1.00 GiB = 2.00 GiB under DIR ...'."""
    model = Path(wk.model)
    parts = [f"model {tree_bytes(model) / 2**20:.1f} MiB in {model} (its tokenizer files also in model-cards/)"]
    base, per_worker = g3_ceiling(wk)
    if base is None:
        parts.append("G3 KV cache off")
    else:
        parts.append(f"G3 KV cache up to {workers} x {per_worker / 2**30:.2f} GiB = "
                     f"{workers * per_worker / 2**30:.2f} GiB under {base}, growing as blocks are written "
                     "(--kv-disk-bytes per worker, --kv-disk-dir off to disable; `kvrelay cache clean` frees it)")
    return "disk: " + "; ".join(parts)

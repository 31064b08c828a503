"""Which lower tiers a worker keeps, and opening them (flags in workers/config.py, docs in kvbm/README.md).

G2 and G3 are on by default, G4 only when given a URL:
- `object_store`: `s3://bucket[/prefix]?endpoint=http://host:port&region=r` (credentials from the AWS_*
  environment) or `file:///path` (obstore's LocalStore: the embedded, single-machine G4).
- `disk_dir`: "auto" = `kv/` in kvrelay's cache directory (`$KVRELAY_CACHE_DIR` or ~/.cache/kvrelay);
  "off" = no G3. Under it a worker
  uses `<fingerprint[:16]>/slot-<n>`, the first slot no other live process has locked, so several
  workers share one base directory and a restarted worker finds its slot (and its blocks) again.
- `disk_bytes` is a ceiling (default `DEFAULT_DISK_BYTES`, 1 GiB: two default workers fit a laptop); the
  slot's files grow as blocks are written, up to it, and a slot that holds no block when its worker
  stops is removed. A slot takes at most `DISK_FREE_SHARE` (10%) of the free space of its
  filesystem (its own existing files counted as free), so a default never fills a user's disk; the
  size chosen and why are logged when G3 opens. `kvrelay cache list|clean` shows and removes slots.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs, urlsplit

from kvrelay.kvbm.codecs.names import check_codec_name
from kvrelay.runtime.config import non_negative, positive, setting

if TYPE_CHECKING:  # the stores import torch; TierConfig (the worker's flags) must not
    from kvrelay.kvbm.codecs.base import Codec
    from kvrelay.kvbm.codecs.shape import BlockShape
    from kvrelay.kvbm.tiers import DiskStore, TierStore
    from kvrelay.kvbm.tiers.base import EventCallback

log = logging.getLogger(__name__)
MAX_DISK_SLOTS = 16
DISK_FREE_SHARE = 0.10  # a G3 slot takes at most this share of its filesystem's free space
DEFAULT_DISK_BYTES = 1 << 30  # per worker; the files grow as blocks are written, up to this


class TierConfigError(ValueError):
    pass


def _object_store_url(url: str) -> str | None:
    try:
        check_object_store_url(url)
    except TierConfigError as e:
        return str(e).removeprefix("--kv-object-store: ")
    return None


@dataclass(frozen=True)
class TierConfig:
    """The lower tiers' settings, declared once: the worker's `--kv-<field>` flags are derived from these
    fields (workers/config.py), with these defaults, help lines and checks."""

    host_bytes: int = setting(512 << 20, "G2: bytes of host memory for KV blocks (0 = no G2)", non_negative)
    disk_dir: str = setting("auto", "G3: base directory for KV blocks on local disk (auto = "
                            "$KVRELAY_CACHE_DIR/kv, default ~/.cache/kvrelay/kv; off = no G3)")
    disk_bytes: int = setting(DEFAULT_DISK_BYTES, "G3: most bytes of disk (data file + index) per worker; "
                              "the files grow as blocks are written", positive)
    object_store: str = setting("", "G4: s3://bucket[/prefix]?endpoint=URL or file:///path (empty = no G4; "
                                "credentials from AWS_* variables)", _object_store_url)
    object_bytes: int = setting(16 << 30, "G4: bound on the bytes of objects this worker writes", positive)
    tier_policy: Literal["lru", "tinylfu"] = setting("lru", "eviction/admission policy of G2-G4")
    offload: Literal["write-back", "write-through"] = setting(
        "write-back", "copy G1 blocks down when they become evictable (write-back) or when computed "
        "(write-through)")
    onboard: Literal["cost", "always"] = setting(
        "cost", "load a lower-tier hit only when the measured cost model says it beats recompute, or always")
    compress_g3: str = setting("none", "G3: codec of stored blocks: none, lossless (byte planes + zstd, "
                               "bit-exact), fp16 (lossy, float32 KV only), int8 (lossy, per-channel), int7z or "
                               "int6z (lossy, fewer levels + zstd; kvbm/README.md Compression)", check_codec_name)
    compress_g4: str = setting("none", "G4: codec of stored objects: none, lossless, fp16, int8, int7z or int6z "
                               "(as for G3)",
                               check_codec_name)
    tier_retry_s: float = setting(30.0, "seconds before a tier disabled by an I/O error (S3 down, disk "
                                  "error) is probed again; a probe that works re-enables it", positive)

    @property
    def any(self) -> bool:
        return bool(self.host_bytes or self.disk_dir != "off" or self.object_store)


def default_cache_dir() -> Path:
    """Where `disk_dir="auto"` puts G3: `$KVRELAY_KV_DISK_DIR` when it names a directory (the flag's own
    variable, so in-process workers built from defaults agree with `kvrelay worker`), else `kv/` in
    kvrelay's cache directory."""
    from kvrelay.runtime.paths import cache_dir

    env = os.environ.get("KVRELAY_KV_DISK_DIR", "")
    return Path(env) if env not in ("", "auto", "off") else cache_dir() / "kv"


def check_object_store_url(url: str) -> None:
    """Raise TierConfigError if `url` is neither empty, s3://bucket[...] nor file:///path."""
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.path:
        return
    if parts.scheme == "s3" and parts.netloc:
        unknown = set(parse_qs(parts.query)) - {"endpoint", "region"}
        if unknown:
            raise TierConfigError(f"--kv-object-store: unknown parameter(s) {sorted(unknown)}; "
                                  "known: endpoint, region")
        return
    raise TierConfigError(f"--kv-object-store: {url!r} is not s3://bucket[/prefix][?endpoint=...] "
                          "or file:///path")


def object_store_from_url(url: str):
    """An obstore store for a G4 URL; TierConfigError for anything else."""
    from kvrelay.kvbm.tiers import s3_store
    check_object_store_url(url)
    parts = urlsplit(url)
    if parts.scheme == "file":
        from obstore.store import LocalStore

        from kvrelay.runtime.paths import private_dir

        return LocalStore(str(private_dir(Path(parts.path))))  # KV blocks: owner only
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    endpoint = query.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL")
    prefix = parts.path.strip("/")
    return s3_store(parts.netloc, endpoint=endpoint, prefix=prefix or None,
                    region=query.get("region") or os.environ.get("AWS_REGION", "us-east-1"))


async def open_tiers(cfg: TierConfig, block_bytes: int, fingerprint: str,
                     on_event: dict[str, EventCallback], shape: BlockShape | None = None) -> list[TierStore]:
    """Open the configured tiers, fastest first. A tier that cannot open is left out with a WARNING
    (serving goes on without it); a malformed configuration raises TierConfigError. `shape`: the
    block's structure, for G3/G4 codecs (kvbm/codecs); None = opaque bytes (lossless still works)."""
    from kvrelay.kvbm.codecs.shape import BlockShape
    from kvrelay.kvbm.codecs.store import CodecStore, slot_bytes
    from kvrelay.kvbm.tiers import HostStore, ObjectStore

    if shape is None or shape.block_bytes != block_bytes:
        shape = BlockShape.opaque(block_bytes)

    stores: list[TierStore] = []
    if cfg.host_bytes:
        if cfg.host_bytes < block_bytes:
            raise TierConfigError(f"--kv-host-bytes {cfg.host_bytes} holds no block of {block_bytes} bytes")
        stores.append(HostStore(block_bytes, cfg.host_bytes, policy=cfg.tier_policy, on_event=on_event.get("G2"),
                                retry_after_s=cfg.tier_retry_s))
    if cfg.disk_dir != "off" and (codec := _codec(cfg.compress_g3, shape, "G3")) is not False:
        variable = codec is not None and not codec.fixed_size  # frames of their own length, sparse G3
        disk = await _open_disk(cfg, slot_bytes(codec, True) if codec else block_bytes, fingerprint,
                                on_event.get("G3"), variable)
        if disk is not None:
            stores.append(CodecStore(disk, codec, variable=variable) if codec else disk)
    if cfg.object_store and (codec := _codec(cfg.compress_g4, shape, "G4")) is not False:
        store = object_store_from_url(cfg.object_store)
        g4 = ObjectStore(store, fingerprint, codec.max_bytes if codec else block_bytes, cfg.object_bytes,
                         policy=cfg.tier_policy, on_event=on_event.get("G4"), retry_after_s=cfg.tier_retry_s,
                         variable=codec is not None, key_tag=codec.name if codec else "")
        stores.append(CodecStore(g4, codec, variable=True) if codec else g4)
    return stores


def _codec(name: str, shape: BlockShape, tier: str) -> Codec | None | Literal[False]:
    """The tier's codec (None: raw blocks), or False when this engine cannot feed it (WARNING; the tier
    is left out rather than silently storing another format)."""
    from kvrelay.kvbm.codecs.registry import make_codec

    try:
        return make_codec(name, shape)
    except ValueError as exc:
        log.warning("KV tier %s disabled: --kv-compress-%s %s: %s", tier, tier.lower(), name, exc)
        return False


async def _open_disk(cfg: TierConfig, block_bytes: int, fingerprint: str,
                     on_event: EventCallback | None, variable: bool = False) -> DiskStore | None:
    from kvrelay.kvbm.tiers import DiskStore

    base = default_cache_dir() if cfg.disk_dir == "auto" else Path(cfg.disk_dir)
    if cfg.disk_bytes < 4096 + block_bytes:
        raise TierConfigError(f"--kv-disk-bytes {cfg.disk_bytes} holds no block of {block_bytes} bytes")
    for n in range(MAX_DISK_SLOTS):
        directory = base / fingerprint[:16] / f"slot-{n}"
        if slot_in_use(directory):
            continue
        size, free = disk_bytes_bound(directory, cfg.disk_bytes)
        if size < 4096 + block_bytes:
            log.warning("KV tier G3 disabled: %s has %.1f GiB free; %.0f%% of it holds no block",
                        directory, free / 2**30, 100 * DISK_FREE_SHARE)
            return None
        if size < cfg.disk_bytes:
            log.info("KV tier G3: %.2f GiB instead of --kv-disk-bytes %.2f GiB (%.0f%% of %.1f GiB free)",
                     size / 2**30, cfg.disk_bytes / 2**30, 100 * DISK_FREE_SHARE, free / 2**30)
        store = await DiskStore.open(directory, block_bytes, size, policy=cfg.tier_policy, on_event=on_event,
                                     remove_if_empty=True, retry_after_s=cfg.tier_retry_s, variable=variable)
        if store.enabled:
            log.info("KV tier G3 at %s: up to %.2f GiB (%d blocks), grows as blocks are written; "
                     "holds %.1f MiB now (O_DIRECT %s)", directory, size / 2**30, store.num_slots,
                     store.stats.footprint_bytes / 2**20, store.direct_io)
            return store
        await store.close()  # it warned why (disk full, permissions, ...)
        return None
    log.warning("KV tier G3 disabled: all %d slots under %s are in use", MAX_DISK_SLOTS, base)
    return None


def disk_bytes_bound(directory: Path, requested: int) -> tuple[int, int]:
    """(bytes a G3 slot in `directory` may take, free bytes counted): `requested`, capped at
    DISK_FREE_SHARE of the filesystem's free space plus what the slot's own files already take."""
    import shutil

    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    own = sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) if directory.is_dir() else 0
    free = shutil.disk_usage(existing).free + own
    return min(requested, int(free * DISK_FREE_SHARE)), free


def slot_in_use(directory: Path) -> bool:
    """True if another live process holds this slot's lock (DiskStore flocks `lock` while open)."""
    import fcntl

    path = directory / "lock"
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)

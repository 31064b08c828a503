"""A model directory in the user cache, installed atomically and verified on every use.

A builder writes every file into a hidden temp dir beside the target, then the manifest
(`kvrelay-manifest.json`: a digest of every other file) last, then renames the dir into place. So a
reader sees either no entry or a whole one, a killed build leaves only a temp dir (swept later), and
a concurrent builder that loses the race reuses the winner's identical entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "kvrelay-manifest.json"
_DIGESTS: dict[str, Callable[[Path], str]] = {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _xxh3_128(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


_DIGESTS.update(sha256=_sha256, xxh3_128=_xxh3_128)


def json_bytes(obj: Any) -> bytes:
    """Sorted keys, two-space indent: the same object always gives the same bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: Path, obj: Any) -> None:
    path.write_bytes(json_bytes(obj))


def file_digest(path: Path, algo: str = "sha256") -> str:
    return _DIGESTS[algo](path)


def write_manifest(d: Path, meta: dict[str, Any], algo: str = "sha256") -> None:
    """Last step of a build: the digest of every file in `d`. `algo` is recorded unless it is the
    default (so older sha256 manifests keep their exact bytes)."""
    files = {p.name: file_digest(p, algo) for p in sorted(d.iterdir()) if p.name != MANIFEST}
    body = {**meta, "files": files} if algo == "sha256" else {**meta, "digest": algo, "files": files}
    write_json(d / MANIFEST, body)


def read_verified_manifest(d: Path) -> bytes | None:
    """The manifest's bytes if `d` is a complete entry whose files match their recorded digests."""
    try:
        raw = (d / MANIFEST).read_bytes()
        body = json.loads(raw)
        digest = _DIGESTS[body.get("digest", "sha256")]
        ok = all(digest(d / name) == value for name, value in body["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return raw if ok else None


def build_entry(out: Path, write: Callable[[Path], None], what: str) -> Path:
    """Run `write(tmp_dir)` (which must end by writing the manifest) and install the result at `out`.
    Refuses (FileExistsError) to replace a non-empty directory that is not a kvrelay entry. On any
    error nothing is left at `out` and the temp dir is removed."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a model dir is ordinary data
        write(tmp)
        _install(tmp, out, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return out


def _install(tmp: Path, out: Path, what: str) -> None:
    ours = (tmp / MANIFEST).read_bytes()
    for _ in range(5):
        try:
            os.replace(tmp, out)  # atomic; succeeds onto a missing or empty dir only
            return
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise FileExistsError(f"{out} exists and is not a directory") from None
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if read_verified_manifest(out) == ours:
            return  # an identical build is already in place (e.g. a concurrent builder won)
        if not (out / MANIFEST).is_file():
            raise FileExistsError(f"{out} exists and is not a kvrelay {what}; not overwriting it")
        trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):  # someone else moved it aside first
            os.replace(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
    raise RuntimeError(f"could not install {what} at {out}: the directory keeps changing")


def sweep_stale_temps(out: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp dirs left by builds that were killed; a live build finishes well within the age."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    for p in out.parent.iterdir():
        with contextlib.suppress(OSError):
            if p.name.startswith(prefixes) and time.time() - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)

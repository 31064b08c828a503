"""Where kvrelay keeps per-user state (models, discovery dir, sockets). Honors KVRELAY_CACHE_DIR."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("KVRELAY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvrelay"
    )
    return Path(root)


def default_discovery_dir() -> Path:
    return cache_dir() / "discovery"


def default_run_dir() -> Path:
    """Sockets and other per-run files of the embedded shape."""
    return cache_dir() / "run"


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter (0700), created with its missing parents (each
    0700). One that already exists and belongs to this user is tightened to 0700: files inside hold
    prompt-derived data (KV blocks, tokenizer copies, discovery records) that other local users must
    not read. Directories of other users are left alone (their owner decides)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path

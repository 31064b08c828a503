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

"""The internal token (docs/ARCHITECTURE.md "Trust boundary"): a shared secret every worker RPC and TCP transfer
port requires, so that no other local user or host can call `generate`, read or write KV blocks.

Where it comes from, first match wins: `--internal-token-file PATH` (the file's first line; a
Kubernetes Secret mounted as a file), `--internal-token` / env `KVRELAY_INTERNAL_TOKEN` (prefer the
env: flags show in `ps`). Empty means no token: only for single-user development. `kvrelay serve`
generates one per run when none is given and hands it to its workers through the environment.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from kvrelay.runtime.config import ConfigError, setting

TOKEN_ENV = "KVRELAY_INTERNAL_TOKEN"


@dataclass(frozen=True)
class InternalAuthConfig:
    group_title = "internal auth (worker RPC and KV transfer ports)"
    internal_token: str = setting("", "shared secret required on worker RPC and KV transfer ports "
                                  "(empty = none; kvrelay serve generates one per run)")
    internal_token_file: str = setting("", "read the internal token from this file's first line")

    def token(self) -> str:
        if not self.internal_token_file:
            return self.internal_token
        return read_secret_file(self.internal_token_file, "--internal-token-file")


def read_secret_file(path: str, flag: str) -> str:
    """The secret on `path`'s first line (a Kubernetes Secret mounted as a file); ConfigError naming
    `flag` when it cannot be read or is empty."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{flag}: {e.strerror}: {path}") from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ConfigError(f"{flag}: {path} is empty")
    return secret


def new_token() -> str:
    return secrets.token_urlsafe(32)

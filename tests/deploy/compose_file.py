"""The compose file as compose reads it: YAML with merge keys, `${VAR:-default}` interpolation."""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose" / "docker-compose.yml"
# Services built from the kvrelay image: the ones a test runs as local processes.
KVRELAY_IMAGE = re.compile(r"^\$\{KVRELAY_(CUDA_)?IMAGE")


def compose_schema() -> dict:
    """The compose-spec JSON schema, as shipped by docker-compose 1.29.2 on PyPI (installed --no-deps by
    .ci/run: only its schema file is used)."""
    try:
        dist = distribution("docker-compose")
    except PackageNotFoundError:
        pytest.fail("pip install --no-deps docker-compose==1.29.2 (the compose-spec schema; see .ci/run)")
    path = next(f.locate() for f in dist.files or [] if str(f).endswith("compose_spec.json"))
    return json.loads(Path(path).read_text())


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default} ('' counts as unset), $$ -> $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\$|\$\{(\w+)(:-([^}]*))?\}", sub, value)


def load(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def kvrelay_services(doc: dict, profile: str) -> dict[str, dict]:
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: svc for name, svc in doc["services"].items()
            if KVRELAY_IMAGE.match(raw[name].get("image", "")) and (not svc.get("profiles") or profile in svc["profiles"])}


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}

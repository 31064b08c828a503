from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.servers import ServerProcess, etcd_server, nats_server


def pytest_configure(config):
    """Workers keep G3 on disk and G2 in memory by default. Under test they use a session directory
    (never the user's cache) and small tiers; module-scoped servers start before any function fixture,
    so this is set for the whole session first."""
    global _SESSION_KV
    _SESSION_KV = tempfile.mkdtemp(prefix="kvrelay-test-kv-")
    os.environ["KVRELAY_KV_DISK_DIR"] = _SESSION_KV
    os.environ.setdefault("KVRELAY_KV_DISK_BYTES", "256MiB")
    os.environ.setdefault("KVRELAY_KV_HOST_BYTES", "64MiB")


def pytest_unconfigure(config):
    if _SESSION_KV:
        shutil.rmtree(_SESSION_KV, ignore_errors=True)


_SESSION_KV = ""


@pytest.fixture(autouse=True)
def kv_disk_dir(tmp_path, monkeypatch):
    """One G3 directory per test, so no test sees another's blocks; removed afterwards (G3 files keep
    what was written)."""
    kv = tmp_path / "kv"
    monkeypatch.setenv("KVRELAY_KV_DISK_DIR", str(kv))
    yield kv
    shutil.rmtree(kv, ignore_errors=True)


@pytest.fixture
def etcd(tmp_path) -> ServerProcess:
    server = etcd_server(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats(tmp_path) -> ServerProcess:
    server = nats_server(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (moto) for G4. Workers configured by URL (--kv-object-store) take
    credentials from the environment, like boto."""
    from tests.kvbm.helpers import S3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    server = S3(tmp_path_factory.mktemp("moto"))
    server.proc.start()
    yield server
    server.proc.stop()

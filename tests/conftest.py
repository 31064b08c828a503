from __future__ import annotations

import pytest

from tests.servers import ServerProcess, etcd_server, nats_server


@pytest.fixture(autouse=True)
def kv_disk_dir(tmp_path, monkeypatch):
    """Workers keep G3 on disk by default: one directory per test, so no test sees another's blocks
    (and none writes to the user's cache). In-process workers resolve "auto" through
    default_cache_dir; worker processes read the flag's environment variable."""
    kv = tmp_path / "kv"
    monkeypatch.setattr("kvrelay.kvbm.tier_config.default_cache_dir", lambda: kv)
    monkeypatch.setenv("KVRELAY_KV_DISK_DIR", str(kv))


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

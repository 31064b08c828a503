from __future__ import annotations

import pytest

from tests.servers import ServerProcess, etcd_server, nats_server


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

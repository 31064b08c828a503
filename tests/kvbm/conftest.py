from __future__ import annotations

import pytest

from tests.kvbm.helpers import S3


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    server = S3(tmp_path_factory.mktemp("moto"))
    server.proc.start()
    yield server
    server.proc.stop()

from __future__ import annotations

import os

import pytest

from tests.kvbm.helpers import S3


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    # Workers configured by URL (--kv-object-store) take credentials from the environment, like boto.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    server = S3(tmp_path_factory.mktemp("moto"))
    server.proc.start()
    yield server
    server.proc.stop()

"""A real S3-compatible server (moto) child process for benchmarks that need G4 (issue 31's G4 arm).

Benchmarks do not import tests/, so this is the perf side's own small starter: `python -m moto.server`
on a free loopback port, one fresh bucket, and the `--kv-object-store` URL that names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from kvrelay.perf.serve_process import free_port, wait_until_up

# moto accepts any credentials; workers (like boto) read them from the environment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoS3:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen | None = None
        self.bucket = f"kvrelay-bench-{uuid.uuid4().hex[:8]}"

    def start(self, timeout: float = 60.0) -> MotoS3:
        for key, value in CREDENTIALS.items():
            os.environ.setdefault(key, value)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_until_up(self.proc, f"{self.url}/moto-api/", timeout, lambda: Path(self.log.name).read_text()[-2000:],
                      "moto")
        self._client().create_bucket(Bucket=self.bucket)
        return self

    def _client(self) -> Any:
        import boto3  # type: ignore[import-untyped]  # no stubs installed; only the G4 arm needs boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def store_url(self) -> str:
        """The `--kv-object-store` (WorkerConfig.kv_object_store) URL of this run's bucket."""
        return f"s3://{self.bucket}?endpoint={self.url}"

    def objects(self) -> int:
        s3 = self._client()
        return sum(page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

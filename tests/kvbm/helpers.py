"""Shared by the tier tests: a KV-shaped G1 pool, store factories sized in blocks, a real S3 server."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import torch

from kvrelay.kvbm.tiers import DiskStore, HostStore, ObjectStore, s3_store
from kvrelay.kvbm.tiers.disk import ALIGN
from kvrelay.kvbm.tiers.disk_index import DiskIndex
from kvrelay.kvbm.tiers.object_store import HEADER_BYTES
from tests.servers import ServerProcess, free_port

# One block of a block-contiguous KV cache [layers, k/v, block_size, kv_heads, head_dim], fp16: 8 KiB.
BLOCK_SHAPE = (2, 2, 16, 2, 32)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 32 * 2
FINGERPRINT = "test-model-fp"
CREDS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
KINDS = ["G2", "G3", "G3-buffered", "G4"]


def content(h: int, block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """The bytes every test puts under hash h: distinct per hash, identical on every put of h."""
    g = torch.Generator().manual_seed(h & 0x7FFFFFFF)
    return torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=g)


def kv_pool(hashes: list[int]) -> torch.Tensor:
    """A G1-like fp16 pool [n, *BLOCK_SHAPE] whose block i holds content(hashes[i])."""
    pool = torch.empty((len(hashes), *BLOCK_SHAPE), dtype=torch.float16)
    for i, h in enumerate(hashes):
        pool[i].view(-1).view(torch.uint8).copy_(content(h))
    return pool


def same(t: torch.Tensor, h: int) -> bool:
    return bool(torch.equal(t.reshape(-1).view(torch.uint8), content(h, t.numel() * t.element_size())))


def capacity_for(kind: str, blocks: int, block_bytes: int = BLOCK_BYTES) -> int:
    """The byte bound that makes a store of this kind hold exactly `blocks` blocks."""
    if kind.startswith("G3"):
        slot = -(-block_bytes // ALIGN) * ALIGN
        return blocks * slot + DiskIndex.max_bytes(blocks)
    if kind == "G4":
        return blocks * (HEADER_BYTES + block_bytes)
    return blocks * block_bytes


class S3:
    """A real moto S3 server process on a free loopback port."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = ServerProcess("moto", argv, self.port, workdir / f"moto-{self.port}.log")

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, **CREDS)

    def store_url(self, bucket: str) -> str:
        """The `--kv-object-store` URL of a bucket on this server."""
        return f"s3://{bucket}?endpoint={self.url}"

    def new_bucket(self) -> str:
        name = f"kvrelay-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def make_store(kind: str, blocks: int, *, tmp: Path, s3: S3 | None = None, bucket: str | None = None,
               block_bytes: int = BLOCK_BYTES, **kw: Any) -> Any:
    cap = capacity_for(kind, blocks, block_bytes)
    if kind == "G2":
        return HostStore(block_bytes, cap, **kw)
    if kind.startswith("G3"):
        return DiskStore(tmp / "g3", block_bytes, cap, direct_io=kind == "G3", **kw)
    assert s3 is not None and bucket is not None
    store = s3_store(bucket, endpoint=s3.url, access_key_id="test", secret_access_key="test", timeout_s=5)
    kw.setdefault("timeout_s", 5.0)
    return ObjectStore(store, FINGERPRINT, block_bytes, cap, **kw)


class Events:
    """Replays a store's on_event stream into the set of hashes it says the tier holds."""

    def __init__(self, initial: list[int] | None = None):
        self.held: set[int] = set(initial or [])
        self.log: list[tuple[str, list[int]]] = []

    def __call__(self, kind: str, hashes: list[int]) -> None:
        self.log.append((kind, list(hashes)))
        for h in hashes:
            if kind == "stored":
                assert h not in self.held, f"stored twice without a removal: {h}"
                self.held.add(h)
            else:
                assert h in self.held, f"removed but never stored: {h}"
                self.held.discard(h)

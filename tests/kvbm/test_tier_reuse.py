"""Acceptance: blocks outlive the worker that computed them.

- A second worker process, with its own G1/G2/G3, reuses blocks the first stored in G4 (moto on loopback).
- A worker restarted with the same disk directory serves a previously seen prompt from G3.
Both compare greedy tokens with a cold run of the same prompt.
"""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.kvbm.tiered_helpers import prompt
from tests.kvbm.worker_proc import WorkerProcess, generate, stats, wait_offloaded
from tests.servers import free_port

P = prompt(600, seed=21)  # 37 full blocks
FULL = (len(P) - 1) // 16


def tier(s, name):
    return next(t for t in s.tiers if t.tier == name)


def test_second_worker_process_reuses_g4(tmp_path, s3):
    url = s3.store_url(s3.new_bucket())
    common = ("--kv-object-store", url, "--kv-onboard", "always", "--kv-host-bytes", "16MiB",
              "--kv-disk-bytes", "32MiB", "--kv-offload", "write-through")
    first = WorkerProcess(tmp_path, "--kv-disk-dir", str(tmp_path / "a"), *common)
    try:
        cold, hit = asyncio.run(generate(first.address, P))
        assert hit == 0
        asyncio.run(wait_offloaded(first.address, "G4", FULL))
    finally:
        first.stop()
    second = WorkerProcess(tmp_path, "--kv-disk-dir", str(tmp_path / "b"), *common)
    try:
        warm, hit = asyncio.run(generate(second.address, P))
        s = asyncio.run(stats(second.address))
    finally:
        second.stop()
    assert warm == cold
    assert hit == FULL * 16
    assert tier(s, "G4").onboard_blocks == FULL and s.onboarded_blocks == FULL
    assert tier(s, "G2").onboard_blocks == tier(s, "G3").onboard_blocks == 0  # its own tiers were empty


def test_restarted_worker_serves_from_its_disk(tmp_path):
    flags = ("--kv-disk-dir", str(tmp_path / "kv"), "--kv-disk-bytes", "32MiB", "--kv-host-bytes", "0")
    first = WorkerProcess(tmp_path, *flags)
    try:
        cold, _ = asyncio.run(generate(first.address, P))
        asyncio.run(wait_offloaded(first.address, "G3", FULL))
    finally:
        first.stop()
    port = free_port()
    again = WorkerProcess(tmp_path, *flags, "--metrics-port", str(port))
    try:
        before = tier(asyncio.run(stats(again.address)), "G3")
        assert before.blocks >= FULL  # the index survived the restart
        warm, hit = asyncio.run(generate(again.address, P))
        s = asyncio.run(stats(again.address))
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        again.stop()
    assert warm == cold
    assert hit == FULL * 16
    assert tier(s, "G3").onboard_blocks == FULL
    # the onboard as Prometheus shows it
    assert re.search(rf'kvrelay_kv_tier_onboard_blocks_total{{tier="G3",worker="[^"]+"}} {FULL}\.0', metrics)
    assert re.search(rf'kvrelay_worker_onboarded_blocks_total{{worker="[^"]+"}} {FULL}\.0', metrics)
    assert 'kvrelay_kv_tier_capacity_bytes{tier="G3"' in metrics

"""Issue 29, transfer trust: a prefill worker frees a handle's blocks on a `RELEASE` notification only
when it proves the internal token (an HMAC of the request id); a forged one is refused and counted."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from kvrelay.transfer.metadata import Notification
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.kv_handoff import RELEASE, PrefillLeases, release_note
from tests.disagg.cluster import Cluster

TOKEN = "internal-s3cret"


class Inbox:
    """Notifications as a transfer engine delivers them (unit logic: the engines are tested in tests/transfer)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue()

    async def wait_notification(self) -> Notification:
        return await self.queue.get()


async def test_only_token_proven_release_notifications_free_blocks():
    freed: list[str] = []

    async def free(request_id: str) -> None:
        freed.append(request_id)

    leases = PrefillLeases(free, lease_s=30, token=TOKEN)
    for rid in ("req-a", "req-b", "req-c"):
        leases.hold(rid)
    inbox = Inbox()
    task = asyncio.create_task(leases.consume(inbox))
    try:
        forged = [RELEASE + b"req-a", RELEASE + b"req-a|", RELEASE + b"req-a|" + b"0" * 32,
                  release_note("req-a", "a-guessed-token"), release_note("req-b", TOKEN)[:-1] + b"x"]
        for message in forged:
            inbox.queue.put_nowait(Notification("intruder-agent", message))
        inbox.queue.put_nowait(Notification("decode-agent", release_note("req-c", TOKEN)))
        for _ in range(100):
            if freed:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert freed == ["req-c"] and leases.refused == len(forged)
        assert len(leases) == 2  # req-a and req-b still held until pulled, released or expired
    finally:
        task.cancel()
        await leases.close()


@pytest.mark.parametrize("kind", ["tcp", "nixl"])
def test_a_real_pull_releases_its_handle_with_the_token_proof(kind):
    """End to end with a token: the decode worker's release notification (riding on the NIXL READ, or
    sent after the TCP read) frees the prefill worker's handle as `pulled`, nothing is refused, and the
    prefill worker's discovery record carries no transfer metadata."""
    if kind == "nixl" and importlib.util.find_spec("nixl_cu12") is None and importlib.util.find_spec("nixl") is None:
        pytest.skip("NIXL is not installed")
    cfg = WorkerConfig(model="tiny", kv_cache_bytes=64 << 20, kv_transfer=kind, kv_host_bytes=0, kv_disk_dir="off")

    async def run():
        async with Cluster(["prefill", "decode"], cfg, token=TOKEN) as c:
            prompt = [3 + (i * 7919) % 1990 for i in range(600)]
            req = EngineRequest(request_id="handoff-1", prompt_token_ids=prompt,
                                sampling=SamplingParams(max_tokens=4, ignore_eos=True))
            tokens = [t async for out in c.service.generate(c.model, c.card, req) for t in out.token_ids]
            await c.settle()
            prefill = c.by_role("prefill")[0]
            records = [i.transfer_metadata for i in c.service.pool.instances.values()]
            return tokens, dict(prefill.leases.released), prefill.leases.refused, records

    tokens, released, refused, records = asyncio.run(run())
    assert len(tokens) == 4
    assert released["pulled"] == 1 and released["expired"] == 0 and refused == 0, released
    assert records == [b"", b""]

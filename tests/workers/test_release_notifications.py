"""Issue 29, transfer trust: a prefill worker frees a handle's blocks on a `RELEASE` notification only
when it proves the internal token (an HMAC of the request id); a forged one is refused and counted."""

from __future__ import annotations

import asyncio

from kvrelay.transfer.metadata import Notification
from kvrelay.workers.kv_handoff import RELEASE, PrefillLeases, release_note

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

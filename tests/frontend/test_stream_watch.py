"""StreamWatch's decisions (issue 29): which quiet worker streams count as failed. Unit logic on real
`RpcStream` objects that were never connected (the e2e behaviour is tests/e2e/test_stuck_workers.py)."""

from __future__ import annotations

import pytest

from kvrelay.frontend.stream_watch import HUNG_FACTOR, StreamWatch
from kvrelay.runtime.rpc import RpcClient, RpcConnectionError, RpcStream

STALL = 10.0


def _stream() -> RpcStream:
    return RpcStream(RpcClient(), "127.0.0.1:1", "generate", None, None)


async def _failed(stream: RpcStream) -> bool:
    try:
        await stream.__anext__()
    except RpcConnectionError:
        return True
    return False


@pytest.mark.parametrize(("alive", "elsewhere", "quiet", "fails"), [
    (False, True, STALL + 1, True),  # frozen, and another worker can take the request
    (False, True, STALL - 1, False),  # not quiet for long enough
    (True, True, STALL + 1, False),  # quiet but reporting load: queued or slow, not frozen
    (False, False, STALL + 1, False),  # the last worker standing: wait it out
    (True, False, HUNG_FACTOR * STALL + 1, True),  # hung whatever it reports: an error, not a hang
])
async def test_quiet_stream_decisions(alive, elsewhere, quiet, fails):
    watch = StreamWatch(STALL, lambda _w: alive, lambda _w: elsewhere)
    stream = _stream()
    async with watch.watching("w1", stream):
        start = watch._streams["w1"][stream].last_progress
        watch.check(start + quiet)
        assert stream._ended == fails
    if fails:
        assert await _failed(stream)


async def test_progress_and_own_stalls_are_not_held_against_a_worker():
    watch = StreamWatch(STALL, lambda _w: False, lambda _w: True)
    stream = _stream()
    async with watch.watching("w1", stream):
        t0 = watch._streams["w1"][stream].last_progress
        stream.received += 1  # a frame arrived
        watch.check(t0 + STALL - 1)
        watch.check(t0 + 2 * STALL - 2)  # quiet STALL - 1 since that frame
        assert not stream._ended
        watch.check(t0 + 3 * STALL, late=STALL + 5)  # this process was blocked meanwhile
        assert not stream._ended
        watch.check(t0 + 4 * STALL)
        assert stream._ended


async def test_a_worker_leaving_discovery_fails_its_streams_at_once():
    watch = StreamWatch(STALL, lambda _w: True, lambda _w: True)
    mine, other = _stream(), _stream()
    async with watch.watching("w1", mine), watch.watching("w2", other):
        watch.worker_left("w1")
        assert await _failed(mine) and not other._ended
    assert watch._streams == {}

"""A peer's lease of a prefix this worker is computing right now waits for the prefill and lends the whole
run (workers/core/lease_waits.py), instead of the few blocks computed so far; nothing computing it, or the
asker giving up, answers at once and pins nothing. Real mocker engine (the same engine core as native)."""

from __future__ import annotations

import asyncio
import time

from kvrelay.workers.core.sequence import Status
from tests.workers.test_mocker import mocker, model, prompt, run  # noqa: F401  (model: a fixture)

PROMPT = prompt(1024, seed=31)


async def _running(engine, rid: str) -> list[int]:
    """Wait until request `rid` is RUNNING (its prefill stepping); its prompt's block hashes."""
    for _ in range(500):
        seq = engine.core.seqs.get(rid)
        if seq is not None and seq.status is Status.RUNNING:
            return list(seq.hasher.hashes)
        await asyncio.sleep(0.002)
    raise AssertionError(f"{rid} never ran")


def test_a_lease_waits_for_the_prefill_in_progress_and_lends_the_whole_run(model):  # noqa: F811
    async def go():
        # 1,024 tokens at 20 us each, slowed 20x: a prefill step of ~0.4 s of wall time
        e = mocker(model, speedup=0.05)
        await e.start()
        try:
            producing = asyncio.create_task(run(e, PROMPT, max_tokens=2, rid="first"))
            hashes = await _running(e, "first")
            assert len(hashes) == 1024 // e.core.block_size and len(e.core.kv.lookup(hashes)) == 0
            t0 = time.monotonic()
            lent = await e.lease_blocks("peer:second", hashes)
            waited = time.monotonic() - t0
            assert len(lent) == len(hashes), "the lease lent only what was computed when it was asked"
            assert 0.05 < waited < 1.5, waited
            assert e.core.leases.pinned == len(hashes)
            await producing
            await e.abort("peer:second")  # the pull's end frees the lease
            assert e.core.leases.pinned == 0
            # nothing computing an unknown prefix: answered at once, nothing pinned
            t0 = time.monotonic()
            assert await e.lease_blocks("peer:third", [h + 1 for h in hashes]) == []
            assert time.monotonic() - t0 < 0.2 and e.core.leases.pinned == 0
        finally:
            await e.close()
    asyncio.run(go())


def test_an_asker_that_gives_up_while_the_lease_waits_pins_nothing(model):  # noqa: F811
    async def go():
        e = mocker(model, speedup=0.05)
        await e.start()
        try:
            producing = asyncio.create_task(run(e, PROMPT, max_tokens=2, rid="first"))
            hashes = await _running(e, "first")
            asking = asyncio.create_task(e.lease_blocks("peer:second", hashes))
            await asyncio.sleep(0.05)
            assert not asking.done()  # waiting for the prefill
            await e.abort("peer:second")
            assert await asyncio.wait_for(asking, 1.0) == []
            await producing
            assert e.core.leases.pinned == 0
        finally:
            await e.close()
    asyncio.run(go())


def test_a_lease_never_waits_longer_than_the_bound(model):  # noqa: F811
    async def go():
        # a 6-second prefill step: the lease stops waiting at LEND_WAIT_S and lends what G1 holds (none)
        e = mocker(model, speedup=0.0033)
        await e.start()
        try:
            producing = asyncio.create_task(run(e, PROMPT, max_tokens=1, rid="first"))
            hashes = await _running(e, "first")
            t0 = time.monotonic()
            lent = await e.lease_blocks("peer:second", hashes)
            assert lent == [] and time.monotonic() - t0 < 8
            await e.abort("first")
            producing.cancel()
        finally:
            await e.close()
    asyncio.run(go())

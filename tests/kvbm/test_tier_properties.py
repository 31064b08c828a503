"""Property test (issue #5 acceptance): random put/get/remove/evict sequences, with corruption, restarts
and I/O failures mixed in, against every tier (G4 on a real moto server) and both policies.

After every step: the byte bound holds (on disk and in the bucket too), the accounting is exact, the
event stream replays to exactly the blocks held, and no get ever returns bytes other than those put
under that hash. After an I/O failure the tier is disabled with exactly one warning and every call
still answers (misses, dropped puts) without raising.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvrelay.kvbm.tiers import s3_store
from kvrelay.kvbm.tiers.base import log as tier_log
from tests.kvbm.helpers import KINDS, Events, content, make_store, same
from tests.kvbm.test_tiers import check

BLOCKS = 4  # small tier, 10 hashes: evictions, dedups and reuse all the time
hash_batches = st.lists(st.integers(0, 9), min_size=1, max_size=6)
EXAMPLES = {"G2": 100, "G3": 50, "G3-buffered": 40, "G4": 10}


class WarningCounter(logging.Handler):
    """The tier's health warnings (disabled / re-enabled); checksum failures log too, rate-limited."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "failed their checksum" not in record.getMessage():
            self.messages.append(record.getMessage())


@pytest.mark.parametrize("policy", ["lru", "tinylfu"])
@pytest.mark.parametrize("kind", KINDS)
def test_random_sequences_keep_the_contract(kind, policy, tmp_path_factory, request):
    s3 = request.getfixturevalue("s3") if kind == "G4" else None

    class TierMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.tmp = tmp_path_factory.mktemp("tier")
            self.bucket = s3.new_bucket() if s3 else None
            self.corrupt: set[int] = set()  # damaged behind the store's back, not rewritten since
            self.ever_put: set[int] = set()
            self.broken, self.steps = False, 0
            self.warnings = WarningCounter()
            tier_log.addHandler(self.warnings)
            self.store = self.open()

        def open(self):
            self.events = Events()

            def on_event(kind_: str, hashes: list[int]) -> None:
                self.events(kind_, hashes)
                if kind_ == "stored":
                    self.corrupt.difference_update(hashes)

            store = make_store(kind, BLOCKS, tmp=self.tmp, s3=s3, bucket=self.bucket, policy=policy,
                               on_event=on_event)
            self.events.held = set(store.hashes())  # a reopened G3 starts with what it found
            return store

        def run(self, coro):
            return self.loop.run_until_complete(coro)

        @rule(hs=hash_batches)
        def put(self, hs: list[int]) -> None:
            self.steps += 1
            ok = self.run(self.store.put(hs, [content(h) for h in hs]))
            self.ever_put.update(h for h, good in zip(hs, ok, strict=True) if good)
            if self.broken:
                assert not any(ok)

        @rule(hs=hash_batches)
        def get(self, hs: list[int]) -> None:
            self.steps += 1
            dsts = [content(10_000 + i) for i in range(len(hs))]  # stale garbage in the destinations
            ok = self.run(self.store.get(hs, dsts))
            if any(ok):
                event("get hit")
            if any(h in self.corrupt for h in hs):
                event("get of a damaged block")
            for h, good, d in zip(hs, ok, dsts, strict=True):
                if good:
                    assert h in self.ever_put and h not in self.corrupt and same(d, h), f"wrong block {h}"
            if self.broken:
                assert not any(ok)

        @rule(hs=hash_batches)
        def remove(self, hs: list[int]) -> None:
            self.steps += 1
            self.run(self.store.remove(hs))
            assert not set(hs) & set(self.store.hashes())

        @rule(hs=hash_batches)
        def contains(self, hs: list[int]) -> None:
            for h, there in zip(hs, self.run(self.store.contains(hs)), strict=True):
                assert not there or h in self.ever_put

        @precondition(lambda self: kind != "G2" and not self.broken)
        @rule(data=st.data())
        def damage(self, data: st.DataObject) -> None:
            held = sorted(self.store.hashes())
            if not held:
                return
            h = data.draw(st.sampled_from(held))
            if kind == "G4":
                key = self.store.key(h)
                s3.client().put_object(Bucket=self.bucket, Key=key, Body=b"KVR4 truncated")
            else:
                slot = self.store._slots.map[h]
                off = data.draw(st.integers(0, self.store.block_bytes - 1))
                with open(self.tmp / "g3" / "blocks.dat", "r+b") as f:  # differs from the true byte, always
                    f.seek(slot * self.store.slot_bytes + off)
                    f.write(bytes([int(content(h)[off]) ^ 0xFF]))
            self.corrupt.add(h)
            event("damaged a held block")

        @precondition(lambda self: kind.startswith("G3") and not self.broken)
        @rule()
        def restart(self) -> None:
            before = set(self.store.hashes())
            self.run(self.store.close())
            self.store = self.open()
            assert set(self.store.hashes()) == before

        @precondition(lambda self: kind != "G2" and not self.broken and self.steps >= 12)
        @rule()
        def io_failure(self) -> None:
            if kind == "G4":  # the endpoint becomes unreachable
                dead = f"http://127.0.0.1:{_closed_port()}"
                self.store.store = s3_store(self.bucket, endpoint=dead, access_key_id="x", secret_access_key="x")
                self.store._health.retry_after_s = None
            else:  # the data file stops accepting writes (read-only descriptor in its place)
                ro = os.open(self.tmp / "g3" / "blocks.dat", os.O_RDONLY)
                os.dup2(ro, self.store._fd)
                os.close(ro)
            if self.store.stats.blocks == BLOCKS:  # make room, so the put below really writes
                self.run(self.store.remove(self.store.hashes()[:1]))
            before = set(self.store.hashes())
            assert not any(self.run(self.store.put([100, 101], [content(100), content(101)])))
            # Disabled; nothing new stored (a victim evicted to make room for the failed write is gone).
            assert not self.store.enabled and set(self.store.hashes()) <= before
            self.broken = True
            event("tier disabled by an I/O failure")

        @invariant()
        def accounting(self) -> None:
            check(self.store, self.events)
            cap = self.store.stats.capacity_bytes
            if kind.startswith("G3"):
                assert sum(f.stat().st_size for f in Path(self.tmp, "g3").iterdir()) <= cap
            if kind == "G4" and not self.broken:
                objs = s3.client().list_objects_v2(Bucket=self.bucket).get("Contents", [])
                assert sum(o["Size"] for o in objs) <= cap
            assert len(self.warnings.messages) == int(self.broken), self.warnings.messages

        def teardown(self) -> None:
            tier_log.removeHandler(self.warnings)
            self.run(self.store.close())
            self.loop.close()

    run_state_machine_as_test(TierMachine, settings=settings(
        max_examples=EXAMPLES[kind], stateful_step_count=30, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def _closed_port() -> int:
    from tests.servers import free_port

    return free_port()

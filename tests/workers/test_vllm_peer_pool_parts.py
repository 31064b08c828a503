"""The cluster KV pool's vLLM-free parts (workers/engines/vllm/peer_*.py and the tier connector's halves),
without vLLM: two tier runtimes in one process stand for two vLLM workers' worker processes, with real
G2 stores, real transfer engines (NIXL and TCP) over their staging rows, and tensors shaped like vLLM's
CPU cache.

- A lends the leading run of a prompt's blocks its G2 holds (over the lend socket), another salt's
  hashes get nothing; B's scheduler half plans the blocks its own G2 lacks from the peer, the worker
  half reads them from A's rows and scatters them into vLLM's blocks byte for byte; the read's release
  notification gives A's rows back.
- A read past its deadline (the lease may have been given back) is a miss that vLLM recomputes, and
  `free` gives a lease's rows back; a lease is read at most once (a preempted request asks its own
  tiers again, not the peer); another model's lease is never planned.

The real thing, in real vLLM behind `kvrelay serve`, is tests/vllm/test_vllm_peer_pull.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.workers.api.messages import KvHandle
from kvrelay.workers.core.kv_sources.tiers import TierSave
from kvrelay.workers.engines.vllm.peer_lend import LendClient
from kvrelay.workers.engines.vllm.peer_pool import PEER_TIER, POOL, TOKEN_ENV, PoolSettings
from kvrelay.workers.engines.vllm.tier_lookup import LookupClient
from kvrelay.workers.engines.vllm.tier_runtime import TierRuntime, TierSettings
from kvrelay.workers.engines.vllm.tier_scheduler import TierScheduler
from kvrelay.workers.engines.vllm.tier_worker import TierWorker
from tests.disagg.test_disagg_identity import _transfer_kinds
from tests.workers.test_vllm_tier_connector_parts import ScriptedLookups

BS, FP = 32, "vllm-test"
NUM_BLOCKS = 16
PROMPT = list(range(1000, 1000 + 5 * BS + 7))  # 5 full blocks, all loadable


def caches() -> list[torch.Tensor]:
    return [torch.randn(NUM_BLOCKS, 2, BS, 16) for _ in range(3)]  # vLLM's CPU layout, 3 layers


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


class Side:
    """One vLLM worker's worker process: its tiers, staging rows, pool and vLLM-shaped caches."""

    def __init__(self, path, kind: str):
        path.mkdir()
        self.key = str(path)
        self.rt = TierRuntime(TierSettings(key=self.key, fingerprint=FP, block_size=BS,
                                           tiers=TierConfig(host_bytes=4 << 20, disk_dir="off"), staging_bytes=1 << 20,
                                           pool=PoolSettings(transfer=kind, host="127.0.0.1", advertise_host="",
                                                             lease_s=30.0)))
        self.kv = caches()
        self.worker = TierWorker(self.rt, NUM_BLOCKS)
        self.worker.register({f"model.layers.{i}.self_attn": t for i, t in enumerate(self.kv)})
        assert self.worker.enabled and self.rt.pool is not None

    def save(self, hashes: list[int], block_ids: list[int]) -> None:
        self.worker.save([TierSave(hashes, block_ids)])
        wait_for(lambda: set(hashes) <= self.rt.known and self.rt.rows_in_use == 0)

    def load(self, loads, reads) -> set[int]:
        """Run the loads to the end; the vLLM block ids reported as load errors."""
        self.worker.start_loads(loads, reads)
        wait_for(lambda: all(f is None or f.done() for _, _, f in self.worker._loads.values()))
        assert self.worker.finished_loads() == {job.request_id for job in loads}
        return self.worker.take_errors()


@pytest.fixture
def sides(tmp_path, monkeypatch, request):
    monkeypatch.setenv(TOKEN_ENV, "the-internal-token")
    made = []

    def make(name: str, kind: str) -> Side:
        made.append(Side(tmp_path / name, kind))
        return made[-1]

    yield make
    for side in made:
        side.rt.close()


async def lend(key: str, lease_id: str, hashes: list[int]):
    client = LendClient(key)
    try:
        return await client.lend(lease_id, hashes)
    finally:
        await client.close()


async def free(key: str, lease_id: str) -> None:
    client = LendClient(key)
    try:
        await client.free(lease_id)
    finally:
        await client.close()


def plan(b: Side, handle: KvHandle, deadline: float, salt: str = "s"):
    """B's scheduler half: ask until the lookup answers, allocate vLLM blocks 5.., one step's work."""
    sched = TierScheduler(BS, FP, LookupClient(b.key))
    try:
        until = time.monotonic() + 10
        while (m := sched.matched("r1", PROMPT, salt, "", 0, (handle, deadline))) == (None, False):
            assert time.monotonic() < until
        sched.allocated("r1", list(range(5, 11)), m[0])
        loads, _ = sched.step([])
        return m, loads, sched.take_reads()
    finally:
        sched.lookups.close()


@pytest.mark.parametrize("kind", _transfer_kinds())
def test_a_peer_lends_its_g2_blocks_and_the_puller_loads_them_like_a_tier(sides, kind):
    a, b = sides("a", kind), sides("b", kind)
    ours = block_hashes(PROMPT, BS, root_hash(FP, "s"))
    a.save(ours[:4], [2, 3, 9, 10])  # A computed blocks 0-3 (write-through to its G2)
    b.save(ours[:1], [0])  # B's own G2 has block 0
    rows, pool, metadata = asyncio.run(lend(a.key, "peer:r1", ours))
    assert len(rows) == 4 and pool == POOL and a.rt.pool.counters()["lease_pinned"] == 4  # its leading run
    other_salt = block_hashes(PROMPT, BS, root_hash(FP, "t2"))
    assert asyncio.run(lend(a.key, "peer:r2", other_salt))[0] == []  # another salt's hashes: nothing

    handle = KvHandle(request_id="peer:r1", prefill_instance="worker-a", prefill_address="127.0.0.1:1",
                      transfer_metadata=metadata, pool=pool, fingerprint=FP, block_ids=rows, num_tokens=4 * BS,
                      first_token=-1, lease_s=30.0)
    matched, loads, reads = plan(b, handle, time.time() + 15)
    assert matched == (4 * BS, True)
    (job,) = loads
    assert job.tiers == ["G2", PEER_TIER, PEER_TIER, PEER_TIER] and job.block_ids == [5, 6, 7, 8]
    assert reads["r1"].remote_ids == rows[1:4]  # prompt block k is the lease's k-th row

    assert b.load(loads, reads) == set()
    for ka, kb in zip(a.kv, b.kv, strict=True):
        assert torch.equal(kb[[6, 7, 8]], ka[[3, 9, 10]])  # pulled from A, byte for byte
        assert torch.equal(kb[5], kb[0])  # from B's own G2
    wait_for(lambda: not a.rt.pool.leases)  # the read's release notification gave A's rows back
    assert a.rt.rows_in_use == 0 and b.rt.rows_in_use == 0
    assert a.rt.pool.counters() == {"pulled_blocks": 0, "pulled_requests": 0, "failures": 0, "lent_blocks": 4,
                                    "lease_pinned": 0}
    assert b.rt.pool.counters()["pulled_blocks"] == 3 and b.rt.pool.counters()["failures"] == 0


def test_a_read_past_its_deadline_is_recomputed_and_free_gives_the_rows_back(sides):
    a, b = sides("a", "tcp"), sides("b", "tcp")
    ours = block_hashes(PROMPT, BS, root_hash(FP, "s"))
    a.save(ours[:3], [1, 2, 3])
    rows, pool, metadata = asyncio.run(lend(a.key, "peer:r1", ours))
    handle = KvHandle(request_id="peer:r1", prefill_instance="worker-a", prefill_address="127.0.0.1:1",
                      transfer_metadata=metadata, pool=pool, fingerprint=FP, block_ids=rows, num_tokens=3 * BS,
                      first_token=-1, lease_s=30.0)
    before = [t.clone() for t in b.kv]
    _, loads, reads = plan(b, handle, time.time() - 1)  # the lease may be gone on A by now
    assert b.load(loads, reads) == {5, 6, 7}  # vLLM recomputes them
    assert all(torch.equal(x, y) for x, y in zip(before, b.kv, strict=True))  # nothing written
    assert b.rt.pool.counters()["failures"] == 1 and b.rt.rows_in_use == 0
    assert a.rt.pool.leases  # nobody read: the lease is A's until freed
    asyncio.run(free(a.key, "peer:r1"))
    assert not a.rt.pool.leases and a.rt.rows_in_use == 0
    asyncio.run(free(a.key, "peer:r1"))  # idempotent


def test_a_lease_is_read_once_and_a_preempted_request_asks_again_without_its_peer():
    """The lender gives its rows back after one read: a request preempted after its pull (vLLM lost the
    blocks) must recompute or load from its own tiers, never read the lender's rows again."""
    lookups = ScriptedLookups()
    sched = TierScheduler(BS, FP, lookups)
    handle = KvHandle(request_id="peer:r", prefill_instance="worker-a", prefill_address="127.0.0.1:1",
                      transfer_metadata=b"", pool=POOL, fingerprint=FP, block_ids=[70, 71, 72, 73],
                      num_tokens=4 * BS, first_token=-1, lease_s=30.0)
    peer = (handle, time.time() + 15)
    assert sched.matched("r", PROMPT, "s", "", 0, peer) == (None, False)
    assert lookups.peer_blocks["r"] == 4  # the lookup knows the peer's leased run
    lookups.answers[lookups.asked[-1][0]] = ["G2", PEER_TIER, PEER_TIER]
    assert sched.matched("r", PROMPT, "s", "", 0, peer) == (3 * BS, True)
    sched.allocated("r", list(range(5, 11)), 3 * BS)
    sched.step([])
    assert sched.take_reads()["r"].remote_ids == [71, 72]  # prompt blocks 1 and 2: the lease's rows 1, 2
    sched.step([("r", 3 * BS, BS, PROMPT, lambda: list(range(5, 11)))])  # it ran: block 3 computed
    assert sched.matched("r", PROMPT, "s", "", 0, peer) == (None, False)  # preempted: vLLM lost them all
    assert lookups.peer_blocks["r"] == 0  # asked again, of its own tiers only


def test_another_models_lease_is_never_planned():
    lookups = ScriptedLookups()
    sched = TierScheduler(BS, FP, lookups)
    handle = KvHandle(request_id="peer:r", prefill_instance="w", prefill_address="127.0.0.1:1",
                      transfer_metadata=b"", pool=POOL, fingerprint="vllm-other-model", block_ids=[1, 2],
                      num_tokens=2 * BS, first_token=-1, lease_s=30.0)
    sched.matched("r", PROMPT, "", "", 0, (handle, time.time() + 15))
    assert lookups.peer_blocks["r"] == 0

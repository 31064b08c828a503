"""Both transfer engines (NIXL over UCX, TCP fallback) across two real processes, plus the factory.

The peer is `peer_child.py`: it registers a pool of known random bytes and prints its metadata.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvrelay.transfer import (
    NixlTransferEngine,
    TcpTransferEngine,
    TransferError,
    load_nixl_api,
    make_transfer_engine,
)
from kvrelay.transfer.blocks import block_runs, check_ids, describe_pool
from kvrelay.transfer.metadata import PoolDesc, TransferMetadata, encode_metadata
from kvrelay.transfer.nixl_api import NIXL_MODULES
from tests.transfer.peer_child import BLOCK_BYTES, REMOTE_BLOCKS, digest, kv_pool

LOCAL_BLOCKS = 64

try:
    load_nixl_api()
    HAVE_NIXL = True
except ImportError:
    HAVE_NIXL = False


@pytest.fixture(params=["nixl", "tcp"])
def kind(request) -> str:
    if request.param == "nixl" and not HAVE_NIXL:
        pytest.skip("nixl not installed")
    return request.param


def make(kind: str, name: str) -> NixlTransferEngine | TcpTransferEngine:
    return NixlTransferEngine(name) if kind == "nixl" else TcpTransferEngine(name)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class PeerProcess:
    """peer_child.py in its own process; its stdout lines are read by a thread into a queue."""

    def __init__(self, kind: str, name: str = "child"):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("peer_child.py")), kind, name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.metadata = base64.b64decode(self.expect("META", timeout=60)[0])

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line)

    def expect(self, tag: str, timeout: float = 10.0) -> list[str]:
        """Words after `tag` on the next line starting with it (other lines, e.g. UCX's logs, skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                words = self.lines.get(timeout=max(0.0, deadline - time.monotonic())).split()
            except queue.Empty:
                raise AssertionError(f"no {tag} line from the peer within {timeout}s") from None
            if words[:1] == [tag]:
                return words[1:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def peer(kind: str):
    p = PeerProcess(kind)
    yield p
    p.close()


async def local_engine(kind: str, peer: PeerProcess) -> tuple[NixlTransferEngine | TcpTransferEngine, torch.Tensor]:
    eng = make(kind, "parent")
    local = torch.zeros((LOCAL_BLOCKS, *kv_pool(1, 0).shape[1:]), dtype=torch.float16)
    eng.register_pool("kv", local, BLOCK_BYTES)
    await eng.start()
    eng.add_peer("child", peer.metadata)
    return eng, local


# -- two processes ----------------------------------------------------------------------------------------
async def test_read_and_write_between_processes(kind: str, peer: PeerProcess) -> None:
    eng, local = await local_engine(kind, peer)
    remote = kv_pool(REMOTE_BLOCKS, seed=1)  # what the child registered
    try:
        rids, lids = [3, 4, 5, 10, 20, 21, 47, 0], [7, 8, 9, 30, 40, 41, 1, 63]  # 5 runs
        await eng.read("child", "kv", rids, "kv", lids, notify=b"read-1")
        assert torch.equal(as_bytes(local[lids]), as_bytes(remote[rids]))
        others = [i for i in range(LOCAL_BLOCKS) if i not in lids]
        assert not as_bytes(local[others]).any()
        assert peer.expect("NOTIF")[:2] == ["parent", "read-1"]

        await eng.read("child", "kv", list(range(REMOTE_BLOCKS)), "kv", list(range(10, 10 + REMOTE_BLOCKS)))
        assert torch.equal(as_bytes(local[10:10 + REMOTE_BLOCKS]), as_bytes(remote))

        src, dst = [60, 61, 2, 50, 51, 52], [1, 2, 30, 31, 32, 33]  # 3 runs
        local[src] = kv_pool(len(src), seed=2)
        await eng.write("child", "kv", src, "kv", dst, notify=b"write-1")
        expected = remote.clone()
        expected[dst] = local[src]
        assert peer.expect("NOTIF") == ["parent", "write-1", digest(expected)]

        s = eng.stats()
        assert (s.reads, s.writes, s.failures, s.active_handles) == (2, 1, 0, 0)
        assert (s.bytes_read, s.bytes_written) == ((8 + REMOTE_BLOCKS) * BLOCK_BYTES, 6 * BLOCK_BYTES)
        assert s.descriptors == 5 + 1 + 3 and s.registered_regions == 1 and s.notifications_sent == 2
    finally:
        await eng.close()


async def test_no_leak_after_1000_sequential_reads(kind: str, peer: PeerProcess) -> None:
    eng, local = await local_engine(kind, peer)
    remote = kv_pool(REMOTE_BLOCKS, seed=1)
    try:
        await eng.read("child", "kv", [0], "kv", [0])  # connection set up before counting
        before, fds = eng.stats(), len(os.listdir("/proc/self/fd"))
        for i in range(1000):
            eng.add_peer("child", peer.metadata)  # as each disaggregated request does: a no-op when known
            r, lo = i % REMOTE_BLOCKS, i % LOCAL_BLOCKS
            await eng.read("child", "kv", [r], "kv", [lo])
        after = eng.stats()
        assert torch.equal(as_bytes(local[lo]), as_bytes(remote[r]))
        assert after.reads - before.reads == 1000 and after.failures == 0
        assert after.active_handles == 0
        for field in ("registered_regions", "prepped_dlists", "peers"):
            assert getattr(after, field) == getattr(before, field), field
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        await eng.close()
    s = eng.stats()
    assert (s.registered_regions, s.prepped_dlists, s.peers, s.active_handles) == (0, 0, 0, 0)


async def test_peer_death_mid_transfer_raises_promptly(kind: str, peer: PeerProcess) -> None:
    eng, _ = await local_engine(kind, peer)
    ids = list(range(REMOTE_BLOCKS))
    done = 0

    async def pull_forever() -> None:
        nonlocal done
        while True:
            await eng.read("child", "kv", ids, "kv", ids, timeout=20)
            done += 1

    try:
        task = asyncio.ensure_future(pull_forever())
        while done < 3 and not task.done():
            await asyncio.sleep(0.001)
        killed = time.monotonic()
        peer.kill()
        with pytest.raises(TransferError):
            await asyncio.wait_for(task, 15)
        assert time.monotonic() - killed < 10
        t0 = time.monotonic()
        with pytest.raises(TransferError):  # and a new transfer to the dead peer fails as fast
            await eng.read("child", "kv", [0], "kv", [0], timeout=20)
        assert time.monotonic() - t0 < 10
        s = eng.stats()
        assert s.active_handles == 0 and s.failures >= 2 and s.registered_regions == 1
    finally:
        await eng.close()


# -- one process: two engines side by side ------------------------------------------------------------------
@pytest.fixture
async def pair(kind: str):
    a, b = make(kind, f"a-{kind}"), make(kind, f"b-{kind}")
    pa = torch.zeros((16, BLOCK_BYTES), dtype=torch.uint8)
    pb = torch.randint(0, 256, (REMOTE_BLOCKS, BLOCK_BYTES), dtype=torch.uint8)
    a.register_pool("kv", pa, BLOCK_BYTES)
    b.register_pool("kv", pb, BLOCK_BYTES)
    await a.start()
    await b.start()
    a.add_peer("b", b.metadata())
    b.add_peer("a", a.metadata())
    yield a, b, pa, pb
    await a.close()
    await b.close()


BAD_READS = [
    (("b", "kv", [1, 48], "kv", [0, 1]), "remote block ids out of range"),
    (("b", "kv", [1, 2], "kv", [0, -1]), "local block ids out of range"),
    (("b", "kv", [1, 2], "kv", [16, 3]), "local block ids out of range"),
    (("b", "kv", [1, 2, 3], "kv", [0, 1]), "3 remote block ids"),
    (("b", "kv", [1, 2], "kv", [5, 5]), "distinct"),
    (("b", "kv", [1.0, 2.0], "kv", [0, 1]), "integers"),
    (("b", "kv", [[1], [2]], "kv", [0, 1]), "flat list"),
    (("b", "nope", [1], "kv", [0]), "no pool 'nope'"),
    (("b", "kv", [1], "nope", [0]), "no local pool 'nope'"),
]


async def test_bad_block_ids_raise_before_any_transfer(pair) -> None:
    a, _, pa, _ = pair
    for args, match in BAD_READS:
        with pytest.raises(ValueError, match=match):
            await a.read(*args)
    with pytest.raises(ValueError, match="distinct"):  # write: the remote ids are the destinations
        await a.write("b", "kv", [0, 1], "kv", [7, 7])
    s = a.stats()
    assert (s.reads, s.writes, s.bytes_read, s.active_handles, s.failures) == (0, 0, 0, 0, 0)
    assert not pa.any()
    with pytest.raises(TransferError, match="unknown"):
        await a.read("nobody", "kv", [1], "kv", [0])


async def test_cancelled_read_leaves_no_handle(pair) -> None:
    a, _, pa, pb = pair
    ids = list(range(16))
    task = asyncio.ensure_future(a.read("b", "kv", ids, "kv", ids))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert a.stats().active_handles == 0
    await a.read("b", "kv", ids, "kv", ids)  # the engine is still usable
    assert torch.equal(pa, pb[:16])


async def test_notifications(pair) -> None:
    a, b, _, _ = pair
    with pytest.raises(asyncio.TimeoutError):
        await b.wait_notification(b"never", timeout=0.05)
    await a.notify("b", b"first")
    await a.read("b", "kv", [0], "kv", [0], notify=b"second")
    assert (await b.wait_notification(b"second", timeout=5)).message == b"second"  # out of order is fine
    n = await b.wait_notification(timeout=5)
    assert (n.sender, n.message) == (a.name, b"first")
    assert b.stats().notifications_pending == 0
    await a.read("b", "kv", [], "kv", [], notify=b"empty")  # nothing to move, still notified
    assert (await b.wait_notification(b"empty", timeout=5)).sender == a.name


async def test_add_peer_rejects_other_kind_and_is_idempotent(pair, kind: str) -> None:
    a, b, _, _ = pair
    other = TransferMetadata(kind="tcp" if kind == "nixl" else "nixl", engine="x", pools=[])
    with pytest.raises(ValueError, match="transfer engine"):
        a.add_peer("x", encode_metadata(other))
    with pytest.raises(ValueError, match="invalid transfer metadata"):
        a.add_peer("x", b"\x00garbage")
    a.add_peer("b", b.metadata())
    a.add_peer("b2", b.metadata())  # same engine under a new id (a restart): replaces the old entry
    assert a.stats().peers == 1
    await a.read("b2", "kv", [3], "kv", [3])


async def test_tcp_read_times_out_on_a_silent_peer() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    eng = TcpTransferEngine("t")
    eng.register_pool("kv", torch.zeros((4, 64), dtype=torch.uint8), 64)
    pool = PoolDesc(name="kv", base_addr=0, num_blocks=4, block_bytes=64, mem_type="DRAM", device_id=0)
    eng.add_peer("s", encode_metadata(TransferMetadata(kind="tcp", engine="s", address=f"127.0.0.1:{port}",
                                                       pools=[pool])))
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="timed out"):
        await eng.read("s", "kv", [0], "kv", [0], timeout=0.3)
    assert time.monotonic() - t0 < 3 and eng.stats().active_handles == 0
    await eng.close()
    server.close()


# -- factory ----------------------------------------------------------------------------------------------
async def test_factory_auto_falls_back_to_tcp_when_nixl_is_missing(monkeypatch, caplog) -> None:
    for mod in (*NIXL_MODULES, "nixl", "nixl_cu12", "nixl_cu13"):
        monkeypatch.setitem(sys.modules, mod, None)  # import of each now raises ImportError
    with caplog.at_level(logging.WARNING, logger="kvrelay.transfer.factory"):
        eng = make_transfer_engine("auto", "fallback")
    assert isinstance(eng, TcpTransferEngine)
    assert "TCP fallback" in caplog.text and "not installed" in caplog.text
    await eng.close()


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl not installed")
async def test_factory_nixl_that_fails_falls_back_and_tcp_and_auto_pick_as_asked(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kvrelay.transfer.factory"):
        eng = make_transfer_engine("nixl", "bad", backends=("NO_SUCH_BACKEND",))
    assert isinstance(eng, TcpTransferEngine) and "failed to start" in caplog.text
    await eng.close()
    tcp = make_transfer_engine("tcp", "t")
    assert isinstance(tcp, TcpTransferEngine)
    await tcp.close()
    auto = make_transfer_engine("auto", "n")
    assert isinstance(auto, NixlTransferEngine)
    await auto.close()
    with pytest.raises(ValueError):
        make_transfer_engine("rdma", "x")


# -- the pieces -------------------------------------------------------------------------------------------
def test_block_runs_and_checks() -> None:
    a, b = np.array([4, 5, 6, 9, 10, 0]), np.array([1, 2, 3, 7, 9, 8])
    assert block_runs(a, b) == [(4, 1, 3), (9, 7, 1), (10, 9, 1), (0, 8, 1)]
    assert block_runs(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == []
    pool = describe_pool("p", torch.zeros((8, 4, 16)), 256)
    assert (pool.num_blocks, pool.block_bytes, pool.mem_type) == (8, 256, "DRAM")
    assert check_ids([7, 0], pool, "x", distinct=True).tolist() == [7, 0]
    with pytest.raises(ValueError, match="bool"):
        check_ids([True], pool, "x", distinct=False)
    with pytest.raises(ValueError, match="contiguous"):
        describe_pool("p", torch.zeros((8, 4, 16)).transpose(1, 2), 256)
    with pytest.raises(ValueError, match="multiple"):
        describe_pool("p", torch.zeros(100, dtype=torch.uint8), 64)


@pytest.mark.skipif(not HAVE_NIXL, reason="nixl not installed")
def test_nixl_merges_consecutive_prepped_descriptors() -> None:
    """NixlTransferEngine relies on this instead of building per-transfer descriptor lists (README)."""
    api = load_nixl_api()
    agent = api.nixl_agent("merge-check", api.nixl_agent_config(
        enable_prog_thread=False, backends=["UCX"], capture_telemetry=True))
    src = torch.randint(0, 256, (32, 4096), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    regs = [agent.register_memory(t) for t in (src, dst)]
    rows = [PoolDesc(name=n, base_addr=t.data_ptr(), num_blocks=32, block_bytes=4096, mem_type="DRAM",
                     device_id=0) for n, t in (("src", src), ("dst", dst))]
    from kvrelay.transfer.nixl_api import block_descs
    local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", block_descs(rows[1]), "DRAM")
    remote = agent.prep_xfer_dlist("merge-check", block_descs(rows[0]), "DRAM")  # loopback
    lids, rids = [0, 1, 2, 3, 10, 11, 20], [4, 5, 6, 7, 12, 13, 0]
    handle = agent.make_prepped_xfer("READ", local, lids, remote, rids)
    try:
        state, deadline = agent.transfer(handle), time.monotonic() + 10
        while state == "PROC" and time.monotonic() < deadline:
            state = agent.check_xfer_state(handle)
        assert state == "DONE"
        assert agent.get_xfer_telemetry(handle).descCount == len(block_runs(np.array(lids), np.array(rids))) == 3
        assert torch.equal(dst[lids], src[rids])
    finally:
        agent.release_xfer_handle(handle)
        local.release()
        remote.release()
        for r in regs:
            agent.deregister_memory(r)

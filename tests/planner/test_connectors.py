"""Connectors: kubernetes against a stub API server implementing /scale, virtual through real file
discovery, local with real `kvrelay worker --engine mocker` processes."""

from __future__ import annotations

import asyncio
import sys

import pytest
from prometheus_client import CollectorRegistry

from kvrelay.planner.connectors.base import ScaleError
from kvrelay.planner.connectors.kubernetes import KubernetesConnector
from kvrelay.planner.connectors.local import LocalConnector
from kvrelay.planner.connectors.virtual import (
    VirtualAck,
    VirtualConnector,
    VirtualDecision,
    ack_key,
    decision_key,
)
from kvrelay.planner.decision import Bounds
from kvrelay.planner.loop import Planner
from kvrelay.planner.metrics import PlannerMetrics
from kvrelay.planner.observation import Observation, Pool, PoolObservation
from kvrelay.planner.policy import Policy, PolicyKind
from kvrelay.runtime.discovery.file import FileDiscovery
from kvrelay.runtime.fleet import Fleet, ProcessPlan
from kvrelay.runtime.wire import decode, encode
from tests.planner.fakes import ScriptedObserver
from tests.planner.k8s_stub import StubApiServer

P, D = Pool.PREFILL, Pool.DECODE
DEPLOYMENTS = {P: "kvrelay-prefill", D: "kvrelay-decode"}


async def test_kubernetes_connector_scales_through_the_scale_subresource():
    with StubApiServer({"kvrelay-prefill": 1, "kvrelay-decode": 1}) as api:
        conn = KubernetesConnector("serving", DEPLOYMENTS, api_url=api.url, token="t0ken")
        assert await conn.ready() == {P: 1, D: 1}
        await conn.scale({P: 2, D: 3})
        assert api.patches == [("serving", "kvrelay-prefill", {"spec": {"replicas": 2}}),
                               ("serving", "kvrelay-decode", {"spec": {"replicas": 3}})]
        assert await conn.ready() == {P: 2, D: 3}
        await conn.close()


async def test_kubernetes_refusal_is_a_scale_error():
    with StubApiServer({"kvrelay-decode": 1}) as api:
        conn = KubernetesConnector("serving", {P: "missing", D: "kvrelay-decode"}, api_url=api.url, token="t0ken")
        with pytest.raises(ScaleError, match="missing"):
            await conn.scale({P: 1})
        bad = KubernetesConnector("serving", DEPLOYMENTS, api_url=api.url, token="wrong")
        with pytest.raises(ScaleError, match="Unauthorized"):
            await bad.scale({D: 2})
        await conn.close()
        await bad.close()


async def test_kubernetes_pending_pods_time_out_and_the_planner_carries_on():
    """Pods beyond `schedulable` stay Pending (readyReplicas < replicas): the planner reports the
    timeout, then decides again from the ready count (Dynamo #14251)."""
    hot = Observation(interval_s=1, request_rate=5, isl=100, osl=50, ttft_p90=5.0, itl_p90=0.01,
                      pools={D: PoolObservation(workers=2, running=16, waiting=30, capacity_seqs=16)})
    t = [0.0]
    with StubApiServer({"kvrelay-decode": 1}, schedulable=2) as api:
        conn = KubernetesConnector("serving", {D: "kvrelay-decode"}, api_url=api.url, token="t0ken")
        reg = CollectorRegistry()
        planner = Planner(ScriptedObserver([hot]), conn, Policy(PolicyKind.LOAD, Bounds(max_prefill=0)),
                          PlannerMetrics(reg), interval=1, scale_timeout=3, clock=lambda: t[0])
        for _ in range(12):
            await planner.step()
            t[0] += 1
        events = [h["event"] for h in planner.history]
        assert "scale ready" in events and "scale timed out" in events
        assert api.ready["kvrelay-decode"] == 2 and api.replicas["kvrelay-decode"] >= 3
        assert reg.get_sample_value("kvrelay_planner_scale_timeouts_total", {"pool": "decode"}) >= 1
        await conn.close()


async def test_virtual_connector_publishes_and_reads_the_ack(tmp_path):
    planner_side = FileDiscovery(str(tmp_path), ttl=5)
    external = FileDiscovery(str(tmp_path), ttl=5)
    await planner_side.start()
    await external.start()
    try:
        conn = VirtualConnector(planner_side, "ns", initial={P: 1, D: 1})
        await conn.scale({P: 1, D: 3})
        found = await external.list(decision_key("ns"))
        decision = decode(found[decision_key("ns")], VirtualDecision)
        assert decision.seq == 1 and decision.counts == {"prefill": 1, "decode": 3}
        assert await conn.ready() == {P: 1, D: 1}  # no ack yet: nothing changed
        await external.register(ack_key("ns"), encode(VirtualAck(seq=1, counts={"prefill": 1, "decode": 3})))
        assert await conn.ready() == {P: 1, D: 3}
        await conn.close()
        assert decision_key("ns") not in await external.list(decision_key("ns"))
    finally:
        await planner_side.close()
        await external.close()


async def test_local_connector_starts_and_stops_worker_processes(tmp_path):
    from kvrelay.runtime.events.zmq_plane import ZmqBroker

    pub, sub = f"ipc://{tmp_path}/pub.sock", f"ipc://{tmp_path}/sub.sock"
    broker = ZmqBroker(pub, sub)
    broker.start()

    def plan(role: str, ordinal: int) -> ProcessPlan:
        return ProcessPlan(f"{role}-{ordinal}", (
            sys.executable, "-m", "kvrelay.cli.main", "worker", "--engine", "mocker", "--model", "tiny",
            "--role", role, "--kv-transfer", "none", "--discovery-dir", str(tmp_path / "d"), "--events", "zmq",
            "--zmq-pub-endpoint", pub, "--zmq-sub-endpoint", sub, "--metrics-port", "-1"))

    fleet: Fleet[str] = Fleet(plan, stop_grace=20)
    conn = LocalConnector(fleet, {P: "prefill", D: "decode"})
    try:
        await conn.scale({P: 0, D: 2})
        for _ in range(300):
            if (await conn.ready())[D] == 2:
                break
            await asyncio.sleep(0.1)
        assert await conn.ready() == {P: 0, D: 2}
        pids = [s.proc.pid for s in fleet.slots]
        await conn.scale({P: 0, D: 1})
        assert (await conn.ready())[D] == 1  # the stopping one no longer counts at once
        for _ in range(200):
            if len(fleet.live()) == 1:
                break
            await asyncio.sleep(0.1)
        assert [p.pid for p in fleet.live()] == pids[:1]  # the newest went
    finally:
        await fleet.close()
        broker.close()
    assert not fleet.live()


async def test_virtual_ready_counts_registered_workers_until_the_first_ack(tmp_path):
    """Issue 30: `planner status` said ready 0/0 with a prefill and a decode worker registered."""
    from kvrelay.runtime.discovery import Instance, register_instance

    workers, planner_side = FileDiscovery(str(tmp_path), ttl=30), FileDiscovery(str(tmp_path), ttl=30)
    await workers.start()
    await planner_side.start()
    try:
        for i, role in enumerate(("prefill", "decode", "agg")):
            await register_instance(workers, Instance(namespace="ns", component="backend", instance_id=f"w{i}",
                                                      address=f"127.0.0.1:{9000 + i}", role=role, model="m"))
        conn = VirtualConnector(planner_side, "ns")
        assert await conn.ready() == {P: 1, D: 2}  # agg workers decode: the decode pool
        await workers.register(ack_key("ns"), encode(VirtualAck(seq=1, counts={"prefill": 0, "decode": 4})))
        assert await conn.ready() == {P: 0, D: 4}  # once the owner answers, its counts are the truth
    finally:
        await planner_side.close()
        await workers.close()


async def test_planner_status_counts_the_registered_workers(tmp_path):
    from kvrelay.planner.observe import Observer
    from kvrelay.runtime.discovery import Instance, register_instance

    disc = FileDiscovery(str(tmp_path), ttl=30)
    await disc.start()
    observer = Observer(disc, "ns", frontend_urls=[])
    try:
        for i, role in enumerate(("prefill", "decode")):
            await register_instance(disc, Instance(namespace="ns", component="backend", instance_id=f"w{i}",
                                                   address=f"127.0.0.1:{9000 + i}", role=role, model="m"))
        planner = Planner(observer, VirtualConnector(disc, "ns"),
                          Policy(PolicyKind.LOAD, Bounds(max_prefill=2, max_decode=2)),
                          PlannerMetrics(CollectorRegistry()), interval=1)
        await planner.step()
        status = planner.status()
        assert status["registered"] == {"prefill": 1, "decode": 1}
        assert status["ready"] == {"prefill": 1, "decode": 1}
    finally:
        await observer.close()
        await disc.close()

"""The worker contract's constants name what they claim: an error kind is the class name the worker's
RPC server reports (runtime/rpc/server.py uses the exception's class name), and every endpoint the
worker serves is one `WorkerClient` can call."""

from __future__ import annotations

import asyncio

from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.events.inproc import InprocBroker, InprocEventPlane
from kvrelay.runtime.rpc import RemoteError
from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.endpoints import Endpoint, ErrorKind, Role
from kvrelay.workers.api.errors import EngineError, EngineOverloaded
from kvrelay.workers.api.messages import EngineRequest, SamplingParams
from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.worker import Worker


def test_error_kinds_are_the_class_names():
    assert ErrorKind.ENGINE_OVERLOADED == EngineOverloaded.__name__
    assert ErrorKind.ENGINE_ERROR == EngineError.__name__


def test_worker_serves_every_endpoint_through_the_client(tmp_path):
    async def main():
        cfg = WorkerConfig(engine="mocker", role=Role.PREFILL, mocker_speedup=0, max_waiting=1, max_num_seqs=1)
        w = Worker(cfg, make_discovery(DiscoveryConfig(discovery="file", discovery_dir=str(tmp_path))),
                   InprocEventPlane(InprocBroker()))
        await w.start()
        client = WorkerClient()
        try:
            assert set(w.server._endpoints) == set(Endpoint)  # prefill role: all of them
            addr = w.instance.address
            req = EngineRequest(request_id="a", prompt_token_ids=list(range(4, 40)),
                                sampling=SamplingParams(max_tokens=3, ignore_eos=True))
            outs = await client.generate(addr, req).collect()
            assert sum(len(o.token_ids) for o in outs) == 3
            async with client.prefill(addr, EngineRequest(request_id="p", prompt_token_ids=list(range(4, 40)))) as s:
                reply = [r async for r in s][-1]
            assert reply.handle is not None and (await client.stats(addr)).held_requests == 1
            await client.release(addr, "p")
            card = await client.model_card(addr)
            snap = await client.kv_snapshot(addr)
            xfer = await client.transfer_stats(addr)
            assert card.block_size == 16 and snap.worker_id == w.instance_id and xfer.kind == "none"
            bad = EngineRequest(request_id="b", prompt_token_ids=[])
            try:
                await client.generate(addr, bad).collect()
            except RemoteError as e:
                assert e.kind == ErrorKind.ENGINE_ERROR
            else:
                raise AssertionError("an empty prompt was accepted")
        finally:
            await client.close()
            await w.close()

    asyncio.run(main())

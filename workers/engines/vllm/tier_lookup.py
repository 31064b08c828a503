"""Which prompt blocks to load from kvrelay's tiers: asked by vLLM's scheduler, answered by its worker.

On CPU vLLM always runs its worker in a process of its own (the `mp` executor: OpenMP needs it), and
the tier stores (G2's memory, G3's index, G4's client) and the cost model live there, next to vLLM's
KV tensors. The scheduler half asks over one ZMQ socket in the engine's private directory:

    scheduler (DEALER)  [key, msgpack([hashes, local, peer])]  ->  worker (ROUTER, on the tier loop)
    scheduler           [key, msgpack(tiers)]            <-  worker

`hashes` are the request's block hashes up to the last loadable block, `local` how many leading blocks
vLLM's own cache has (a `TierLookup`, workers/core/kv_sources/tiers.py), `peer` how many leading blocks
the request's peer leased to it (the cluster KV pool, peer_pool.py; 0: none); the answer is, per leading
block, None (vLLM's) or the tier to load it from (`TieredKv.lookup`, then the engine-neutral
`load_plan` with the cost model), up to the last block worth loading: possibly empty. A block no local
tier holds but the peer does is planned from tier "peer"; with a peer the plan is not cut by the cost
model (the router already weighed the pull against recompute, and the model has not measured the link). The scheduler never blocks on it beyond `wait_s`: vLLM
asks again next step (`get_num_new_matched_tokens` -> None), and a lookup unanswered for
`GIVE_UP_S` is a miss, so a request never waits on a worker that is gone.
"""

from __future__ import annotations

import logging
import time

import msgspec
import zmq

from kvrelay.kvbm.tiered_kv import TieredKv
from kvrelay.workers.core.kv_sources.tiers import load_plan
from kvrelay.workers.engines.vllm.peer_pool import PEER_TIER
from kvrelay.workers.engines.vllm.router_socket import RouterSocketServer

log = logging.getLogger("kvrelay.vllm.tiers")
GIVE_UP_S = 5.0


def endpoint(socket_dir: str) -> str:
    return f"ipc://{socket_dir}/kv-tiers"


async def answer(tiered: TieredKv, hashes: list[int], local: int, limit: int, peer: int = 0) -> list[str | None]:
    """Per leading block: None (vLLM holds it) or the tier to load it from, cut by the cost model, at
    most `limit` loads (the staging rows a load can take); [] when nothing is worth loading. `peer`:
    the leading blocks the request's peer leased (planned from PEER_TIER where no local tier has them)."""
    found = await tiered.lookup(hashes, set(hashes[:local]).__contains__)
    if peer > local:
        found = [t or (PEER_TIER if i < peer else None) for i, t in enumerate(found)]
    plan = load_plan(found, [True] * local, None if peer > local else tiered.cost, limit)
    return plan if len(plan) > local else []


class LookupServer(RouterSocketServer):
    """The worker half's side: answers on the tier loop, each lookup in its own task (G4 HEADs wait)."""

    def __init__(self, socket_dir: str, tiered: TieredKv, limit: int):
        self.tiered, self.limit = tiered, limit
        self.pulls = False  # the cluster KV pool is up here: a lookup may plan blocks from the peer
        super().__init__(endpoint(socket_dir))

    async def answer(self, payload: bytes) -> bytes:
        try:
            hashes, local, peer = msgspec.msgpack.decode(payload)
            tiers = await answer(self.tiered, hashes, local, self.limit, peer if self.pulls else 0)
        except Exception:
            log.exception("kvrelay tier lookup failed; answering a miss")
            tiers = []
        return msgspec.msgpack.encode(tiers)


class LookupClient:
    """The scheduler half's side: non-blocking asks, answers collected by key."""

    def __init__(self, socket_dir: str):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint(socket_dir))
        self._asked: dict[str, tuple[str, float]] = {}  # request id -> (the wire key of its last ask, when)
        self._answers: dict[str, list[str | None]] = {}  # wire key -> answer
        self._n = 0

    def ask(self, request_id: str, hashes: list[int], local: int, peer: int = 0) -> None:
        """Asks for a request; an earlier ask of the same request is forgotten (its answer is dropped)."""
        self.forget(request_id)
        self._n += 1
        key = f"{request_id}#{self._n}"
        self._asked[request_id] = (key, time.monotonic())
        self._sock.send_multipart([key.encode(), msgspec.msgpack.encode([hashes, local, peer])])

    def result(self, request_id: str, wait_s: float) -> list[str | None] | None:
        """The answer for the request's last ask, waiting at most wait_s; [] once it is overdue (a miss);
        None: not yet."""
        if request_id not in self._asked:
            return None
        key, asked_at = self._asked[request_id]
        deadline = time.monotonic() + wait_s
        while key not in self._answers:
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(timeout_ms):
                break
            k, payload = self._sock.recv_multipart()
            rid = k.decode().rsplit("#", 1)[0]
            if self._asked.get(rid, ("",))[0] == k.decode():
                self._answers[k.decode()] = msgspec.msgpack.decode(payload)
        if key in self._answers:
            del self._asked[request_id]
            return self._answers.pop(key)
        if time.monotonic() - asked_at > GIVE_UP_S:
            log.warning("kvrelay tier lookup unanswered for %.0fs: recomputing the request", GIVE_UP_S)
            del self._asked[request_id]
            return []
        return None

    def forget(self, request_id: str) -> None:
        key, _ = self._asked.pop(request_id, ("", 0.0))
        self._answers.pop(key, None)

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

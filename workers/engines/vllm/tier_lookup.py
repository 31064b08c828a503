"""Which prompt blocks to load from kvrelay's tiers: asked by vLLM's scheduler, answered by its worker.

On CPU vLLM always runs its worker in a process of its own (the `mp` executor: OpenMP needs it), and
the tier stores (G2's memory, G3's index, G4's client) and the cost model live there, next to vLLM's
KV tensors. The scheduler half asks over one ZMQ socket in the engine's private directory:

    scheduler (DEALER)  [key, msgpack([hashes, local])]  ->  worker (ROUTER, on the tier loop)
    scheduler           [key, msgpack(tiers)]            <-  worker

`hashes` are the request's block hashes up to the last loadable block, `local` how many leading blocks
vLLM's own cache has; the answer is the tier of each block to load after those (`TieredKv.lookup`,
then `CostModel.best_cut`): possibly empty. The scheduler never blocks on it beyond `wait_s`: vLLM
asks again next step (`get_num_new_matched_tokens` -> None), and a lookup unanswered for
`GIVE_UP_S` is a miss, so a request never waits on a worker that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import zmq
import zmq.asyncio

from kvrelay.kvbm.tiered_kv import TieredKv
from kvrelay.workers.core.kv_sources.tiers import load_plan

log = logging.getLogger("kvrelay.vllm.tiers")
GIVE_UP_S = 5.0


def endpoint(socket_dir: str) -> str:
    return f"ipc://{socket_dir}/kv-tiers"


async def answer(tiered: TieredKv, hashes: list[int], local: int, limit: int) -> list[str]:
    """The tiers of the blocks after `local` worth loading (kvbm's lookup and cost model), at most
    `limit` (the staging rows a load can take)."""
    found = await tiered.lookup(hashes, set(hashes[:local]).__contains__)
    plan = load_plan(found, [True] * local, tiered.cost, limit)
    return [t for t in plan[local:] if t is not None]


class LookupServer:
    """The worker half's side: answers on the tier loop, each lookup in its own task (G4 HEADs wait)."""

    def __init__(self, socket_dir: str, tiered: TieredKv, limit: int):
        self.tiered, self.limit = tiered, limit
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint(socket_dir))
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._pending: set[asyncio.Task] = set()

    async def _serve(self) -> None:
        while True:
            ident, key, payload = await self._sock.recv_multipart()
            task = asyncio.get_running_loop().create_task(self._one(ident, key, payload))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _one(self, ident: bytes, key: bytes, payload: bytes) -> None:
        try:
            hashes, local = msgspec.msgpack.decode(payload)
            tiers = await answer(self.tiered, hashes, local, self.limit)
        except Exception:
            log.exception("kvrelay tier lookup failed; answering a miss")
            tiers = []
        await self._sock.send_multipart([ident, key, msgspec.msgpack.encode(tiers)])

    async def close(self) -> None:
        self._task.cancel()
        for t in list(self._pending):
            t.cancel()
        self._sock.close(0)
        self._ctx.term()


class LookupClient:
    """The scheduler half's side: non-blocking asks, answers collected by key."""

    def __init__(self, socket_dir: str):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint(socket_dir))
        self._asked: dict[str, float] = {}  # key -> when asked
        self._answers: dict[str, list[str]] = {}

    def ask(self, key: str, hashes: list[int], local: int) -> None:
        self._asked[key] = time.monotonic()
        self._sock.send_multipart([key.encode(), msgspec.msgpack.encode([hashes, local])])

    def result(self, key: str, wait_s: float) -> list[str] | None:
        """The answer to `key`, waiting at most wait_s; [] once it is overdue (a miss); None: not yet."""
        deadline = time.monotonic() + wait_s
        while key not in self._answers:
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(timeout_ms):
                break
            k, payload = self._sock.recv_multipart()
            if k.decode() in self._asked:
                self._answers[k.decode()] = msgspec.msgpack.decode(payload)
        if key in self._answers:
            self._asked.pop(key, None)
            return self._answers.pop(key)
        if time.monotonic() - self._asked.get(key, 0.0) > GIVE_UP_S:
            log.warning("kvrelay tier lookup unanswered for %.0fs: recomputing the request", GIVE_UP_S)
            self._asked.pop(key, None)
            return []
        return None

    def forget(self, key: str) -> None:
        self._asked.pop(key, None)
        self._answers.pop(key, None)

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()

"""Subscribe to vLLM's ZMQ KV-event publisher, in order and without gaps.

vLLM numbers its batches 0, 1, 2, ... A batch whose number skips ahead means batches were dropped (the
PUB socket's high-water mark, a slow subscriber): the missing ones are asked for on vLLM's replay
socket (ROUTER; request = the first wanted number as 8 bytes big-endian; answers (b"", topic, seq,
payload) ... then a seq of -1). What the replay buffer no longer holds cannot be recovered: the mapper
is cleared (a `cleared` event tells routers to forget this worker's G1) and indexing restarts from the
next roots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

_END = -1
REPLAY_TIMEOUT_S = 2.0


class VllmEventSubscriber:
    def __init__(self, endpoint: str, replay_endpoint: str, on_batch: Callable[[bytes], None],
                 on_lost: Callable[[], None]):
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self.on_batch, self.on_lost = on_batch, on_lost
        self.ctx = zmq.asyncio.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.RCVHWM, 0)  # never drop on our side
        self.sub.connect(endpoint)
        self.next_seq = 0
        self.gaps = 0  # gaps seen (replayed or not)
        self.lost = 0  # batches neither received nor replayable
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvrelay-vllm-events")

    async def _run(self) -> None:
        while True:
            _topic, seq_b, payload = await self.sub.recv_multipart()
            seq = int.from_bytes(seq_b, "big", signed=True)
            if seq < self.next_seq:
                continue  # already delivered (by a replay)
            if seq > self.next_seq:
                self.gaps += 1
                await self._replay(seq)
                if seq < self.next_seq:
                    continue
            self._deliver(seq, payload)

    def _deliver(self, seq: int, payload: bytes) -> None:
        self.next_seq = seq + 1
        try:
            self.on_batch(payload)
        except Exception:  # one malformed batch must not stop indexing
            log.warning("vLLM KV event batch %d not understood", seq, exc_info=True)

    async def _replay(self, upto: int) -> None:
        """Fetch batches [next_seq, upto) from the replay socket; unrecoverable ones clear the index."""
        want = self.next_seq
        sock = self.ctx.socket(zmq.DEALER)
        try:
            sock.connect(self.replay_endpoint)
            await sock.send_multipart((b"", want.to_bytes(8, "big")))
            while True:
                if not await sock.poll(REPLAY_TIMEOUT_S * 1000):
                    break
                frames = await sock.recv_multipart()
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == _END:
                    break
                if seq < self.next_seq or seq >= upto:
                    continue
                if seq > self.next_seq:  # the buffer no longer holds what we missed
                    self._lose(seq)
                self._deliver(seq, frames[-1])
        finally:
            sock.close(linger=0)
        if self.next_seq < upto:
            self._lose(upto)

    def _lose(self, resume_at: int) -> None:
        self.lost += resume_at - self.next_seq
        log.warning("vLLM KV event batches %d..%d lost; the router forgets this worker's G1 and relearns it",
                    self.next_seq, resume_at - 1)
        self.next_seq = resume_at
        self.on_lost()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sub.close(linger=0)
        self.ctx.term()

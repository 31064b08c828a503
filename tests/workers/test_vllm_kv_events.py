"""vLLM KV events -> kvrelay events (workers/engines/vllm/kv_events.py), on payloads captured from vLLM
0.32 (named-map encoding; tests/workers/data/vllm_0_32_kv_events.msgpack: a 100-token prompt, the
same prompt with cache_salt "tenant-1", then four 150-token prompts through a 12-block KV cache, so
blocks are evicted) and on payloads in the positional encoding of vLLM <= 0.11 (encoded here with that
release's struct shapes: array-like, tagged). No vLLM needed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.workers.core.kv_events import KvEventLog
from kvrelay.workers.engines.vllm.event_subscriber import VllmEventSubscriber
from kvrelay.workers.engines.vllm.kv_events import VllmEventMapper, decode_batch

DATA = Path(__file__).parent / "data" / "vllm_0_32_kv_events.msgpack"
FP, BS = "vllm-test-fingerprint", 32


def captured() -> list[bytes]:
    return msgspec.msgpack.decode(DATA.read_bytes())


def mapper() -> tuple[VllmEventMapper, KvEventLog]:
    log = KvEventLog()
    return VllmEventMapper(FP, BS, log), log


def test_captured_named_map_events_map_to_kvrelay_hashes_of_the_prompts():
    m, log = mapper()
    batches = captured()
    m.apply(decode_batch(batches[0]))
    prompt = list(range(100, 200))  # 3 full blocks of 32
    assert [e.seq_hashes for e in log.drain()] == [block_hashes(prompt, BS, root_hash(FP))]
    m.apply(decode_batch(batches[1]))  # same tokens, cache_salt "tenant-1": another chain
    (salted,) = log.drain()
    assert salted.seq_hashes == block_hashes(prompt, BS, root_hash(FP, "tenant-1"))
    assert salted.parent_hash is None


def test_captured_evictions_keep_the_mirror_and_the_snapshot_exact():
    m, log = mapper()
    stored: dict[int, None] = {}
    for payload in captured():
        m.apply(decode_batch(payload))
        for e in log.drain():
            if e.kind == "stored":
                stored.update(dict.fromkeys(e.seq_hashes))
            elif e.kind == "removed":
                for h in e.seq_hashes:
                    del stored[h]  # every removal names a block that was stored
    assert len(stored) == 12 - 1 or len(stored) <= 12  # never more than vLLM's 12 blocks
    assert set(m.snapshot_hashes()) == set(stored)
    assert log.snapshot(m.snapshot_hashes()).last_event_id == log.last_event_id
    assert m.unchained == 0


class _StoredV011(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockStored"):
    block_hashes: list
    parent_block_hash: object
    token_ids: list
    block_size: int
    lora_id: object
    medium: object


class _RemovedV011(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list
    medium: object


class _ClearedV011(msgspec.Struct, array_like=True, omit_defaults=True, tag="AllBlocksCleared"):
    pass


class _BatchV011(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list
    data_parallel_rank: object = None


def test_positional_encoding_of_older_vllm_decodes_the_same():
    tokens = list(range(64))
    payload = msgspec.msgpack.encode(_BatchV011(1.0, [
        _StoredV011([11], None, tokens[:32], 32, None, "GPU"),
        _StoredV011([12], 11, tokens[32:], 32, None, "GPU"),
        _RemovedV011([12], "GPU"),
        _ClearedV011(),
    ]))
    m, log = mapper()
    m.apply(decode_batch(payload))
    ours = block_hashes(tokens, BS, root_hash(FP))
    events = log.drain()
    assert [(e.kind, e.seq_hashes, e.parent_hash) for e in events] == [
        ("stored", ours[:1], None), ("stored", ours[1:], ours[0]), ("removed", ours[1:], None), ("cleared", [], None)]
    assert m.snapshot_hashes() == []


def test_unknown_fields_types_and_other_media_are_ignored():
    tokens = list(range(32))
    payload = msgspec.msgpack.encode([2.0, [
        {"type": "BlockStored", "block_hashes": [b"\x01"], "parent_block_hash": None, "token_ids": tokens,
         "block_size": 32, "medium": "GPU", "lora_name": None, "a_field_from_the_future": [1, 2]},
        {"type": "SomethingNew", "x": 1},
        {"type": "BlockStored", "block_hashes": [b"\x02"], "parent_block_hash": None, "token_ids": tokens,
         "block_size": 32, "medium": "CPU"},  # vLLM's own CPU offload tier: not G1
        {"type": "BlockStored", "block_hashes": [b"\x03"], "parent_block_hash": b"\x99", "token_ids": tokens,
         "block_size": 32, "medium": "GPU"},  # parent never seen (stored before a resync)
    ], 0])
    m, log = mapper()
    m.apply(decode_batch(payload))
    assert [e.seq_hashes for e in log.drain()] == [block_hashes(tokens, BS, root_hash(FP))]
    assert m.unchained == 1
    with pytest.raises(ValueError):
        decode_batch(msgspec.msgpack.encode({"not": "a batch"}))


class _FakePublisher:
    """vLLM's ZmqEventPublisher wire protocol (PUB + ROUTER replay with a bounded buffer), for the
    subscriber's gap logic; the real publisher is exercised in the vllm lane."""

    def __init__(self, tmp: Path, buffer: int):
        self.ctx = zmq.asyncio.Context()
        self.pub, self.replay = self.ctx.socket(zmq.PUB), self.ctx.socket(zmq.ROUTER)
        self.endpoint, self.replay_endpoint = f"ipc://{tmp}/ev", f"ipc://{tmp}/replay"
        self.pub.bind(self.endpoint)
        self.replay.bind(self.replay_endpoint)
        self.sent: list[tuple[int, bytes]] = []
        self.buffer = buffer
        self.task = asyncio.create_task(self._serve_replay())

    async def send(self, seq: int, payload: bytes, deliver: bool = True) -> None:
        self.sent = (self.sent + [(seq, payload)])[-self.buffer:]
        if deliver:
            await self.pub.send_multipart((b"kv", seq.to_bytes(8, "big"), payload))

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.replay.recv_multipart()
            for seq, buf in self.sent:
                if seq >= int.from_bytes(start, "big"):
                    await self.replay.send_multipart((client, b"", b"kv", seq.to_bytes(8, "big"), buf))
            await self.replay.send_multipart((client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""))

    def close(self) -> None:
        self.task.cancel()
        self.ctx.destroy(linger=0)


async def test_subscriber_replays_a_gap_and_clears_what_the_buffer_lost(tmp_path):
    pub = _FakePublisher(tmp_path, buffer=3)
    got: list[bytes] = []
    lost: list[int] = []
    sub = VllmEventSubscriber(pub.endpoint, pub.replay_endpoint, got.append, lambda: lost.append(1))
    sub.start()
    await asyncio.sleep(0.2)  # the SUB connection is up
    await pub.send(0, b"b0")
    await pub.send(1, b"b1", deliver=False)  # dropped on the wire, still in the replay buffer
    await pub.send(2, b"b2")
    for _ in range(50):
        if len(got) == 3:
            break
        await asyncio.sleep(0.05)
    assert got == [b"b0", b"b1", b"b2"] and not lost and sub.gaps == 1
    for seq in range(3, 8):  # 3..6 dropped; the buffer (3) keeps 5..7 only
        await pub.send(seq, f"b{seq}".encode(), deliver=seq == 7)
    for _ in range(50):
        if got[-1] == b"b7":
            break
        await asyncio.sleep(0.05)
    assert got[3:] == [b"b5", b"b6", b"b7"] and lost == [1] and sub.lost == 2
    await sub.close()
    pub.close()

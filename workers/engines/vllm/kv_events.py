"""vLLM's KV events -> kvrelay `KvEvent`s with kvrelay block identity (docs/ARCHITECTURE.md "Block identity").

vLLM publishes `KVEventBatch(ts, events, data_parallel_rank)` over ZMQ, one multipart message per batch:
(topic, sequence number as 8 bytes big-endian, msgpack payload). The batch is an array; each event is a
tagged union whose encoding changed across vLLM releases:

- positional (vLLM <= 0.11): `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
  lora_id, medium, ...]`, `["BlockRemoved", block_hashes, medium, ...]`, `["AllBlocksCleared"]`;
- named map (vLLM PR #42892 and later, 0.32 here): `{"type": "BlockStored", "block_hashes": ...,
  "parent_block_hash": ..., "token_ids": ..., "block_size": ..., "lora_name": ..., "extra_keys": ...}`.

Both decode; unknown fields and unknown event types are ignored, so a new vLLM field cannot break
indexing. kvrelay's own tier connector (tier_connector.py) publishes its G2/G3/G4 events on the same
stream, marked `ownership="kvrelay"`, with kvrelay hashes and the tier in `medium` + `locality`; they
go to the tier mirrors of the `KvEventLog`. vLLM's own block hashes are opaque here (their algorithm is vLLM's setting): kvrelay's hash is
recomputed from each stored block's token ids, chained from its parent's kvrelay hash, so the router's
index and every tier speak one hash. The map vLLM hash -> kvrelay hash is the G1 mirror a snapshot reads.

Invariant: after `apply(batch)`, `held` holds exactly the blocks vLLM reported stored and not removed,
for every block whose chain back to a root was seen; the events returned are what changed in `held`,
numbered by the one `KvEventLog`.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from kvrelay.kvbm.hashing import block_hashes, root_hash
from kvrelay.workers.core.kv_events import KvEventLog

log = logging.getLogger(__name__)

_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
_REMOVED_FIELDS = ("block_hashes", "medium")
_G1_MEDIA = (None, "GPU")  # vLLM's own KV cache; CPU/STORAGE are its offloading tiers
TIER_OWNERSHIP = "kvrelay"  # events of kvrelay's tier connector (tier_connector.py): kvrelay hashes
_TIERS: dict[tuple[str | None, str | None], str] = {("CPU", "LOCAL"): "G2", ("STORAGE", "LOCAL"): "G3", ("STORAGE", "REMOTE"): "G4"}


def decode_batch(payload: bytes) -> list[dict[str, Any]]:
    """A msgpack `KVEventBatch` as a list of events, each a dict with "type" (either encoding)."""
    batch = msgspec.msgpack.decode(payload)
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch")
    return [e for e in (_normalize(raw) for raw in batch[1]) if e is not None]


def _normalize(raw: Any) -> dict[str, Any] | None:
    if isinstance(raw, dict):
        return raw if isinstance(raw.get("type"), str) else None
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = {"BlockStored": _STORED_FIELDS, "BlockRemoved": _REMOVED_FIELDS}.get(kind, ())
        event = dict(zip(names, raw[1:], strict=False))
        event["type"] = kind
        return event
    return None


class VllmEventMapper:
    def __init__(self, fingerprint: str, block_size: int, log_: KvEventLog):
        self.fingerprint, self.block_size, self.log = fingerprint, block_size, log_
        self.held: dict[Any, int] = {}  # vLLM block hash -> kvrelay block hash (G1, in store order)
        self.unchained = 0  # stored blocks skipped: parent unknown (stored before a resync)

    def apply(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            kind = e["type"]
            if e.get("ownership") == TIER_OWNERSHIP and kind in ("BlockStored", "BlockRemoved"):
                self._tier(e)
            elif kind == "BlockStored" and e.get("medium") in _G1_MEDIA:
                self._stored(e)
            elif kind == "BlockRemoved" and e.get("medium") in _G1_MEDIA:
                gone = [self.held.pop(_key(h)) for h in e.get("block_hashes") or [] if _key(h) in self.held]
                if gone:
                    self.log.g1_removed(gone)
            elif kind == "AllBlocksCleared":
                self.clear()

    def _tier(self, e: dict[str, Any]) -> None:
        """A kvrelay tier's event: its hashes are kvrelay's already; the tier is in medium + locality.
        Other owners' CPU/STORAGE events (vLLM's own offloading) carry vLLM hashes and stay ignored."""
        tier = _TIERS.get((e.get("medium"), e.get("locality")))
        hashes = [h for h in e.get("block_hashes") or [] if isinstance(h, int)]
        if tier is not None and hashes:
            self.log.tier_event(tier, "stored" if e["type"] == "BlockStored" else "removed", hashes)

    def clear(self) -> None:
        """Forget every block (vLLM cleared its cache, or events were lost beyond replay)."""
        self.held.clear()
        self.log.last_event_id += 1
        self.log.events.append(_cleared(self.log.last_event_id))

    def _stored(self, e: dict[str, Any]) -> None:
        vhashes = [_key(h) for h in e.get("block_hashes") or []]
        tokens = list(e.get("token_ids") or [])
        bs = int(e.get("block_size") or self.block_size)
        if bs != self.block_size or len(tokens) < bs * len(vhashes):
            log.warning("vLLM BlockStored with block size %d / %d tokens for %d blocks: ignored", bs,
                        len(tokens), len(vhashes))
            return
        lora = e.get("lora_name") or ""
        extra = lora.encode() if isinstance(lora, str) else b""
        parent_v = e.get("parent_block_hash")
        if parent_v is None:
            parent, parent_out = root_hash(self.fingerprint, _salt(e, lora)), None
        elif _key(parent_v) in self.held:
            parent = parent_out = self.held[_key(parent_v)]
        else:
            self.unchained += len(vhashes)
            return
        ours = block_hashes(tokens[:bs * len(vhashes)], bs, parent, extra)
        new = [(v, h) for v, h in zip(vhashes, ours, strict=False) if v not in self.held]
        self.held.update(new)
        if new:
            first = ours.index(new[0][1])
            self.log.g1_stored([h for _, h in new], ours[first - 1] if first else parent_out)

    def snapshot_hashes(self) -> list[int]:
        return list(self.held.values())


def _key(h: Any) -> Any:
    """vLLM hashes are ints or bytes (per its hash algorithm); lists from msgpack become tuples."""
    return tuple(h) if isinstance(h, list) else h


def _salt(e: dict[str, Any], lora: str) -> str:
    """The first block's cache salt, from its extra keys: the strings that are not the LoRA name."""
    keys = (e.get("extra_keys") or [None])[0] or ()
    return "".join(k for k in keys if isinstance(k, str) and k != lora)


def _cleared(event_id: int):
    from kvrelay.kvbm.events import KvEvent

    return KvEvent(worker_id="", event_id=event_id, kind="cleared", tier="G1")

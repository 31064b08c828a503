"""Typed worker instances on top of the key/value discovery contract (docs/ARCHITECTURE.md "Discovery").

Key layout: `kvrelay/<namespace>/instances/<component>/<instance_id>`; value: msgpack `Instance`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import msgspec

from kvrelay.runtime.discovery.base import Discovery
from kvrelay.runtime.wire import decode, encode

log = logging.getLogger(__name__)


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str
    component: str
    instance_id: str
    address: str  # request-plane address, "host:port"
    role: str = "agg"  # agg | prefill | decode
    model: str = ""
    block_size: int = 16
    kv_capacity_blocks: int = 0
    transfer_metadata: bytes = b""
    labels: dict[str, str] = {}

    @property
    def key(self) -> str:
        return instance_key(self.namespace, self.component, self.instance_id)


class InstanceEvent(msgspec.Struct, frozen=True):
    kind: str  # added | removed
    key: str
    instance: Instance | None  # None when removed


def instances_prefix(namespace: str, component: str | None = None) -> str:
    base = f"kvrelay/{namespace}/instances/"
    return base if component is None else f"{base}{component}/"


def instance_key(namespace: str, component: str, instance_id: str) -> str:
    return f"{instances_prefix(namespace, component)}{instance_id}"


async def register_instance(discovery: Discovery, instance: Instance) -> None:
    await discovery.register(instance.key, encode(instance))


def _decode_instance(key: str, value: bytes) -> Instance | None:
    """An entry that is not an Instance (another tool's key, a newer or corrupt record) is skipped with a
    warning: one foreign key under the prefix must not hide every worker from the frontend."""
    try:
        return decode(value, Instance)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.warning("discovery: skipping %s: not an instance record (%s)", key, e)
        return None


async def list_instances(discovery: Discovery, namespace: str, component: str | None = None) -> list[Instance]:
    found = await discovery.list(instances_prefix(namespace, component))
    decoded = (_decode_instance(k, v) for k, v in sorted(found.items()))
    return [inst for inst in decoded if inst is not None]


async def watch_instances(discovery: Discovery, namespace: str,
                          component: str | None = None) -> AsyncIterator[InstanceEvent]:
    async for ev in discovery.watch(instances_prefix(namespace, component)):
        if ev.kind == "added":
            inst = _decode_instance(ev.key, ev.value)
            if inst is None:
                continue
            yield InstanceEvent(ev.kind, ev.key, inst)
        else:
            yield InstanceEvent(ev.kind, ev.key, None)

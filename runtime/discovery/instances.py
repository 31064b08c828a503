"""Typed worker instances on top of the key/value discovery contract (DESIGN.md "Discovery").

Key layout: `kvrelay/<namespace>/instances/<component>/<instance_id>`; value: msgpack `Instance`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from kvrelay.runtime.discovery.base import Discovery
from kvrelay.runtime.wire import decode, encode


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


async def list_instances(discovery: Discovery, namespace: str, component: str | None = None) -> list[Instance]:
    found = await discovery.list(instances_prefix(namespace, component))
    return [decode(v, Instance) for _, v in sorted(found.items())]


async def watch_instances(discovery: Discovery, namespace: str,
                          component: str | None = None) -> AsyncIterator[InstanceEvent]:
    async for ev in discovery.watch(instances_prefix(namespace, component)):
        inst = decode(ev.value, Instance) if ev.kind == "added" else None
        yield InstanceEvent(ev.kind, ev.key, inst)

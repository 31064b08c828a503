"""Discovery: who is up, where, and with what. Backends: mem, file (embedded default), etcd."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvrelay.runtime.config import positive, setting
from kvrelay.runtime.discovery.base import Discovery, WatchEvent
from kvrelay.runtime.discovery.instances import (
    Instance,
    InstanceEvent,
    instance_key,
    instances_prefix,
    list_instances,
    register_instance,
    watch_instances,
)
from kvrelay.runtime.paths import default_discovery_dir

__all__ = [
    "Discovery", "DiscoveryConfig", "Instance", "InstanceEvent", "WatchEvent", "instance_key",
    "instances_prefix", "list_instances", "make_discovery", "register_instance", "watch_instances",
]


@dataclass(frozen=True)
class DiscoveryConfig:
    group_title = "discovery"
    discovery: Literal["file", "etcd", "mem"] = setting("file", "discovery backend")
    discovery_dir: str = setting("", "directory of the file backend (default: user cache dir)")
    etcd_endpoints: str = setting("127.0.0.1:2379", "etcd endpoint host:port (first reachable is used)")
    lease_ttl: float = setting(10.0, "seconds an instance outlives its last heartbeat/keep-alive", positive)


def make_discovery(cfg: DiscoveryConfig, mem_store=None) -> Discovery:
    if cfg.discovery == "file":
        from kvrelay.runtime.discovery.file import FileDiscovery

        return FileDiscovery(cfg.discovery_dir or str(default_discovery_dir()), ttl=cfg.lease_ttl)
    if cfg.discovery == "etcd":
        from kvrelay.runtime.discovery.etcd import EtcdDiscovery

        return EtcdDiscovery(cfg.etcd_endpoints, ttl=cfg.lease_ttl)
    from kvrelay.runtime.discovery.mem import MemDiscovery, MemStore

    return MemDiscovery(mem_store if mem_store is not None else MemStore())

"""Event plane: KV events and load metrics. Backends: inproc, zmq (embedded default), nats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvrelay.runtime.config import setting
from kvrelay.runtime.events.base import EventPlane, Message, Subscription
from kvrelay.runtime.events.subjects import check_pattern, check_subject, matches

__all__ = [
    "EventPlane", "EventsConfig", "Message", "Subscription", "check_pattern", "check_subject",
    "make_event_plane", "matches",
]


@dataclass(frozen=True)
class EventsConfig:
    group_title = "event plane"
    events: Literal["zmq", "nats", "inproc"] = setting("zmq", "event plane backend")
    zmq_pub_endpoint: str = setting(
        "", "ZMQ endpoint publishers connect to (the broker's XSUB side; default: ipc in the run dir)")
    zmq_sub_endpoint: str = setting(
        "", "ZMQ endpoint subscribers connect to (the broker's XPUB side; default: ipc in the run dir)")
    nats_url: str = setting("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")


def make_event_plane(cfg: EventsConfig, inproc_broker=None) -> EventPlane:
    if cfg.events == "zmq":
        from kvrelay.runtime.events.zmq_plane import ZmqEventPlane, default_endpoints

        pub, sub = default_endpoints()
        return ZmqEventPlane(cfg.zmq_pub_endpoint or pub, cfg.zmq_sub_endpoint or sub)
    if cfg.events == "nats":
        from kvrelay.runtime.events.nats_plane import NatsEventPlane

        return NatsEventPlane([u.strip() for u in cfg.nats_url.split(",") if u.strip()])
    from kvrelay.runtime.events.inproc import InprocBroker, InprocEventPlane

    return InprocEventPlane(inproc_broker if inproc_broker is not None else InprocBroker())

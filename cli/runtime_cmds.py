"""Operator views of the runtime planes: `kvrelay discovery list|watch`, `kvrelay events tail`."""

from __future__ import annotations

import argparse
import contextlib
import sys

import msgspec

from kvrelay.runtime import aio
from kvrelay.runtime.config import add_arguments, build
from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery, watch_instances
from kvrelay.runtime.events import EventsConfig, make_event_plane
from kvrelay.runtime.log import setup_logging


def register(sub: argparse._SubParsersAction) -> None:
    disc = sub.add_parser("discovery", help="list or watch registered instances")
    disc.add_argument("action", choices=["list", "watch"])
    disc.add_argument("--namespace", default="default", help="deployment namespace")
    disc.add_argument("--component", default=None, help="only this component (e.g. backend)")
    add_arguments(disc, DiscoveryConfig)
    disc.set_defaults(func=_discovery)

    ev = sub.add_parser("events", help="print events published on the event plane")
    ev.add_argument("action", choices=["tail"])
    ev.add_argument("pattern", nargs="?", default="kvrelay.>", help="subject pattern (* and > wildcards)")
    add_arguments(ev, EventsConfig)
    ev.set_defaults(func=_events)


def _row(inst) -> str:
    return f"{inst.component:<12} {inst.instance_id:<24} {inst.role:<8} {inst.address:<22} {inst.model}"


def _discovery(args: argparse.Namespace) -> int:
    cfg = build(DiscoveryConfig, args)
    setup_logging("WARNING")

    async def run() -> None:
        disc = make_discovery(cfg)
        await disc.start()
        try:
            if args.action == "list":
                for inst in await list_instances(disc, args.namespace, args.component):
                    print(_row(inst))
                return
            async for ev in watch_instances(disc, args.namespace, args.component):
                print(f"+ {_row(ev.instance)}" if ev.instance else f"- {ev.key}", flush=True)
        finally:
            await disc.close()

    with contextlib.suppress(KeyboardInterrupt):
        aio.run(run())
    return 0


def _events(args: argparse.Namespace) -> int:
    cfg = build(EventsConfig, args)
    setup_logging("WARNING")

    async def run() -> None:
        plane = make_event_plane(cfg)
        await plane.start()
        sub = await plane.subscribe(args.pattern)
        try:
            async for msg in sub:
                try:
                    body = msgspec.json.encode(msgspec.msgpack.decode(msg.data)).decode()
                except msgspec.DecodeError:
                    body = msg.data.hex()
                print(f"{msg.subject} {body}", flush=True)
        finally:
            await plane.close()

    try:
        aio.run(run())
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError) as e:
        sys.stderr.write(f"kvrelay events: error: {e}\n")
        return 1
    return 0

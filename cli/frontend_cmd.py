"""`kvrelay frontend`: the OpenAI frontend alone, in front of workers found in discovery.

The distributed shapes (deploy/compose, deploy/helm) run it beside `kvrelay worker` processes on
etcd + NATS. SIGTERM/SIGINT: the HTTP server stops taking connections, finishes what it has (uvicorn's
graceful shutdown), then the frontend leaves discovery and the event plane.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from kvrelay.frontend.config import FrontendConfig
from kvrelay.runtime import aio
from kvrelay.runtime.config import ConfigError, add_arguments, build
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.events import EventsConfig, make_event_plane
from kvrelay.runtime.log import setup_logging

log = logging.getLogger("kvrelay.frontend")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frontend", help="run the OpenAI frontend alone (workers come from discovery)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env KVRELAY_LOG_LEVEL)")
    add_arguments(p, FrontendConfig, DiscoveryConfig, EventsConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    fe, disc, ev = build(FrontendConfig, args), build(DiscoveryConfig, args), build(EventsConfig, args)
    setup_logging(args.log_level)
    if disc.discovery == "mem" or ev.events == "inproc":
        raise ConfigError("--discovery mem / --events inproc cannot reach worker processes; use etcd/file and nats/zmq")
    try:
        return aio.run(_serve(fe, disc, ev))
    except KeyboardInterrupt:
        return 130


async def _serve(fe: FrontendConfig, disc: DiscoveryConfig, ev: EventsConfig) -> int:
    from kvrelay.frontend.app import FrontendServer

    server = FrontendServer(fe, make_discovery(disc), make_event_plane(ev))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except (RuntimeError, OSError) as e:
        log.error("%s", e)
        await server.close()
        return 1
    log.info("kvrelay frontend on http://%s:%d (discovery %s, events %s)", fe.http_host, server.port,
             disc.discovery, ev.events)
    await stop.wait()
    log.info("stopping")
    await server.close()
    return 0

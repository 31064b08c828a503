"""`kvrelay frontend`: the OpenAI frontend alone (the distributed shape: workers run elsewhere and are
found through discovery). SIGTERM drains as `kvrelay serve` does: /ready 503, new requests refused,
streams in flight get `--drain-timeout` seconds, the rest end with an SSE error event and `[DONE]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kvrelay.frontend.config import FrontendConfig
from kvrelay.runtime import aio
from kvrelay.runtime.auth import InternalAuthConfig
from kvrelay.runtime.config import ConfigError, add_arguments, build
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.events import EventsConfig, make_event_plane
from kvrelay.runtime.log import setup_logging

log = logging.getLogger("kvrelay.frontend")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frontend", help="run the OpenAI frontend only (workers are found through discovery)")
    add_arguments(p, FrontendConfig, DiscoveryConfig, EventsConfig, InternalAuthConfig)
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env KVRELAY_LOG_LEVEL)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    fe, disc, ev = build(FrontendConfig, args), build(DiscoveryConfig, args), build(EventsConfig, args)
    token = build(InternalAuthConfig, args).token()
    if disc.discovery == "mem":
        raise ConfigError("--discovery mem: a frontend process alone never sees a worker; use file or etcd")
    setup_logging(args.log_level)
    if ev.events == "inproc":  # it still routes (round-robin, least-loaded, kv by in-flight load only)
        log.warning("--events inproc: this frontend hears no worker's KV events; the kv router runs "
                    "without its index (use zmq or nats for KV-aware routing)")
    from kvrelay.runtime.events.zmq_plane import ZmqBrokerUnreachable

    try:
        aio.run(_serve(fe, disc, ev, token))
    except KeyboardInterrupt:
        return 130
    except ZmqBrokerUnreachable as e:  # the embedded shape's broker belongs to `kvrelay serve`
        sys.stderr.write(f"kvrelay frontend: error: --events zmq: {e}\n")
        return 1
    return 0


async def _serve(fe: FrontendConfig, disc: DiscoveryConfig, ev: EventsConfig, token: str) -> None:
    from kvrelay.frontend.app import FrontendServer

    server = FrontendServer(fe, make_discovery(disc), make_event_plane(ev), internal_token=token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal ends the drain at once
        loop.add_signal_handler(sig, server.on_stop_signal, stop)
    await server.start()
    log.info("kvrelay frontend on http://%s:%d", fe.http_host, server.port)
    try:
        await stop.wait()
        await server.drain(fe.drain_timeout)
    finally:
        await server.close()

"""`kvrelay frontend`: the OpenAI frontend alone (the distributed shape: workers run elsewhere and are
found through discovery). SIGTERM drains as `kvrelay serve` does: /ready 503, new requests refused,
streams in flight get `--drain-timeout` seconds, the rest end with an SSE error event and `[DONE]`.
`--http-workers N` serves the port from N processes (cli/http_workers.py); SIGTERM drains them all."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from kvrelay.cli import http_workers, preflight, vllm_spellings
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
    http_workers.add_flags(p)
    vllm_spellings.add_http_aliases(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    fe, disc, ev = build(FrontendConfig, args).with_key_file(), build(DiscoveryConfig, args), build(EventsConfig, args)
    token = build(InternalAuthConfig, args).token()
    n = http_workers.count(args, ev.events)
    if disc.discovery == "mem":
        raise ConfigError("--discovery mem: a frontend process alone never sees a worker; use file or etcd")
    setup_logging(args.log_level)
    preflight.check_planes(disc, ev)
    # A busy port fails now, in one line; a child of an owner serves the owner's inherited socket.
    sock = http_workers.inherited(args.http_fd) if args.http_fd is not None else (
        http_workers.listen(fe.http_host, fe.http_port))
    if ev.events == "inproc":  # it still routes (round-robin, least-loaded, kv by in-flight load only)
        log.warning("--events inproc: this frontend hears no worker's KV events; the kv router runs "
                    "without its index (use zmq or nats for KV-aware routing)")
    from kvrelay.runtime.events.zmq_plane import ZmqBrokerUnreachable

    try:
        aio.run(_serve(fe, disc, ev, token, args, n, sock))
    except KeyboardInterrupt:
        return 130
    except ZmqBrokerUnreachable as e:  # the embedded shape's broker belongs to `kvrelay serve`
        sys.stderr.write(f"kvrelay frontend: error: --events zmq: {e}\n")
        return 1
    return 0


async def _serve(fe: FrontendConfig, disc: DiscoveryConfig, ev: EventsConfig, token: str,
                 args: argparse.Namespace, n: int, sock) -> None:
    from kvrelay.frontend.app import FrontendServer

    child = args.http_fd is not None
    group = http_workers.group_id(args, n)
    server = FrontendServer(fe, make_discovery(disc), make_event_plane(ev), internal_token=token, http_group=group)
    extra = None
    if n > 1:
        assert sock is not None  # inherited, or listening: n > 1
        extra = http_workers.HttpWorkers(n, sock, group, token, (fe, disc, ev), args.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal ends the drain at once
        loop.add_signal_handler(sig, http_workers.on_signal, server, extra, stop)
    try:
        await server.start(sock, accept_when_ready=child)
        if extra is not None:
            await extra.start()
        if child:
            print(f"READY http-{os.getpid()}", flush=True)  # noqa: T201 - the owning process waits for this line
        if child:  # one of the owner's group: its size is the group's, not this process's own count (1)
            log.info("HTTP process %d serving http://%s:%d (one of %d)", os.getpid(), fe.http_host, server.port,
                     group[1])
        else:
            log.info("kvrelay frontend on http://%s:%d (%d HTTP process%s)", fe.http_host, server.port, n,
                     "es" if n > 1 else "")
            await server.pipeline.announce_models()  # models already served: their tool-call format
        await stop.wait()
        await asyncio.gather(server.drain(fe.drain_timeout),
                             *([extra.stop(fe.drain_timeout)] if extra is not None else []))
    finally:
        if extra is not None:
            await extra.stop(0)
        await server.close()

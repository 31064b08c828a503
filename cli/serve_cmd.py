"""`kvrelay serve`: the embedded default — a frontend and N workers on one machine, one command.

With no arguments: SmolLM2-135M-Instruct (the packaged GGUF, converted once into the user cache),
2 native workers, file discovery and ZMQ events under a
private run directory, HTTP on 127.0.0.1:8000. `--prefill-workers N --decode-workers M` runs the
disaggregated shape instead (docs/ARCHITECTURE.md "Disaggregation"). `--discovery etcd --events nats` runs the same pieces
on real servers. SIGTERM (or Ctrl-C) drains: /ready turns 503 and new requests are refused, streams in
flight get `--drain-timeout` seconds (default 30) to finish and the rest end with an SSE error event and
`[DONE]`; then every worker stops; none is left running. A second signal ends the drain at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, replace
from typing import Any

from kvrelay.cli import http_workers, preflight, vllm_spellings
from kvrelay.cli.serve_disk import disk_statement
from kvrelay.cli.serve_planner import start_planner
from kvrelay.cli.serve_workers import WorkerPlans
from kvrelay.frontend.config import FrontendConfig
from kvrelay.planner.config import PlannerConfig
from kvrelay.runtime import aio
from kvrelay.runtime.auth import InternalAuthConfig, new_token
from kvrelay.runtime.config import ConfigError, add_arguments, build, flag_name
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.events import EventsConfig, make_event_plane
from kvrelay.runtime.fleet import Fleet
from kvrelay.runtime.log import setup_logging
from kvrelay.runtime.paths import default_run_dir
from kvrelay.workers.api.endpoints import Role
from kvrelay.workers.config import SERVE_GROUPS, WorkerConfig

log = logging.getLogger("kvrelay.serve")



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve OpenAI requests: a frontend and N workers on this machine")
    p.add_argument("--workers", type=int, default=None, help="number of workers (env KVRELAY_WORKERS; default 2)")
    p.add_argument("--prefill-workers", type=int, default=None,
                   help="disaggregated: number of prefill workers (env KVRELAY_PREFILL_WORKERS)")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="disaggregated: number of decode workers (env KVRELAY_DECODE_WORKERS)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env KVRELAY_LOG_LEVEL)")
    p.add_argument("--planner", choices=("off", "load", "sla"), default="off",
                   help="rescale the worker pools with this policy (planner/README.md)")
    add_arguments(p, FrontendConfig, DiscoveryConfig, EventsConfig, InternalAuthConfig, PlannerConfig,
                  *SERVE_GROUPS)
    http_workers.add_flags(p)
    vllm_spellings.add_http_aliases(p)
    vllm_spellings.add_model_positional(p)
    p.set_defaults(func=_run)


def _count(args: argparse.Namespace, name: str, default: str | None, minimum: int) -> int | None:
    raw = getattr(args, name)
    if raw is None:
        raw = os.environ.get(f"KVRELAY_{name.upper()}", default)
    if raw is None:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"{flag_name(name)}: expected int, got {raw!r}") from None
    if n < minimum:
        raise ConfigError(f"{flag_name(name)}: must be >= {minimum}, got {n}")
    return n


def _counts(args: argparse.Namespace) -> dict[Role, int]:
    """How many workers of each role to start: `--workers N` aggregated, or prefill + decode workers."""
    prefill = _count(args, "prefill_workers", None, 0)
    decode = _count(args, "decode_workers", None, 1)
    if prefill is None and decode is None:
        return {Role.AGG: _count(args, "workers", "2", 1) or 2}
    if args.workers is not None:
        raise ConfigError("--workers: give either --workers or --prefill-workers/--decode-workers, not both")
    if decode is None:
        raise ConfigError("--decode-workers: required with --prefill-workers (at least 1)")
    return {Role.PREFILL: prefill or 0, Role.DECODE: decode}


def _run(args: argparse.Namespace) -> int:
    vllm_spellings.apply_model_positional(args)
    counts = _counts(args)
    fe, disc, ev = build(FrontendConfig, args).with_key_file(), build(DiscoveryConfig, args), build(EventsConfig, args)
    if Role.PREFILL in counts:  # the operator asked for the disaggregated shape: ready means all of it is up
        fe = replace(fe, require_prefill=True)
    wk = build(WorkerConfig, args)
    n_http = http_workers.count(args, ev.events, local_workers=sum(counts.values()))
    setup_logging(args.log_level)
    preflight.check_planes(disc, ev)  # each of these fails in one line, before any heavy work
    if wk.engine != "mocker":
        preflight.check_device(wk.device)
    sock = http_workers.listen(fe.http_host, fe.http_port)
    wk = _resolve_model(wk)
    log.info("%s", disk_statement(wk, sum(counts.values())))  # before the workers start: what they may take, and where
    planner = None
    if args.planner != "off":
        from kvrelay.planner.service import make_policy

        planner_cfg = build(PlannerConfig, args, planner_policy=args.planner)
        planner = (planner_cfg, make_policy(planner_cfg))
    try:
        return aio.run(_serve(counts, fe, disc, ev, wk, build(InternalAuthConfig, args).token(), planner,
                              (n_http, sock, args.log_level)))
    except KeyboardInterrupt:
        return 130


def _resolve_model(wk: WorkerConfig) -> WorkerConfig:
    """Convert (GGUF) or build (tiny) the model once, here, so the workers start from the cached
    directory instead of racing to convert it; they get its path and served name."""
    from kvrelay.workers.models.gguf_file import GgufError
    from kvrelay.workers.models.registry import ModelNotFound, resolve_model

    try:
        model = resolve_model(wk.model)
    except (ModelNotFound, GgufError) as e:
        raise ConfigError(f"--model: {e}") from None
    log.info("model %s: %s", model.source, model.path)
    return replace(wk, model=str(model.path), served_model_name=wk.served_model_name or model.served_name)


@dataclass
class _Planes:
    """What the embedded shape runs besides the workers: a private run directory, file discovery under
    it (unless given), and the ZMQ event broker (unless the events are elsewhere)."""

    run_dir: str
    disc: DiscoveryConfig
    ev: EventsConfig
    broker: Any = None

    @classmethod
    def open(cls, disc: DiscoveryConfig, ev: EventsConfig) -> _Planes:
        if ev.events == "inproc":
            raise ConfigError("--events inproc cannot reach worker processes; use zmq or nats")
        if disc.discovery == "mem":
            raise ConfigError("--discovery mem cannot reach worker processes; use file or etcd")
        planes = cls(tempfile.mkdtemp(prefix=f"serve-{os.getpid()}-", dir=_ensure(default_run_dir())), disc, ev)
        if disc.discovery == "file" and not disc.discovery_dir:
            planes.disc = replace(disc, discovery_dir=os.path.join(planes.run_dir, "discovery"))
        if ev.events == "zmq":
            from kvrelay.runtime.events.zmq_plane import ZmqBroker

            sock_dir = _socket_dir(planes.run_dir)
            pub = ev.zmq_pub_endpoint or f"ipc://{sock_dir}/events-pub.sock"
            sub = ev.zmq_sub_endpoint or f"ipc://{sock_dir}/events-sub.sock"
            planes.broker = ZmqBroker(pub, sub)
            planes.broker.start()
            planes.ev = replace(ev, zmq_pub_endpoint=pub, zmq_sub_endpoint=sub)
        return planes

    def close(self) -> None:
        if self.broker is not None:
            self.broker.close()
        _remove_run_dir(self.run_dir)


async def _serve(counts: dict[Role, int], fe: FrontendConfig, disc: DiscoveryConfig, ev: EventsConfig,
                 wk: WorkerConfig, token: str, planner: tuple[PlannerConfig, Any] | None = None,
                 http: tuple = (1, None, None)) -> int:
    """`http`: (HTTP processes, their shared listening socket, their log level). One fleet owns the
    workers (runtime/fleet.py); the planner, when on, scales that fleet."""
    from kvrelay.frontend.app import FrontendServer

    planes = _Planes.open(disc, ev)
    if not token:  # embedded shape: a fresh secret per run; workers get it in their environment, not argv
        token = new_token()
        log.info("internal token: generated for this run (worker RPC and KV transfer ports require it)")
    plans = WorkerPlans(wk, planes.disc, planes.ev, fe, token, sum(counts.values()))
    fleet: Fleet[Role] = Fleet(plans, ready_timeout=plans.ready_timeout)
    n_http, sock, log_level = http
    group = http_workers.group_id(argparse.Namespace(), n_http)
    server = FrontendServer(fe, make_discovery(planes.disc), make_event_plane(planes.ev), internal_token=token,
                            http_group=group)
    extra = http_workers.HttpWorkers(n_http, sock, group, token, (fe, planes.disc, planes.ev), log_level) \
        if n_http > 1 else None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, http_workers.on_signal, server, extra, stop)
    planning: asyncio.Task[None] | None = None
    try:
        starting = asyncio.create_task(fleet.start(counts))
        await server.start(sock)
        if await _first(starting, stop):  # every worker serves
            if extra is not None:
                # The other HTTP processes (cli/http_workers.py) start once every worker serves and this
                # process's routers hold them all: each lists discovery at start and accepts only when
                # its routers hold that list too, so no process answers 'no models' for a registered
                # worker another one already routes to.
                await server.service.sync_workers(http_workers.SYNC_WAIT_S)
                await extra.start()
            if planner is not None:
                planning = start_planner(fleet, Role.AGG not in counts, *planner, planes.disc, fe,
                                         f"http://{fe.http_host}:{server.port}", stop)
            await server.pipeline.announce_models()  # the tool-call format each model gets, in the log
            shape = ", ".join(f"{n} {role.value}" for role, n in counts.items() if n)
            log.info("kvrelay serving %s on http://%s:%d with workers: %s; %d HTTP process%s",
                     wk.served_model_name or wk.model, fe.http_host, server.port, shape, n_http,
                     "" if n_http == 1 else "es")
            await stop.wait()
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    finally:
        log.info("stopping")
        if stop.is_set():  # drain the frontend first: the workers then have nothing left in flight
            await asyncio.gather(server.drain(fe.drain_timeout),
                                 *([extra.stop(fe.drain_timeout)] if extra is not None else []))
        if extra is not None:
            await extra.stop(0)
        await server.close()
        if planning is not None:  # it stops at `stop`: no decision lands on a closing fleet
            stop.set()
            await asyncio.gather(planning, return_exceptions=True)
        await fleet.close()
        planes.close()
    return 0


async def _first(starting: asyncio.Task[None], stop: asyncio.Event) -> bool:
    """Waits for the workers' start or a stop signal; True once they all serve (a failed start raises)."""
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done:
        stopped.cancel()
        starting.result()
        return not stop.is_set()
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    return False


# sockaddr_un.sun_path holds 108 bytes on Linux (104 on macOS): a deep cache dir cannot hold sockets.
_MAX_SOCKET_PATH = 100


def _socket_dir(run_dir: str) -> str:
    """`run_dir` itself, or, when socket paths under it would be too long, a short private dir in the
    temp dir, recorded as the symlink `run_dir/sockets` so that it is removed with the run dir."""
    if len(os.path.join(run_dir, "events-sub.sock")) <= _MAX_SOCKET_PATH:
        return run_dir
    short = tempfile.mkdtemp(prefix="kvrelay-")
    os.symlink(short, os.path.join(run_dir, "sockets"))  # found (and removed) with the run dir
    return short


def _remove_run_dir(run_dir: str) -> None:
    sockets = os.path.join(run_dir, "sockets")
    if os.path.islink(sockets):
        shutil.rmtree(os.readlink(sockets), ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)


def _ensure(path) -> str:
    os.makedirs(path, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    return str(path)

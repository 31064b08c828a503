"""`kvrelay serve`: the embedded default — a frontend and N workers on one machine, one command.

With no arguments: the built-in tiny model, 2 native workers, file discovery and ZMQ events under a
private run directory, HTTP on 127.0.0.1:8000. `--discovery etcd --events nats` runs the same pieces
on real servers. Ctrl-C (or SIGTERM) stops the frontend, then every worker; none is left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import replace

from kvrelay.cli.supervisor import Child, Supervisor, child_env
from kvrelay.frontend.config import FrontendConfig
from kvrelay.runtime import aio
from kvrelay.runtime.config import ConfigError, add_arguments, build, flag_name
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.events import EventsConfig, make_event_plane
from kvrelay.runtime.log import setup_logging
from kvrelay.runtime.paths import default_run_dir
from kvrelay.workers.config import WorkerConfig

log = logging.getLogger("kvrelay.serve")

# Worker settings `serve` passes through; the rest (host, port, role, ...) it decides itself.
_WORKER_PASSTHROUGH = ("engine", "model", "served_model_name", "dtype", "device", "block_size", "kv_cache_bytes",
                       "max_num_batched_tokens", "max_num_seqs", "max_waiting", "max_model_len",
                       "mocker_speedup", "mocker_num_blocks", "mocker_prefill_us_per_token",
                       "mocker_prefill_us_per_token_pair", "mocker_decode_base_ms", "mocker_decode_us_per_seq",
                       "mocker_decode_us_per_kv_block", "mocker_transfer_gbps", "mocker_eos_probability",
                       "mocker_seed")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve OpenAI requests: a frontend and N workers on this machine")
    p.add_argument("--workers", type=int, default=None, help="number of workers (env KVRELAY_WORKERS; default 2)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env KVRELAY_LOG_LEVEL)")
    add_arguments(p, FrontendConfig, DiscoveryConfig, EventsConfig)
    worker_group = argparse.ArgumentParser(add_help=False)
    add_arguments(worker_group, WorkerConfig)
    for action in worker_group._actions:
        if action.dest in _WORKER_PASSTHROUGH:
            p._add_action(action)
    p.set_defaults(func=_run)


def _workers(args: argparse.Namespace) -> int:
    raw = args.workers if args.workers is not None else os.environ.get("KVRELAY_WORKERS", "2")
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"--workers: expected int, got {raw!r}") from None
    if n < 1:
        raise ConfigError(f"--workers: must be >= 1, got {n}")
    return n


def _run(args: argparse.Namespace) -> int:
    n = _workers(args)
    fe, disc, ev = build(FrontendConfig, args), build(DiscoveryConfig, args), build(EventsConfig, args)
    wk = build(WorkerConfig, args)
    setup_logging(args.log_level)
    if not wk.model:
        from kvrelay.workers.models.tiny import ensure_tiny_model

        wk = replace(wk, model=str(ensure_tiny_model()), served_model_name=wk.served_model_name or "kvrelay-tiny")
    elif not os.path.isdir(wk.model):
        raise ConfigError(f"--model: {wk.model} is not a model directory")
    try:
        return aio.run(_serve(n, fe, disc, ev, wk))
    except KeyboardInterrupt:
        return 130


def _worker_argv(wk: WorkerConfig, disc: DiscoveryConfig, ev: EventsConfig, fe: FrontendConfig) -> list[str]:
    argv = [sys.executable, "-m", "kvrelay.cli.main", "worker", "--namespace", fe.namespace]
    for name in _WORKER_PASSTHROUGH:
        value = getattr(wk, name)
        if value not in ("", None):
            argv += [flag_name(name), str(value)]
    for cfg in (disc, ev):
        for name, value in vars(cfg).items():
            argv += [flag_name(name), str(value)]
    return argv


async def _serve(n: int, fe: FrontendConfig, disc: DiscoveryConfig, ev: EventsConfig, wk: WorkerConfig) -> int:
    from kvrelay.frontend.app import FrontendServer

    run_dir = tempfile.mkdtemp(prefix=f"serve-{os.getpid()}-", dir=_ensure(default_run_dir()))
    broker = None
    if disc.discovery == "file" and not disc.discovery_dir:
        disc = replace(disc, discovery_dir=os.path.join(run_dir, "discovery"))
    if ev.events == "zmq":
        from kvrelay.runtime.events.zmq_plane import ZmqBroker

        pub = ev.zmq_pub_endpoint or f"ipc://{run_dir}/events-pub.sock"
        sub = ev.zmq_sub_endpoint or f"ipc://{run_dir}/events-sub.sock"
        broker = ZmqBroker(pub, sub)
        broker.start()
        ev = replace(ev, zmq_pub_endpoint=pub, zmq_sub_endpoint=sub)
    elif ev.events == "inproc":
        raise ConfigError("--events inproc cannot reach worker processes; use zmq or nats")
    if disc.discovery == "mem":
        raise ConfigError("--discovery mem cannot reach worker processes; use file or etcd")
    threads = max(1, (os.cpu_count() or 1) // n)
    supervisor = Supervisor()
    server = FrontendServer(fe, make_discovery(disc), make_event_plane(ev))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        children = [Child(f"worker-{i}", _worker_argv(wk, disc, ev, fe), child_env(threads)) for i in range(n)]
        starting = asyncio.create_task(supervisor.start(children))
        await server.start()
        done, _ = await asyncio.wait({starting, asyncio.create_task(stop.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            log.info("kvrelay serving %s on http://%s:%d with %d workers", wk.served_model_name or wk.model,
                     fe.http_host, server.port, n)
            await stop.wait()
        else:
            starting.cancel()
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    finally:
        log.info("stopping")
        await server.close()
        await supervisor.stop()
        if broker is not None:
            broker.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _ensure(path) -> str:
    os.makedirs(path, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    return str(path)

"""`kvrelay worker`: one engine worker process (see workers/worker.py)."""

from __future__ import annotations

import argparse
import sys

from kvrelay.cli import preflight
from kvrelay.runtime import aio
from kvrelay.runtime.auth import InternalAuthConfig
from kvrelay.runtime.config import ConfigError, add_arguments, build
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.events import EventsConfig, make_event_plane
from kvrelay.runtime.log import setup_logging
from kvrelay.workers.config import WorkerConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one engine worker (registers itself in discovery)")
    add_arguments(p, WorkerConfig, DiscoveryConfig, EventsConfig, InternalAuthConfig)
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env KVRELAY_LOG_LEVEL)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = build(WorkerConfig, args)
    disc_cfg, ev_cfg = build(DiscoveryConfig, args), build(EventsConfig, args)
    token = build(InternalAuthConfig, args).token()
    setup_logging(args.log_level)
    preflight.check_planes(disc_cfg, ev_cfg)  # before the model loads: seconds, one line each
    preflight.check_port_free(cfg.host, cfg.port, "--port")
    if cfg.metrics_port > 0:
        preflight.check_port_free(cfg.host, cfg.metrics_port, "--metrics-port")
    if cfg.engine != "mocker":
        preflight.check_device(cfg.device)
    from kvrelay.workers.models.gguf_file import GgufError
    from kvrelay.workers.models.registry import ModelNotFound
    from kvrelay.workers.worker import Worker, run_worker

    model_errors: tuple[type[Exception], ...] = (FileNotFoundError, ModelNotFound, GgufError)
    if cfg.engine == "native":  # native.config imports torch; other engines must not pay for it
        from kvrelay.workers.engines.native.config import UnsupportedModel

        model_errors += (UnsupportedModel,)
    try:
        worker = Worker(cfg, make_discovery(disc_cfg), make_event_plane(ev_cfg), internal_token=token)
    except model_errors as e:
        raise ConfigError(f"--model: {e}") from None
    start_errors: tuple[type[Exception], ...] = ()
    if cfg.engine == "vllm":
        from kvrelay.workers.engines.vllm.start_errors import EngineStartError

        start_errors = (EngineStartError,)
    try:
        aio.run(run_worker(worker))
    except model_errors as e:
        sys.stderr.write(f"kvrelay worker: error: --model: {e}\n")
        return 2
    except start_errors as e:  # the engine's own reason, one line; `kvrelay serve` reads FAILED
        print(f"FAILED {e}", flush=True)  # noqa: T201 - its owner (runtime/fleet.py) reads this line
        sys.stderr.write(f"kvrelay worker: error: {e}\n")
        return 1
    return 0

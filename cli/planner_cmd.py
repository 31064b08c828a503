"""`kvrelay planner run|profile|status|set|simulate` (planner/README.md).

`run` plans for a distributed deployment (kubernetes or virtual connector; the local connector is
`kvrelay serve --planner`). `status`/`set` talk to a running planner's control endpoint. `simulate` and
`profile` price steps with the mocker's timing model (its `--mocker-*` flags).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

from kvrelay.planner.config import PlannerConfig
from kvrelay.planner.connectors.base import Connector
from kvrelay.runtime import aio
from kvrelay.runtime.config import ConfigError, add_arguments, build
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.log import setup_logging
from kvrelay.workers.config import WorkerConfig

_TIMING_FLAGS = ("block_size", "max_num_seqs", "mocker_prefill_us_per_token", "mocker_prefill_us_per_token_pair",
                 "mocker_decode_base_ms", "mocker_decode_us_per_seq", "mocker_decode_us_per_kv_block")
_SET_FIELDS = ("ttft_target", "itl_target", "min_prefill", "max_prefill", "min_decode", "max_decode", "budget")


def _timing_flags(p: argparse.ArgumentParser) -> None:
    group = argparse.ArgumentParser(add_help=False)
    add_arguments(group, WorkerConfig)
    for action in group._actions:
        if action.dest in _TIMING_FLAGS:
            p._add_action(action)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("planner", help="scale the prefill and decode pools (run, profile, status, set, simulate)")
    cmds = p.add_subparsers(dest="planner_command", metavar="SUBCOMMAND", parser_class=type(p))
    run = cmds.add_parser("run", help="run the planner against a deployment")
    add_arguments(run, PlannerConfig, DiscoveryConfig)
    run.add_argument("--namespace", default="default", help="deployment namespace")
    run.add_argument("--log-level", default=None)
    run.set_defaults(func=_run)
    status = cmds.add_parser("status", help="current and desired counts and the last decisions of a planner")
    status.add_argument("--url", required=True, help="the planner's control URL (printed as PLANNER ...)")
    _key_flag(status)
    status.set_defaults(func=_status)
    setp = cmds.add_parser("set", help="change targets or bounds of a running planner")
    setp.add_argument("--url", required=True)
    _key_flag(setp)
    for name in _SET_FIELDS:
        setp.add_argument("--" + name.replace("_", "-"), dest=name, type=float if "target" in name else int)
    setp.set_defaults(func=_set)
    sim = cmds.add_parser("simulate", help="replay a trace through the mocker timing model, planner in the loop")
    sim.add_argument("--trace", required=True, help="Mooncake JSONL trace")
    sim.add_argument("--static", default="", help="PxD: a static deployment instead of the planner (e.g. 1x3)")
    sim.add_argument("--startup-s", type=float, default=30.0, help="seconds a new worker takes to serve")
    add_arguments(sim, PlannerConfig)
    _timing_flags(sim)
    sim.set_defaults(func=_simulate)
    tr = cmds.add_parser("trace", help="write a bursty Mooncake JSONL trace (base rate with periodic bursts)")
    tr.add_argument("--out", required=True)
    for name, default in (("duration_s", 240.0), ("base_rate", 2.0), ("burst_rate", 8.0), ("burst_every_s", 60.0),
                          ("burst_len_s", 20.0), ("isl", 1024), ("osl", 128), ("seed", 0)):
        tr.add_argument("--" + name.replace("_", "-"), dest=name, type=type(default), default=default)
    tr.set_defaults(func=_trace)
    prof = cmds.add_parser("profile", help="write the curves the sla policy reads")
    prof.add_argument("--out", required=True, help="profile file to write (JSON)")
    prof.add_argument("--url", default="", help="measure this running deployment (one worker per pool) instead "
                      "of deriving the curves from the mocker timing model")
    prof.add_argument("--model", default="", help="with --url: the model name (default: the first served)")
    _timing_flags(prof)
    prof.set_defaults(func=_profile)
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])


def _key_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--planner-api-key", default=os.environ.get("KVRELAY_PLANNER_API_KEY", ""),
                   help="the planner's API key (default: env KVRELAY_PLANNER_API_KEY; argv is visible to other users)")


def _timing(args: argparse.Namespace):
    from kvrelay.workers.engines.mocker.timing import TimingModel

    wk = build(WorkerConfig, args)
    return TimingModel(wk.mocker_config(model_dir="")), wk


def _trace(args: argparse.Namespace) -> int:
    from kvrelay.planner.trace import bursty_trace, write_trace

    for name in ("duration_s", "base_rate", "burst_rate", "burst_every_s", "isl", "osl"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be > 0")
    if not 0 <= args.burst_len_s <= args.burst_every_s:
        raise ConfigError("--burst-len-s: must be in [0, --burst-every-s]")
    records = bursty_trace(args.duration_s, args.base_rate, args.burst_rate, args.burst_every_s, args.burst_len_s,
                           args.isl, args.osl, args.seed)
    write_trace(records, args.out)
    print(f"wrote {len(records)} requests to {args.out}")  # noqa: T201
    return 0


def _profile(args: argparse.Namespace) -> int:
    from kvrelay.planner.profile import profile_from_cost, save_profile

    if args.url:
        from kvrelay.planner.profiler import measure_profile

        try:
            model = args.model or httpx.get(f"{args.url.rstrip('/')}/v1/models", timeout=10).json()["data"][0]["id"]
            profile = aio.run(measure_profile(args.url, model))
        except (httpx.HTTPError, RuntimeError, KeyError, IndexError) as e:
            sys.stderr.write(f"kvrelay planner profile: error: {args.url}: {e}\n")
            return 1
    else:
        cost, wk = _timing(args)
        profile = profile_from_cost(cost, wk.block_size, wk.max_num_seqs)
    save_profile(profile, args.out)
    print(f"wrote {args.out}")  # noqa: T201
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from kvrelay.planner.observation import Pool
    from kvrelay.planner.profile import profile_from_cost, save_profile
    from kvrelay.planner.service import make_policy
    from kvrelay.planner.simulate import SimConfig, Simulation
    from kvrelay.planner.trace import read_trace

    cfg = build(PlannerConfig, args)
    cost, wk = _timing(args)
    try:
        trace = read_trace(args.trace)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--trace: {e}") from None
    if not trace:
        raise ConfigError(f"--trace: {args.trace} has no requests")
    if args.startup_s < 0:
        raise ConfigError("--startup-s: must be >= 0")
    policy = None
    if args.static:
        try:
            p, d = (int(x) for x in args.static.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--static: expected PxD such as 1x3, got {args.static!r}") from None
        initial = {Pool.PREFILL: p, Pool.DECODE: d}
    else:
        if cfg.planner_policy == "sla" and not cfg.profile:  # the timing model's own curves
            import tempfile

            path = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
            save_profile(profile_from_cost(cost, wk.block_size, wk.max_num_seqs), path)
            cfg = build(PlannerConfig, args, profile=path)
        policy = make_policy(cfg)
        initial = {Pool.PREFILL: cfg.min_prefill, Pool.DECODE: max(1, cfg.min_decode)}
    sim_cfg = SimConfig(targets=cfg.targets(), startup_s=args.startup_s,
                        interval_s=cfg.planner_interval, block_size=wk.block_size, max_num_seqs=wk.max_num_seqs,
                        scale_timeout_s=cfg.scale_timeout)
    result = aio.run(Simulation(trace, cost, sim_cfg, initial).run(policy))
    label = f"static {args.static}" if args.static else f"planner {cfg.planner_policy}"
    print(f"{label}: {result.line()}")  # noqa: T201
    return 0


def _run(args: argparse.Namespace) -> int:
    from kvrelay.planner.service import make_policy, serve_planner

    cfg, disc = build(PlannerConfig, args), build(DiscoveryConfig, args)
    setup_logging(args.log_level)
    policy = make_policy(cfg)
    discovery = make_discovery(disc)
    connector: Connector
    if cfg.connector == "local":
        raise ConfigError("--connector local: runs inside `kvrelay serve --planner`; use kubernetes or virtual")
    if cfg.connector == "kubernetes":
        from kubernetes.config import ConfigException

        from kvrelay.planner.connectors.kubernetes import KubernetesConnector
        from kvrelay.planner.observation import Pool

        try:
            connector = KubernetesConnector(cfg.k8s_namespace, {Pool.PREFILL: cfg.k8s_prefill_deployment,
                                                                Pool.DECODE: cfg.k8s_decode_deployment},
                                            api_url=cfg.k8s_api_url)
        except ConfigException as e:  # neither in a pod (service account) nor a kubeconfig
            raise ConfigError(f"--connector kubernetes: no cluster to talk to ({e}); run it in a pod with "
                              f"a service account, set KUBECONFIG, or give --k8s-api-url") from None
    else:
        from kvrelay.planner.connectors.virtual import VirtualConnector

        connector = VirtualConnector(discovery, args.namespace)

    async def main() -> None:
        import asyncio
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await discovery.start()
        try:
            await serve_planner(cfg, policy, discovery, args.namespace, connector, stop)
        finally:
            await connector.close()
            await discovery.close()

    aio.run(main())
    return 0


def _control(url: str, method: str, key: str, body: dict | None = None) -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.request(method, f"{url.rstrip('/')}/{'set' if body is not None else 'status'}", json=body,
                          headers=headers, timeout=10)
    except httpx.HTTPError as e:
        sys.stderr.write(f"kvrelay planner: error: cannot reach {url}: {e}\n")
        return 1
    if r.status_code != 200:
        msg = r.json().get("error", {}).get("message", r.text) if r.headers.get("content-type", "").startswith(
            "application/json") else r.text
        sys.stderr.write(f"kvrelay planner: error: {msg}\n")
        return 2 if r.status_code == 400 else 1
    print(json.dumps(r.json(), indent=2))  # noqa: T201
    return 0


def _status(args: argparse.Namespace) -> int:
    return _control(args.url, "GET", args.planner_api_key)


def _set(args: argparse.Namespace) -> int:
    changes = {n: getattr(args, n) for n in _SET_FIELDS if getattr(args, n) is not None}
    if not changes:
        raise ConfigError("set: give at least one of " + ", ".join("--" + n.replace("_", "-") for n in _SET_FIELDS))
    return _control(args.url, "POST", args.planner_api_key, changes)

"""Assembling a running planner from its config: policy, observer, loop, control endpoint."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from kvrelay.planner.config import PlannerConfig
from kvrelay.planner.connectors.base import Connector
from kvrelay.planner.decision import Bounds
from kvrelay.planner.loop import Planner
from kvrelay.planner.metrics import PlannerMetrics
from kvrelay.planner.observe import Observer
from kvrelay.planner.policy import Policy, PolicyKind
from kvrelay.planner.policy_load import LoadConfig
from kvrelay.planner.policy_sla import SlaConfig
from kvrelay.planner.predictors import PredictorKind
from kvrelay.planner.profile import ProfileError, load_profile
from kvrelay.runtime.config import ConfigError
from kvrelay.runtime.discovery import Discovery

log = logging.getLogger("kvrelay.planner")


def make_bounds(cfg: PlannerConfig) -> Bounds:
    bounds = Bounds(min_prefill=cfg.min_prefill, max_prefill=cfg.max_prefill, min_decode=cfg.min_decode,
                    max_decode=cfg.max_decode, budget=cfg.budget)
    problem = bounds.check()
    if problem:
        raise ConfigError(problem)
    return bounds


def make_policy(cfg: PlannerConfig) -> Policy:
    bounds = make_bounds(cfg)
    kind = PolicyKind(cfg.planner_policy)
    profile = None
    if kind is PolicyKind.SLA:
        if not cfg.profile:
            raise ConfigError("--profile: the sla policy needs a profile file (kvrelay planner profile)")
        try:
            profile = load_profile(cfg.profile)
        except ProfileError as e:
            raise ConfigError(f"--profile: {e}") from None
    targets = cfg.targets()
    return Policy(kind, bounds, load=LoadConfig(targets=targets, cooldown_intervals=cfg.cooldown_intervals),
                  sla=SlaConfig(targets=targets, predictor=PredictorKind(cfg.predictor)),
                  profile=profile)


async def serve_planner(cfg: PlannerConfig, policy: Policy, discovery: Discovery, namespace: str,
                        connector: Connector, stop: asyncio.Event, frontend_urls: list[str] | None = None) -> None:
    """Runs the planner until `stop` is set; the control endpoint (status/set/metrics) alongside."""
    from kvrelay.planner.control import ControlServer

    registry = CollectorRegistry()
    urls = frontend_urls if frontend_urls is not None else [u for u in cfg.frontend_url.split(",") if u]
    observer = Observer(discovery, namespace, urls, cfg.prometheus_url, frontend_api_key=cfg.frontend_api_key)
    planner = Planner(observer, connector, policy, PlannerMetrics(registry), interval=cfg.planner_interval,
                      scale_timeout=cfg.scale_timeout, dry_run=cfg.dry_run)
    control = None
    if cfg.planner_port >= 0:
        control = ControlServer(planner, registry, cfg.planner_host, cfg.planner_port, api_key=cfg.planner_api_key)
        port = await control.start()
        print(f"PLANNER http://{cfg.planner_host}:{port}", flush=True)  # noqa: T201 - for tools and tests
    log.info("planner: policy %s, connector %s, interval %.1fs, bounds %s%s%s", policy.kind.value, connector.kind,
             cfg.planner_interval, policy.bounds, " (dry run)" if cfg.dry_run else "",
             "" if cfg.planner_api_key or control is None else
             "; the control endpoint has NO API key (--planner-api-key): anyone reaching it can scale")
    try:
        await planner.run(stop)
    finally:
        if control is not None:
            await control.close()
        await observer.close()

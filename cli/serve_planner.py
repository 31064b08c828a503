"""`kvrelay serve --planner load|sla`: the planner drives the same fleet that started the workers
(runtime/fleet.py) through the local connector, by role; it runs until `stop`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from kvrelay.frontend.config import FrontendConfig
from kvrelay.planner.config import PlannerConfig
from kvrelay.planner.connectors.local import LocalConnector
from kvrelay.planner.observation import Pool
from kvrelay.planner.policy import Policy
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.fleet import Fleet
from kvrelay.workers.api.endpoints import Role

log = logging.getLogger("kvrelay.serve")


def pool_roles(disaggregated: bool) -> dict[Pool, Role]:
    """The role of the workers each pool is made of."""
    return {Pool.PREFILL: Role.PREFILL, Pool.DECODE: Role.DECODE if disaggregated else Role.AGG}


def start_planner(fleet: Fleet[Role], disaggregated: bool, cfg: PlannerConfig, policy: Policy,
                  disc: DiscoveryConfig, fe: FrontendConfig, frontend_url: str,
                  stop: asyncio.Event) -> asyncio.Task[None]:
    """Runs the planner in the background until `stop`; serve awaits the task at shutdown."""
    from kvrelay.planner.service import serve_planner

    async def run() -> None:
        discovery = make_discovery(disc)
        await discovery.start()
        planner_cfg = dataclasses.replace(cfg, frontend_api_key=cfg.frontend_api_key or fe.api_key,
                                          planner_api_key=cfg.planner_api_key or fe.api_key)
        try:
            await serve_planner(planner_cfg, policy, discovery, fe.namespace,
                                LocalConnector(fleet, pool_roles(disaggregated)), stop,
                                frontend_urls=[frontend_url])
        finally:
            with contextlib.suppress(Exception):
                await discovery.close()

    task = asyncio.create_task(run())

    def log_failure(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("planner stopped: %s", t.exception())

    task.add_done_callback(log_failure)
    return task

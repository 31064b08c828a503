"""`kvrelay serve --planner load|sla`: the embedded shape with the planner's local connector owning the
worker processes (started from the same argv as the supervisor's, stopped by SIGTERM = drain)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from kvrelay.cli.supervisor import Child
from kvrelay.planner.connectors.local import LocalConnector
from kvrelay.planner.observation import Pool
from kvrelay.runtime.discovery import make_discovery

log = logging.getLogger("kvrelay.serve")


async def start_planned_workers(roles: list[str], children: list[Child], planner, disc, fe, server,
                                stop: asyncio.Event, ready_timeout: float = 120.0) -> asyncio.Task:
    """Starts the initial workers through the connector, waits until they serve, then runs the planner
    in the background until `stop`; closing stops every worker."""
    from kvrelay.planner.service import serve_planner

    cfg, policy = planner
    by_role = {c.argv[-1]: c for c in children}
    template = next(iter(by_role.values()))
    base_argv = template.argv[:-2]  # without "--role X"

    def argv(pool: Pool) -> list[str]:
        return [*base_argv, "--role", "prefill" if pool is Pool.PREFILL else
                ("decode" if "prefill" in roles or "decode" in roles else "agg")]

    connector = LocalConnector(argv, env=template.env)
    initial = {Pool.PREFILL: roles.count("prefill"), Pool.DECODE: roles.count("decode") + roles.count("agg")}
    await connector.scale(initial)
    deadline = asyncio.get_running_loop().time() + ready_timeout
    while await connector.ready() != initial:
        if asyncio.get_running_loop().time() > deadline:
            await connector.close()
            raise RuntimeError(f"workers did not become ready within {ready_timeout:.0f} s")
        await asyncio.sleep(0.1)
    discovery = make_discovery(disc)
    await discovery.start()

    async def run() -> None:
        while not server.port:  # noqa: ASYNC110 - the frontend starts concurrently; port is its only signal
            await asyncio.sleep(0.05)
        planner_cfg = dataclasses.replace(cfg, frontend_api_key=cfg.frontend_api_key or fe.api_key,
                                          planner_api_key=cfg.planner_api_key or fe.api_key)
        try:
            await serve_planner(planner_cfg, policy, discovery, fe.namespace, connector, stop,
                                frontend_urls=[f"http://{fe.http_host}:{server.port}"])
        finally:
            await connector.close()
            with contextlib.suppress(Exception):
                await discovery.close()

    task = asyncio.create_task(run())

    def log_failure(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("planner stopped: %s", t.exception())

    task.add_done_callback(log_failure)
    return task  # serve awaits it at shutdown: the workers are stopped when it ends

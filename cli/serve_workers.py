"""How `kvrelay serve` starts a worker: one `ProcessPlan` per (role, ordinal), from the settings the
operator gave. The fleet (runtime/fleet.py) owns the processes; the planner asks it for roles, never
for command lines, so nothing ever reads a role back out of an argv."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

from kvrelay.cli.child_env import child_env
from kvrelay.frontend.config import FrontendConfig
from kvrelay.runtime.auth import TOKEN_ENV
from kvrelay.runtime.config import flag_name
from kvrelay.runtime.discovery import DiscoveryConfig
from kvrelay.runtime.events import EventsConfig
from kvrelay.runtime.fleet import ProcessPlan
from kvrelay.workers.api.endpoints import Role
from kvrelay.workers.config import SERVE_GROUPS, WorkerConfig

METRICS_KEY_ENV = "KVRELAY_METRICS_API_KEY"  # the workers' /metrics key: the deployment's --api-key, never in argv
# Worker settings `serve` passes through (whole groups); the rest (host, port, role, ...) it decides itself.
_WORKER_PASSTHROUGH = tuple(f.name for group in SERVE_GROUPS for f in dataclasses.fields(group))


@dataclass(frozen=True)
class WorkerPlans:
    """`plans(role, ordinal)`: the plan of the `ordinal`-th worker serve starts. `count` is the initial
    number of workers, over which the machine's cores are shared."""

    worker: WorkerConfig
    discovery: DiscoveryConfig
    events: EventsConfig
    frontend: FrontendConfig
    token: str
    count: int

    @property
    def ready_timeout(self) -> float:
        return 600.0 if self.worker.engine == "vllm" else 120.0  # vLLM loads and profiles first

    def __call__(self, role: Role, ordinal: int) -> ProcessPlan:
        threads = max(1, (os.cpu_count() or 1) // self.count)
        env = {**child_env(threads), TOKEN_ENV: self.token, **self._engine_env(ordinal)}
        if self.frontend.api_key:
            env[METRICS_KEY_ENV] = self.frontend.api_key
        return ProcessPlan(f"{role.value}-{ordinal}", (*self._argv(), "--role", role.value), env)

    def _argv(self) -> list[str]:
        wk = self.worker
        argv = [sys.executable, "-m", "kvrelay.cli.main", "worker", "--namespace", self.frontend.namespace]
        for name in _WORKER_PASSTHROUGH:
            value = getattr(wk, name)
            if isinstance(value, bool):  # a switch takes no value: --x / --no-x
                argv.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
            elif value not in ("", None):
                argv.append(f"{flag_name(name)}={value}")  # one token: a value may start with '-' (--vllm-args)
        for cfg in (self.discovery, self.events):
            for name, value in vars(cfg).items():
                argv += [flag_name(name), str(value)]
        return argv

    def _engine_env(self, ordinal: int) -> dict[str, str]:
        """Per-worker environment an engine needs on a shared machine: vLLM on CPU gets its own cores."""
        wk = self.worker
        if wk.engine != "vllm" or wk.device != "cpu" or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            return {}
        from kvrelay.workers.engines.vllm.build import cpu_binding

        return {"VLLM_CPU_OMP_THREADS_BIND": cpu_binding(ordinal % self.count, self.count)}

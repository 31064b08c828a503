"""A policy with its state: what the planner loop calls each interval (`decide`), and what `set` changes.

Wraps the pure functions of policy_load.py and policy_sla.py; targets and bounds can be replaced
between intervals (`kvrelay planner set`) without losing predictor or cooldown state.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from enum import Enum
from typing import Any

from kvrelay.planner.decision import Bounds, Decision
from kvrelay.planner.observation import Observation, Pool
from kvrelay.planner.policy_load import LoadConfig, LoadState, decide_load
from kvrelay.planner.policy_sla import SlaConfig, SlaState, decide_sla
from kvrelay.planner.profile import Profile
from kvrelay.planner.targets import LatencyTargets


class PolicyKind(str, Enum):
    LOAD = "load"
    SLA = "sla"


class Policy:
    def __init__(self, kind: PolicyKind, bounds: Bounds, load: LoadConfig | None = None,
                 sla: SlaConfig | None = None, profile: Profile | None = None):
        if kind is PolicyKind.SLA and profile is None:
            raise ValueError("the sla policy needs a profile (kvrelay planner profile)")
        self.kind, self.bounds = kind, bounds
        # The configured bounds are the ceiling `update` may never raise: a caller of `/set` can narrow
        # the pools or the budget, not start more workers than the operator configured.
        self.ceiling = bounds
        self.load, self.sla, self.profile = load or LoadConfig(), sla or SlaConfig(), profile
        self.load_state = LoadState()
        self.sla_state = SlaState.new(self.sla.predictor)

    def decide(self, obs: Observation | None, current: dict[Pool, int]) -> Decision:
        if self.kind is PolicyKind.LOAD:
            decision, self.load_state = decide_load(obs, current, self.load_state, self.load, self.bounds)
            return decision
        assert self.profile is not None
        return decide_sla(obs, current, self.sla_state, self.sla, self.profile, self.bounds)

    def settings(self) -> dict[str, Any]:
        return {"policy": self.kind.value, **asdict(self.load.targets),
                **{f.name: getattr(self.bounds, f.name) for f in fields(Bounds)}}

    def update(self, changes: dict[str, Any]) -> None:
        """Targets (`ttft_target`, `itl_target`) and bounds (`min_decode`, `budget`, ...) by name; raises
        ValueError naming the first bad one, and changes nothing then."""
        bound_names = {f.name for f in fields(Bounds)}
        target_names = {f.name for f in fields(LatencyTargets)}
        bounds, targets = self.bounds, self.load.targets
        for name, value in changes.items():
            if name in bound_names:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{name}: expected an integer, got {value!r}")
                bounds = replace(bounds, **{name: value})
            elif name in target_names:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"{name}: expected seconds > 0, got {value!r}")
                targets = replace(targets, **{name: float(value)})
            else:
                raise ValueError(f"unknown setting {name!r}")
        problem = bounds.check() or self._above_ceiling(bounds)
        if problem:
            raise ValueError(problem)
        self.bounds = bounds
        self.load, self.sla = replace(self.load, targets=targets), replace(self.sla, targets=targets)

    def _above_ceiling(self, bounds: Bounds) -> str | None:
        for name in ("max_prefill", "max_decode", "budget"):
            value, limit = getattr(bounds, name), getattr(self.ceiling, name)
            if value > limit:
                return f"{name}: {value} is above the configured {limit} (--{name.replace('_', '-')})"
        if bounds.max_decode < 1 <= self.ceiling.max_decode:
            return "max_decode: must stay >= 1 (no decode worker serves no request)"
        return None

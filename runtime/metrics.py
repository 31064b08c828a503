"""Prometheus helpers.

Every component takes a `CollectorRegistry` instead of touching the global default registry, so two
components (or two tests) in one process never collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "new_registry", "render"]


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format, for a /metrics endpoint."""
    return generate_latest(registry)

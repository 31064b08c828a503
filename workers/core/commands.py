"""What the asyncio side of an engine posts to the core's owner (runner.py applies them in order)."""

from __future__ import annotations

from enum import StrEnum


class Command(StrEnum):
    ADD = "add"  # (request, hold, in_lower), stream
    ABORT = "abort"  # request id
    PULLED = "pulled"  # request id, (plan, ok)
    ONBOARDED = "onboarded"  # request id, (ticket, ok per block)
    OFFLOADED = "offloaded"  # block ids
    REPLAN = "replan"  # request id, in_lower
    TIER_EVENT = "tier_event"  # (tier, kind, hashes)
    SNAPSHOT = "snapshot"  # future to resolve
    WAKE = "wake"  # nothing: end a blocking wait

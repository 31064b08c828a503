"""Running a process's main coroutine: on uvloop where available (servers), plain asyncio otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # Windows, or a minimal install
        return asyncio.run(main)
    return uvloop.run(main)

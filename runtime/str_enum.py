"""`StrEnum` on every supported Python: `enum.StrEnum` is 3.11+, and pyproject says >=3.10.

Members are `str`s whose `str()` and format are their value (`f"{Role.AGG}"` == "agg"), as 3.11's."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(self, format_spec)

__all__ = ["StrEnum"]

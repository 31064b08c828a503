"""Errors the frontend's request orchestration raises to the HTTP layer (mapped in pipeline.py)."""

from __future__ import annotations


class NoWorker(Exception):
    """No worker serves this model (now)."""


class WorkerRejected(Exception):
    """The worker refused the request itself (bad input it detected, or it is overloaded)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

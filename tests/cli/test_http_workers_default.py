"""The default number of HTTP processes (issue 33): what the cores leave after the local workers and one
core for everything else; the flag and the env var still win; never 0, never past the cap."""

from __future__ import annotations

import argparse

import pytest

from kvrelay.cli import http_workers


@pytest.mark.parametrize(("cores", "workers", "expected"), [
    (1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 2, 1), (8, 2, 5), (16, 2, 8), (64, 8, 8), (16, 0, 8), (3, 0, 2)])
def test_default_leaves_a_core_per_local_worker_and_one_more(monkeypatch, cores, workers, expected):
    monkeypatch.setattr(http_workers, "available_cores", lambda: cores)
    monkeypatch.delenv(http_workers.ENV, raising=False)
    args = argparse.Namespace(http_workers=None, http_fd=None)
    assert http_workers.count(args, "zmq", local_workers=workers) == expected
    assert http_workers.count(args, "inproc", local_workers=workers) == 1


def test_the_flag_and_the_env_var_override_the_default(monkeypatch):
    monkeypatch.setattr(http_workers, "available_cores", lambda: 2)
    monkeypatch.setenv(http_workers.ENV, "3")
    assert http_workers.count(argparse.Namespace(http_workers=None, http_fd=None), "zmq", local_workers=1) == 3
    assert http_workers.count(argparse.Namespace(http_workers="2", http_fd=None), "zmq", local_workers=1) == 2

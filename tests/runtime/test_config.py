from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from kvrelay.runtime.config import ConfigError, add_arguments, build, positive, setting


@dataclass(frozen=True)
class Demo:
    workers: int = setting(2, "number of workers", positive)
    mode: Literal["a", "b"] = setting("a", "mode")
    ratio: float = setting(0.5, "ratio")
    verbose: bool = setting(False, "chatty")
    name: str = setting("x", "name")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p, Demo)
    return p.parse_args(argv)


def test_defaults_env_and_flags_in_precedence_order():
    assert build(Demo, parse([]), env={}) == Demo()
    env = {"KVRELAY_WORKERS": "4", "KVRELAY_VERBOSE": "yes", "KVRELAY_MODE": "b"}
    assert build(Demo, parse([]), env=env) == Demo(workers=4, mode="b", verbose=True)
    cfg = build(Demo, parse(["--workers", "7", "--no-verbose", "--ratio", "1.5"]), env=env)
    assert cfg == Demo(workers=7, mode="b", ratio=1.5, verbose=False)


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--workers", "0"], {}, "--workers: must be > 0"),
        (["--workers", "two"], {}, "--workers: expected int"),
        ([], {"KVRELAY_WORKERS": "-1"}, "--workers (from KVRELAY_WORKERS): must be > 0"),
        ([], {"KVRELAY_MODE": "c"}, "--mode (from KVRELAY_MODE): invalid choice"),
        ([], {"KVRELAY_VERBOSE": "maybe"}, "expected a boolean"),
    ],
)
def test_invalid_values_name_the_flag(argv, env, needle):
    with pytest.raises(ConfigError) as info:
        build(Demo, parse(argv), env=env)
    assert needle in str(info.value)

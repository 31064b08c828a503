"""The console script's contract: --help/--version work; bad input exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest


def kvrelay(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvrelay.cli.main", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_version_and_help():
    out = kvrelay("--version")
    assert out.returncode == 0 and out.stdout.startswith("kvrelay ")
    out = kvrelay("--help")
    assert out.returncode == 0 and "discovery" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["discovery", "list", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["discovery", "list", "--lease-ttl", "0"], "--lease-ttl: must be > 0"),
        (["discovery", "list", "--discovery", "zookeeper"], "invalid choice: 'zookeeper'"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle):
    out = kvrelay(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_env_var_error_names_flag_and_variable(monkeypatch):
    import os

    out = kvrelay("discovery", "list", env={**os.environ, "KVRELAY_LEASE_TTL": "soon"})
    assert out.returncode == 2
    assert "--lease-ttl (from KVRELAY_LEASE_TTL): expected float" in out.stderr


def test_discovery_list_shows_registered_instances(tmp_path):
    import asyncio

    from kvrelay.runtime.discovery import Instance, register_instance
    from kvrelay.runtime.discovery.file import FileDiscovery

    async def scenario() -> str:
        disc = FileDiscovery(str(tmp_path), ttl=30)
        await disc.start()
        await register_instance(disc, Instance(namespace="ns", component="backend", instance_id="w1",
                                               address="127.0.0.1:9", model="tiny"))
        out = await asyncio.to_thread(kvrelay, "discovery", "list", "--namespace", "ns",
                                      "--discovery-dir", str(tmp_path))
        await disc.close()
        return out.stdout

    stdout = asyncio.run(scenario())
    assert "w1" in stdout and "127.0.0.1:9" in stdout and "tiny" in stdout


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["--discovery", "mem"], 2, "--discovery mem: a frontend process alone never sees a worker"),
    (["--events", "zmq", "--zmq-pub-endpoint", "ipc:///tmp/kvrelay-no-broker-pub.sock",
      "--zmq-sub-endpoint", "ipc:///tmp/kvrelay-no-broker-sub.sock", "--http-port", "0"], 1, "is not reachable"),
])
def test_frontend_refuses_planes_it_cannot_use_with_one_line(args, code, needle):
    out = kvrelay("frontend", *args)
    assert out.returncode == code, out.stderr
    assert out.stderr.count("\n") == 1 and needle in out.stderr and "Traceback" not in out.stderr

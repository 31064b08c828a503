"""`kvrelay frontend` (the distributed shapes' frontend process): bad planes exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys


def test_frontend_alone_refuses_in_process_planes():
    for flags in (["--discovery", "mem"], ["--events", "inproc"]):
        r = subprocess.run([sys.executable, "-m", "kvrelay.cli.main", "frontend", *flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("kvrelay frontend: error:") and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "kvrelay.cli.main", "frontend", "--http-port", "x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--http-port" in r.stderr

"""runtime.free_port: a port handed to another process is bindable and never one the kernel hands out itself."""

from __future__ import annotations

import socket

from kvrelay.runtime.free_port import ephemeral_range, free_port


def test_free_ports_are_bindable_and_outside_the_ephemeral_range():
    lo, hi = ephemeral_range()
    for _ in range(50):
        port = free_port()
        assert not lo <= port <= hi, (port, lo, hi)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: raises if it was not


def test_a_port_in_use_is_never_chosen(monkeypatch):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    taken = held.getsockname()[1]
    monkeypatch.setattr("kvrelay.runtime.free_port._LOWEST", taken)  # the only candidate below: the taken port
    monkeypatch.setattr("kvrelay.runtime.free_port.ephemeral_range", lambda: (taken + 1, 65535))
    try:
        assert free_port(tries=20) != taken
    finally:
        held.close()

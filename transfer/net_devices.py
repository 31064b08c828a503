"""Which network device holds an IP address (to confine UCX's listeners to `--host`'s device)."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def _ipv4_of(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(raw[20:24])


def device_of(host: str) -> str | None:
    """The interface name holding `host`, "lo" for any loopback address; None for a wildcard
    (0.0.0.0, ::, empty: the operator asked for every device), a name, or an address not found here."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    if ip.is_loopback:
        return "lo"
    if ip.version != 4:
        return None
    return next((name for _, name in socket.if_nameindex() if _ipv4_of(name) == host), None)

"""The test suite's network guard: any connect() to an address outside loopback raises instead.

Tests must never reach a weights hub (or anything else) by accident: a test that would download
something fails at once with a message naming the address. python_tests/conftest.py installs this in
the pytest process and puts this directory first on PYTHONPATH, so Python picks this file up as
`sitecustomize` in every subprocess the tests start (CLI smoke runs, Ray's workers, sandboxes).
Unix sockets and loopback (127.0.0.0/8, ::1) stay open: Ray and local servers keep working.
"""

from __future__ import annotations

import ipaddress
import socket

_ERROR = "furl_fast tests: network access outside loopback is blocked (connect to {!r})"


class NetworkBlocked(ConnectionError):
    """Raised for a connect() to an address outside loopback."""


def _is_loopback(family: int, address) -> bool:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True  # AF_UNIX and friends never leave the machine
    host = address[0] if isinstance(address, tuple) else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:  # a host name: it would need a DNS lookup, which is network access too
        return False


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def guarded_connect(self, address):
    if not _is_loopback(self.family, address):
        raise NetworkBlocked(_ERROR.format(address))
    return _connect(self, address)


def guarded_connect_ex(self, address):
    if not _is_loopback(self.family, address):
        raise NetworkBlocked(_ERROR.format(address))
    return _connect_ex(self, address)


def install() -> None:
    """Puts the guard on socket.socket (again: pytest-socket, when installed, puts the original back
    after every test)."""
    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex


install()

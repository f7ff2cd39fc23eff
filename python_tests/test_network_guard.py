"""The test suite's network guard (python_tests/network_guard): connects outside loopback fail, in
this process and in subprocesses; loopback still works."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

# TEST-NET-1 (RFC 5737): never routed, so nothing is reached even if the guard were missing (the
# connect would then time out or fail with another error, not the guard's).
OUTSIDE = ("192.0.2.1", 443)


def test_outside_connect_fails_in_process():
    with pytest.raises(ConnectionError, match="network access outside loopback is blocked"):
        socket.create_connection(OUTSIDE, timeout=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # how libraries probe their IP
        with pytest.raises(ConnectionError, match="blocked"):
            udp.connect(("8.8.8.8", 53))
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
        with pytest.raises(ConnectionError, match="blocked"):
            s6.connect_ex(("2001:db8::1", 443))


def test_outside_connect_fails_in_subprocesses():
    code = f"import socket; socket.create_connection({OUTSIDE!r}, timeout=1)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "network access outside loopback is blocked" in result.stderr


def test_loopback_still_works():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted = threading.Thread(target=lambda: server.accept()[0].close())
        accepted.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        accepted.join(timeout=5)
    a, b = socket.socketpair()  # AF_UNIX (multiprocessing, Ray's raylet sockets) is untouched
    a.sendall(b"x")
    assert b.recv(1) == b"x"
    a.close(), b.close()

"""The partition proxy itself (tests/chaos/proxy.py): traffic passes, a cut drops open connections and leaves new
ones unanswered, a restore lets traffic through again."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.chaos.proxy import TcpProxy

pytestmark = pytest.mark.chaos


def echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def pump(c: socket.socket) -> None:
                with c:
                    while data := c.recv(1024):
                        c.sendall(data)

            threading.Thread(target=pump, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def roundtrip(port: int, payload: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(1024)


def test_the_proxy_forwards_cuts_and_restores() -> None:
    server, port = echo_server()
    try:
        with TcpProxy(port) as proxy:
            assert roundtrip(proxy.port, b"hello") == b"hello"
            open_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
            open_conn.sendall(b"a")
            assert open_conn.recv(16) == b"a"
            proxy.cut()
            assert open_conn.recv(16) == b"", "an open connection is closed by the cut"
            with pytest.raises(TimeoutError):
                roundtrip(proxy.port, b"lost", timeout=0.5)  # accepted, never answered
            proxy.restore()
            assert roundtrip(proxy.port, b"again") == b"again"
            open_conn.close()
    finally:
        server.close()


def test_a_dropping_cut_keeps_connections_open_and_swallows_their_traffic() -> None:
    server, port = echo_server()
    try:
        with TcpProxy(port) as proxy:
            conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
            conn.sendall(b"a")
            assert conn.recv(16) == b"a"
            proxy.cut(drop=True)
            conn.sendall(b"lost")  # the connection stays open: the send succeeds, no answer ever comes
            with pytest.raises(TimeoutError):
                conn.recv(16)
            with pytest.raises(TimeoutError):
                roundtrip(proxy.port, b"new", timeout=0.5)
            proxy.restore()
            conn.settimeout(2)
            assert conn.recv(16) == b"", "a connection whose bytes were dropped is closed at the restore"
            assert roundtrip(proxy.port, b"again") == b"again"
            conn.close()
    finally:
        server.close()


def test_the_proxy_refuses_addresses_off_this_machine() -> None:
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy(9042, target_host="10.0.0.1")

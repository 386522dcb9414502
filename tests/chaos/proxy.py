"""A TCP proxy on 127.0.0.1 that a chaos test can cut: the network partition between one engine instance and the
database (issue 20). The instance is given the proxy's address as its contact point; :meth:`TcpProxy.cut` drops
every open connection and makes new ones hang (accepted, never answered: what a partition looks like to a
client, which then runs into its timeouts); ``cut(drop=True)`` keeps the open connections but swallows what is
sent on them either way (a partition the client learns of only by its request timeouts, the harder case);
:meth:`TcpProxy.restore` lets traffic through again on new connections.

Threads, not asyncio: the test drives processes and sleeps meanwhile. Only loopback addresses."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

CHUNK = 65_536


class TcpProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1") -> None:
        if not target_host.startswith("127.") or not listen_host.startswith("127."):
            raise ValueError("the proxy only talks to loopback addresses")
        self.target = (target_host, target_port)
        self._server = socket.create_server((listen_host, 0))
        self.port: int = self._server.getsockname()[1]
        self.host = listen_host
        self._lock = threading.Lock()
        self._cut = False
        self._open: set[socket.socket] = set()
        self._held: list[socket.socket] = []  # accepted while cut: kept open, never answered
        self._swallowing: set[socket.socket] = set()  # open when cut with drop=True: what they carry is dropped
        self._closed = False
        self.connections = 0  # accepted so far (forwarded or held)
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``host:port``, as a contact point."""
        return f"{self.host}:{self.port}"

    def is_cut(self) -> bool:
        return self._cut

    def cut(self, *, drop: bool = False) -> None:
        """The partition: close every forwarded connection (both sides), or with ``drop`` keep them open and
        drop every byte sent on them from now on; hold new connections unanswered."""
        with self._lock:
            self._cut = True
            conns, self._open = self._open, set()
            if drop:
                self._swallowing |= conns
        if not drop:
            for s in conns:
                _close(s)

    def restore(self) -> None:
        """The link is back: new connections are forwarded again. The held ones, and those whose traffic was
        dropped (their byte streams have holes), are closed, so clients reconnect."""
        with self._lock:
            self._cut = False
            held, self._held = self._held, []
            swallowed, self._swallowing = self._swallowing, set()
        for s in held + list(swallowed):
            _close(s)

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.restore()
        _close(self._server)
        self._acceptor.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            with self._lock:
                if self._cut:
                    self._held.append(client)
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self.is_cut():  # cut while connecting
                    _close(upstream)
                    self._held.append(client)
                    continue
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="proxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                if src in self._swallowing:
                    continue  # partitioned: the bytes never arrive
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for s in (src, dst):
                    self._open.discard(s)
                    self._swallowing.discard(s)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()

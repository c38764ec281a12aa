"""A TCP proxy in front of the shared Postgres that a test can cut and restore: the database "goes away" for
the code under test while the real server (shared with every other test) keeps running. FailingProxy: one in
front of the S3 server that cuts chosen requests."""

from __future__ import annotations

import contextlib
import re
import socket
import threading

from tests.service.conftest import free_port


class TcpProxy:
    """A TCP proxy to Postgres that a test can cut (every connection dropped, new ones refused) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = False
        self._listen()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.2)
        self._listener = s

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self) -> None:
        """The database goes away: open connections break, new ones are refused."""
        self._up.clear()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._stop = True
        self.cut()


class FailingProxy(TcpProxy):
    """A TCP proxy in front of an HTTP server (the S3 server) that cuts the connection of every request whose
    first line matches `fail`, as a store whose network goes would, or holds one that matches `hold` (sets
    `holding`) until `release` is set, then cuts it; `requests` keeps every first line seen."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.fail: re.Pattern[bytes] | None = None
        self.hold: re.Pattern[bytes] | None = None
        self.holding, self.release = threading.Event(), threading.Event()
        self.requests: list[bytes] = []
        super().__init__(target)
        self.url = f"http://127.0.0.1:{self.port}"

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            from_server = src.getpeername()[1] == self.target[1]
        except OSError:  # the other direction's thread closed both already
            return
        if from_server:  # the server's answers pass as they are
            return super()._pipe(src, dst)
        try:
            while data := src.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                # the start of a request (a body's bytes do not look like one)
                if re.match(rb"[A-Z]+ /", line):
                    self.requests.append(line)
                    if self.hold is not None and self.hold.search(line):
                        self.holding.set()
                        self.release.wait()
                        break
                    if self.fail is not None and self.fail.search(line):
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

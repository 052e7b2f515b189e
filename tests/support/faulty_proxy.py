"""A loopback HTTP proxy in front of one server (the tests' S3 server) that drops the
connection of every request whose request line matches a pattern: a real network fault, seen
by the client as a reset connection, injected from outside the code under test.

Every other request passes through unchanged; its response gets ``Connection: close``, so a
client opens a connection per request and every request line is seen here (a kept-alive
connection would carry later requests past the check)."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
from urllib.parse import urlsplit

HEADER_END = b"\r\n\r\n"


class FaultyProxy:
    """``url``: where to point the client. ``refused``: the request lines dropped so far."""

    def __init__(self, upstream: str, refuse: re.Pattern[str]) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.refuse = refuse
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="faulty-proxy", daemon=True)

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        self._thread.join(5)

    def refused_lines(self) -> list[str]:
        with self._lock:
            return list(self.refused)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            head, rest = _read_head(client, b"")
            if head is None:
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            if self.refuse.search(line):
                with self._lock:
                    self.refused.append(line)
                # close with a reset, as a failing network or server does
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            upstream = socket.create_connection(self.upstream)
            upstream.sendall(head + rest)
            pump = threading.Thread(target=_pump, args=(client, upstream), daemon=True)
            pump.start()
            self._responses(upstream, client)
            pump.join(30)
        except OSError:
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    @staticmethod
    def _responses(upstream: socket.socket, client: socket.socket) -> None:
        """Relay the response, ``Connection: close`` in its head (1xx heads as they are)."""
        buffer = b""
        while True:
            head, buffer = _read_head(upstream, buffer)
            if head is None:
                return
            lines = head[: -len(HEADER_END)].split(b"\r\n")
            interim = lines[0].split(b" ")[1].startswith(b"1")
            if not interim:
                kept = [h for h in lines[1:] if not h.lower().startswith(b"connection:")]
                lines = [lines[0], *kept, b"Connection: close"]
            client.sendall(b"\r\n".join(lines) + HEADER_END)
            if not interim:
                break
        if buffer:
            client.sendall(buffer)
        _pump(upstream, client)


def _read_head(sock: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """(the head up to its blank line, the bytes read past it); None at end of stream."""
    while HEADER_END not in buffer:
        data = sock.recv(65536)
        if not data:
            return None, buffer
        buffer += data
    end = buffer.index(HEADER_END) + len(HEADER_END)
    return buffer[:end], buffer[end:]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

"""A TCP proxy in front of a broker node, for the chaos suite and the nemesis: it can stall (read and
hold, never answer, nothing closed: a partition as a client sees it), slow down (a delay per chunk),
cut (every connection closed and new ones closed on accept: a refused link) and reset (RST on every
connection at once). aio-pika's own tests cut connections with such a proxy.
"""

from __future__ import annotations

import socket
import struct
import threading
import time


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.frozen = threading.Event()  # stall: nothing is passed on, nothing is closed
        self.refusing = threading.Event()  # cut: connections closed as they come
        self.delay = 0.0  # slow: seconds before each chunk is passed on
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, broker_url: str) -> str:
        """broker_url with this proxy's port in place of the node's."""
        return broker_url.replace(f":{self.target}/", f":{self.port}/")

    def connections(self) -> int:
        """Connections being forwarded now (two sockets each)."""
        with self._lock:
            return len(self._sockets) // 2

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.refusing.is_set():
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _abort(client)
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                while self.frozen.is_set():
                    time.sleep(0.01)
                data = source.recv(65536)
                if not data:
                    break
                while self.frozen.is_set():  # read but not passed on: as if the network dropped it
                    time.sleep(0.01)
                if self.delay:
                    time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        for s in (source, target):
            try:
                s.close()
            except OSError:
                pass

    def reset(self) -> None:
        """Every connection cut at once (RST); forwarding goes on for new ones."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            _abort(s)
        self.frozen.clear()

    def cut(self) -> None:
        """Every connection reset and new ones refused, until heal()."""
        self.refusing.set()
        self.reset()

    def heal(self) -> None:
        """Forwarding as normal again: no stall, no delay, new connections taken."""
        self.refusing.clear()
        self.frozen.clear()
        self.delay = 0.0

    def close(self) -> None:
        self.reset()
        self.server.close()


def _abort(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    except OSError:
        pass

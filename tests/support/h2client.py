"""A raw HTTP/2 client (the `h2` package) for what a well-behaved gRPC client never does: reset
streams as fast as it can, or open streams and never read them (a receive window of 0).

Bounded: every loop stops after its count or its seconds. Loopback addresses only.
"""

from __future__ import annotations

import select
import socket
import struct
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (not compressed)."""
    return struct.pack(">BI", 0, len(message)) + message


class RawH2:
    """One plaintext HTTP/2 connection (prior knowledge) to a gRPC server on loopback."""

    def __init__(self, address: str, window: int | None = None) -> None:
        host, port = address.rsplit(":", 1)
        assert host.startswith("127.") or host == "localhost", "loopback only"
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if window is not None:      # 0: the server may send headers but no data until we say so
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sock.sendall(self.conn.data_to_send())
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.refused = 0            # streams the server reset with REFUSED_STREAM
        self.ended: dict[int, dict] = {}    # stream id → trailers (grpc-status ...)
        self.address = address

    def _headers(self, path: str, key: str = "") -> list[tuple[bytes, bytes]]:
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                   (b":authority", self.address.encode()), (b"content-type", b"application/grpc"),
                   (b"te", b"trailers")]
        if key:
            headers.append((b"authorization", f"Bearer {key}".encode()))
        return headers

    def call(self, path: str, message: bytes, key: str = "") -> int:
        """Starts a unary-request call; returns its stream id (its answer is read by `pump`)."""
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, self._headers(path, key))
        self.conn.send_data(stream, grpc_frame(message), end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        return stream

    def flood(self, path: str, count: int, seconds: float) -> int:
        """HEADERS then RST_STREAM(CANCEL), `count` times or for `seconds`; returns how many
        were sent before the server closed the connection or the bound was reached."""
        headers, stop, sent = self._headers(path), time.monotonic() + seconds, 0
        while sent < count and time.monotonic() < stop and not self.closed:
            for _ in range(100):
                stream = self.conn.get_next_available_stream_id()
                self.conn.send_headers(stream, headers)
                self.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                sent += 1
            try:
                self.sock.sendall(self.conn.data_to_send())
            except OSError:
                self.closed = True
                break
            self.pump(0)
        return sent

    def pump(self, seconds: float) -> None:
        """Reads what the server sent for up to `seconds` (answering its pings and settings)."""
        stop = time.monotonic() + seconds
        while not self.closed:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, stop - time.monotonic()))
            if not ready:
                return
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway = event
                elif isinstance(event, h2.events.StreamReset):
                    self.refused += event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                elif isinstance(event, h2.events.TrailersReceived):
                    self.ended[event.stream_id] = dict(event.headers)
            try:
                self.sock.sendall(self.conn.data_to_send())
            except OSError:
                self.closed = True

    def close(self) -> None:
        self.sock.close()

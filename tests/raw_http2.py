"""A hand-made HTTP/2 client on a plain socket: the frames a hostile peer can write.

gRPC's own clients never reset a stream the moment they open it, never leave a stream
unread while answering pings, and never come from an address of their choosing. This
client does, with the standard library only: the connection preface, SETTINGS, HEADERS
with HPACK literal fields (no Huffman coding, no table), DATA, RST_STREAM. A thread reads
what the server sends, acknowledges its SETTINGS and PINGs (so keepalive sees a live
peer), and never grants flow-control window beyond the initial one: a stream the server
writes to stays unread.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
CANCEL = 0x8  # RST_STREAM's error code for "no longer needed"
MAX_FRAME = 16384  # the largest frame a peer must take (SETTINGS_MAX_FRAME_SIZE's default)
WINDOW = 65535  # what a peer may send before the other grants more (the default window)
SERVICE = "/farm_ng.core.proto.EventService"
REQUEST_REPLY = f"{SERVICE}/requestReply"
SUBSCRIBE = f"{SERVICE}/subscribe"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    # "Literal Header Field without Indexing, New Name", plain strings shorter than 127.
    raw_name, raw_value = name.encode(), value.encode()
    return b"\x00" + bytes([len(raw_name)]) + raw_name + bytes([len(raw_value)]) + raw_value


def request_headers(method: str, authority: str = "localhost", encoding: str | None = None) -> bytes:
    """The HPACK block of a gRPC call to ``method``."""
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", method),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if encoding:
        fields.append(("grpc-encoding", encoding))
    return b"".join(_literal(name, value) for name, value in fields)


def grpc_message(message: bytes, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message: the compressed flag, 4 bytes of length, the bytes."""
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(message)) + message


class RawConnection:
    """One HTTP/2 connection to a gRPC server, written by hand.

    ``source`` is the local address to connect from (any of 127.0.0.0/8 on Linux: an
    address that is not the config's). ``window`` is the flow-control window each stream
    starts with (HTTP/2's default is 65,535 bytes; 0: the server can send no message).

    ``first_headers`` holds, per stream, the flags of the first HEADERS the server sent:
    with END_STREAM it refused the call at once (a trailers-only reply). ``ended`` holds
    the streams the server ended later (trailers or RST_STREAM).
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        source: str | None = None,
        window: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        # The timeout bounds each send; the reader waits on (see _exactly).
        self.sock = socket.create_connection((host, port), timeout, (source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sending = threading.Lock()
        self._changed = threading.Condition()
        self.first_headers: dict[int, int] = {}
        self.ended: set[int] = set()
        self.goaway = False
        self.closed = False
        self.send_window = WINDOW  # of the connection: what the server lets us send now
        self.next_stream = 1
        # SETTINGS_INITIAL_WINDOW_SIZE (4): what each stream may receive before we grant more.
        settings = b"" if window is None else struct.pack(">HI", 4, window)
        self.send(PREFACE + frame(SETTINGS, 0, 0, settings))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send(self, data: bytes) -> None:
        """Writes bytes as they are."""
        with self._sending:
            self.sock.sendall(data)

    def call_frames(self, method: str, message: bytes, reset: bool = False, encoding: str | None = None) -> bytes:
        """The frames of one call on a new stream (and its reset at once, with ``reset``)."""
        stream = self.next_stream
        self.next_stream += 2
        data = frame(HEADERS, END_HEADERS, stream, request_headers(method, encoding=encoding))
        chunks = [message[start : start + MAX_FRAME] for start in range(0, len(message), MAX_FRAME)] or [b""]
        for index, chunk in enumerate(chunks):
            data += frame(DATA, END_STREAM if index == len(chunks) - 1 else 0, stream, chunk)
        if reset:
            data += frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL))
        return data

    def call(self, method: str, message: bytes, encoding: str | None = None, timeout: float = 10.0) -> int:
        """Starts one call and sends its only message, within flow control; returns the stream id.

        Raises:
            TimeoutError: the server granted no window for the message within ``timeout``.

        """
        if not self.wait_for(lambda: self.send_window >= len(message), timeout):
            msg = f"no window for {len(message)} bytes within {timeout} s"
            raise TimeoutError(msg)
        with self._changed:
            self.send_window -= len(message)
        stream = self.next_stream
        self.send(self.call_frames(method, message, encoding=encoding))
        return stream

    def wait_for(self, condition: object, timeout: float) -> bool:
        """Waits until ``condition()`` is true; returns whether it became so."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():  # type: ignore[operator]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    return bool(condition())  # type: ignore[operator]
                self._changed.wait(min(remaining, 0.2))
        return True

    def refused(self) -> set[int]:
        """Streams the server ended with its first HEADERS (a trailers-only reply)."""
        with self._changed:
            return {stream for stream, flags in self.first_headers.items() if flags & END_STREAM}

    def open_streams(self) -> set[int]:
        """Streams the server answered and has not ended."""
        with self._changed:
            return set(self.first_headers) - self.refused() - self.ended

    def close(self) -> None:
        """Closes the socket; the reader thread ends."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(5)

    def _read(self) -> None:
        try:
            while True:
                head = self._exactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = self._exactly(length)
                self._handle(kind, flags, stream, payload)
        except OSError:
            pass
        finally:
            with self._changed:
                self.closed = True
                self._changed.notify_all()

    def _handle(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            self.send(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.send(frame(PING, ACK, 0, payload))
        with self._changed:
            if kind == HEADERS and stream not in self.first_headers:
                self.first_headers[stream] = flags
            elif (kind in (HEADERS, DATA) and flags & END_STREAM) or kind == RST_STREAM:
                self.ended.add(stream)
            elif kind == GOAWAY:
                self.goaway = True
            elif kind == WINDOW_UPDATE and stream == 0:
                self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            self._changed.notify_all()

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except socket.timeout:
                continue  # a quiet server: the connection is still open
            if not chunk:
                raise ConnectionResetError
            data += chunk
        return data

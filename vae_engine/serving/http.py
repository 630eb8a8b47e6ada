"""The HTTP server's own limits, below the app: what uvicorn is told, set on purpose (its defaults accept a 1 MiB
request header, a memory lever when many connections send one).

- request line (method, target, version) past `MAX_REQUEST_LINE` bytes: 414, connection closed;
- all header lines together past `MAX_HEADER_BYTES`: 431, connection closed (nginx answers 400/431 past 8 KiB a
  line; ours bounds the sum, which is what memory follows);
- bodies: the app's `Limits.max_body_bytes` (413), read in chunks and counted, never buffered past it;
- idle keep-alive connections close after `KEEP_ALIVE_S`; a listen backlog of `BACKLOG`.

With httptools (uvicorn's fast parser, in `uvicorn[standard]`) the bounds are counted as the parser reads each
piece, so a long header is refused before it is held whole; with h11 its incomplete-event bound is the header
limit (uvicorn answers 400 there).
"""

from __future__ import annotations

import json

MAX_REQUEST_LINE = 8 << 10  # bytes of the request target
MAX_HEADER_BYTES = 16 << 10  # bytes of all header names and values of one request
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
BACKLOG = 2048  # connections the kernel queues before the server accepts them


def uvicorn_options() -> dict:
    """uvicorn.run's keyword arguments for these limits: the bounded protocol where httptools is installed."""
    return {"h11_max_incomplete_event_size": MAX_HEADER_BYTES, "timeout_keep_alive": KEEP_ALIVE_S,
            "backlog": BACKLOG, "http": BoundedHttpToolsProtocol if BoundedHttpToolsProtocol else "h11"}


class _Refused(Exception):
    """Stops the parser at a bound (httptools re-raises a callback's exception as its own parser error)."""


try:  # a class at module level: uvicorn's worker processes find it by name
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn's h11, bounded by its incomplete-event size
    BoundedHttpToolsProtocol = None
else:
    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol counting the request line and header bytes as they are parsed: 414 past
        `MAX_REQUEST_LINE`, 431 past `MAX_HEADER_BYTES`, and the connection closed."""

        _refusal: tuple[int, str, str] | None = None

        def on_message_begin(self) -> None:
            self._line_bytes = self._header_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._line_bytes += len(url)
            if self._line_bytes > MAX_REQUEST_LINE:
                self._refuse(414, "URI Too Long", f"the request target is over {MAX_REQUEST_LINE} bytes")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request headers are over {MAX_HEADER_BYTES} bytes")
            super().on_header(name, value)

        def _refuse(self, status: int, reason: str, message: str) -> None:
            self._refusal = (status, reason, message)
            raise _Refused(message)  # uvicorn then answers through send_400_response, below

        def send_400_response(self, msg: str) -> None:
            if self._refusal is None:
                return super().send_400_response(msg)
            status, reason, message = self._refusal
            self._refusal = None
            body = json.dumps({"error": message}).encode()
            self.transport.write(b"".join([
                f"HTTP/1.1 {status} {reason}\r\n".encode(), b"content-type: application/json\r\n",
                f"content-length: {len(body)}\r\n".encode(), b"connection: close\r\n\r\n", body]))
            self.transport.close()

"""Pure-ASGI pieces shared by the services' fast paths (ingestion's submit, the worker's infer).

A fast path answers one well-formed, hot request without FastAPI's routing, middleware and
dependency layers; anything it does not answer itself goes on to the FastAPI route with its body
replayed, so every refusal stays the route's own (status, message, OpenAPI schema).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.contracts import MAX_HEADER_BYTES


async def read_body(receive: Receive, limit: int) -> tuple[bytes, bool] | None:
    """The request body, read up to ``limit`` bytes: (body, over_limit).

    Reading stops at the first chunk past ``limit`` (``over_limit`` True, the body cut there).
    None when the client went away before sending all of it.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), True
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks), False


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def no_receive() -> Message:
    """A ``receive`` for responses sent outside a request's own cycle."""
    return {"type": "http.disconnect"}


async def send_response(send: Send, response: Response) -> None:
    """Send a whole Starlette response straight through ASGI (outside the app)."""
    await response({"type": "http"}, no_receive, send)


async def send_json(send: Send, status: int, payload: bytes) -> None:
    """Send an already-serialised JSON body: two ASGI messages, no response object."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _HeadersTooLarge(Exception):
    """Raised inside a parser callback to stop parsing a request whose headers are past the bound."""


class _BoundLogger:
    """uvicorn's logger of one connection, less its "Invalid HTTP request received." warning for a
    request the header bound refused: that request was well formed, and it is logged as a 431."""

    def __init__(self, proto: BoundedHttpToolsProtocol, logger: logging.Logger) -> None:
        self._proto = proto
        self._logger = logger

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log uvicorn's warning, unless it is about a request the bound refused."""
        if self._proto._too_large:
            return
        self._logger.warning(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (a C parser) with a bound on a request's line and headers.

    httptools accepts a header section of any size (it parsed a 2 MB header here), so the bound is
    kept twice over: the parsed request line and headers are counted as the parser hands them over,
    and the bytes that arrive while a request's headers are still incomplete are counted after
    each read (so a header that never ends holds at most the bound plus one read). Past
    ``max_header_bytes`` the request gets a 431 that says so, and the connection closes, before
    any handler runs. The rest is uvicorn's own. h11 bounds headers natively, but in pure Python:
    on httptools ingestion accepts 1.35–1.5× the jobs a second (README "Fifth round").
    """

    #: Bytes of request line and headers allowed per request.
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_done = False  # the current request's header section is complete
        self._read_open = 0  # bytes read while it was not
        self._parsed = 0  # request line and header bytes the parser handed over
        self._too_large = False
        self.logger = _BoundLogger(self, self.logger)  # type: ignore[assignment]

    def _count(self, n: int) -> None:
        self._parsed += n
        if self._parsed > self.max_header_bytes:
            self._too_large = True
            raise _HeadersTooLarge  # httptools turns it into HttpParserError: uvicorn refuses

    def on_message_begin(self) -> None:
        """A new request starts: its header section is open."""
        super().on_message_begin()
        self._headers_done = False
        self._parsed = 0

    def on_url(self, url: bytes) -> None:
        """Count the request target."""
        self._count(len(url) + 16)  # with the method and version around it
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count one header line."""
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """The header section ended within the bound."""
        self._headers_done = True
        self._read_open = 0
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, then refuse the request if its headers are still open past the bound."""
        super().data_received(data)
        if self._headers_done or self.transport.is_closing():
            self._read_open = 0
            return
        self._read_open += len(data)
        if self._read_open > self.max_header_bytes:
            self._send_431()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's 400 for a malformed request, or the 431 when a parser callback hit the bound."""
        if self._too_large:
            self._send_431()
        else:
            super().send_400_response(msg)

    def _send_431(self) -> None:
        """Answer 431 with a plain-text reason and close the connection."""
        self._too_large = True
        prefix = "%s:%d - " % self.client if self.client else ""  # noqa: UP031 (uvicorn's own form)
        self.logger.info(
            "%srefused a request whose line and headers exceed %d bytes (431)", prefix, self.max_header_bytes
        )
        body = f"request line and headers exceed {self.max_header_bytes} bytes: send smaller headers".encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()

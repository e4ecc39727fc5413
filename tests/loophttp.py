"""A loopback HTTP/1.1 server written per test, byte by byte, for the clients that stream
answers (``services/stream_http.py`` and what is built on it): each test's handler plays the
server's side of one connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.stream_http import StreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Engine:
    """A loopback server: ``handler`` serves each connection; connections are counted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        gone = asyncio.Event()
        self.closed.append(gone)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            gone.set()

    @property
    def url(self) -> str:
        """Base URL."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def served(
    handler: Handler, prefix: str = "", headers: dict[str, str] | None = None, **pool_kw: Any
) -> AsyncIterator[tuple[Engine, StreamPool]]:
    """An :class:`Engine` on a free loopback port and a pool to it (``prefix`` after its URL)."""
    e = Engine(handler)
    e.server = await asyncio.start_server(e._serve, "127.0.0.1", 0)
    pool = StreamPool(e.url + prefix, headers, **pool_kw)
    try:
        yield e, pool
    finally:
        await pool.aclose()
        e.server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One request: its request line, headers (lower-cased) and body."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return head[0], headers, body


def chunk(data: bytes) -> bytes:
    """``data`` as one piece of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


#: The head of a chunked server-sent events answer.
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nx-job-id: j7\r\n\r\n"

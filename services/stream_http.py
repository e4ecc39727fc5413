"""Streamed HTTP/1.1 POSTs (and GETs) on pooled keep-alive connections: the answer is handed over as it arrives.

One job only: send a request body to an engine and give each piece of its streamed answer to a
:class:`ResponseSink` from inside the event loop's read callback. The engine client's token
streams (inference worker, bench direct path) and the proxy's hop to the workers go over it.
Why not aiohttp, as before: per read, aiohttp feeds its ``StreamReader``, sets a future, wakes the
reading task and reschedules a read-timeout timer, and that wake-up, not the parse, is most of
what a token chunk costs a client when tokens arrive apart. With tokens 2 ms apart, the worker's
stream cost 35-43 µs of CPU a token over this client against about 70 over aiohttp
(``scripts/token_scaling.py --sim-itl-ms 2``; the README's "Eighth round" has the figures), and
the proxy's POST 35-44 µs against 80-130 (``scripts/hop_client.py``).

The response is parsed by httptools (llhttp, the C parser uvicorn serves with): status line,
headers, ``Content-Length``, chunked encoding and bodies that end when the connection closes.
There is no redirect, cookie, proxy or retry logic: an engine is reached directly, and a request
that fails is the caller's to retry (a POST that may have reached the engine is never resent here).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

#: What a request target may not hold: a space or a control character would split the request.
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")
#: How long a finished answer's closing bytes are awaited for its connection to be reused.
DRAIN_S = 0.5


class StreamHttpError(Exception):
    """The request did not complete; the message says what happened."""


class ConnectFailed(StreamHttpError):
    """No connection could be made (refused, unreachable, or the connect timed out)."""


class ReadTimeout(StreamHttpError):
    """Nothing arrived for the read timeout while the answer was still open."""


class ConnectionLost(StreamHttpError):
    """The connection closed before the answer ended."""


class BadResponse(StreamHttpError):
    """The bytes that came back are not HTTP/1.x."""


class BadURL(StreamHttpError, ValueError):
    """The base URL is not one this client can reach (``http://`` or ``https://`` and a host)."""


class ResponseSink(Protocol):
    """What a request's answer is handed to, piece by piece, inside the loop's read callback."""

    def head(self, status: int, reason: str, headers: dict[str, str]) -> None:
        """The status line and headers (names lower-cased; a repeated header keeps its last value)."""

    def body(self, data: bytes, now: float) -> bool:
        """A piece of the body, read at ``now`` (``time.perf_counter``).

        Return True once the caller has all it needs: what follows is not handed over, only read to
        the body's end (up to :data:`DRAIN_S`, then the connection is dropped) so that the
        connection can serve the next request. An exception raised here ends the request with it.
        """

    def end(self) -> None:
        """The body ended (all of it was handed over)."""


class Collect:
    """A sink that keeps a whole answer, up to ``limit`` bytes (past it the request fails)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.data = bytearray()

    def head(self, status: int, reason: str, headers: dict[str, str]) -> None:
        """Keep the status line and the headers."""
        self.status, self.reason, self.headers = status, reason, headers

    def body(self, data: bytes, now: float) -> bool:
        """Keep the piece; refuse an answer past the limit."""
        if len(self.data) + len(data) > self.limit:
            raise BadResponse(f"an answer over {self.limit} bytes")
        self.data += data
        return False

    def end(self) -> None:
        """Nothing to do: the answer is whole."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: StreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._sink: ResponseSink | None = None
        self._done: asyncio.Future[None] | None = None
        self._headers: dict[str, str] = {}
        self._reason = ""
        self._until_close = False  # a body without length or chunks: it ends when the connection does
        self._headers_in = False
        self._satisfied = False
        self._complete = False
        self._error: BaseException | None = None
        self._now = 0.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports are not asyncio.Transport subclasses, though they act as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse what arrived; the parser's callbacks hand the body to the sink."""
        if self._parser is None or self._complete:
            self.abort()  # bytes nobody asked for: this connection cannot be trusted any more
            return
        # One timestamp a read, as a client reading whole blocks would take it.
        self._now = self._last_read = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the engine switched protocols"))
        except httptools.HttpParserError as e:
            if self._error is not None:  # raised by the sink: the request ends with it
                self._fail(self._error)
            else:
                self._fail(BadResponse(f"unreadable HTTP response: {e}"))

    def eof_received(self) -> bool | None:
        """The engine closed its side: let the transport close (connection_lost follows)."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Closed: end a body that runs to the close, fail a request still open, leave the pool."""
        self.closed = True
        self.pool._forget(self)
        if self._done is None or self._complete:
            return
        if self._satisfied or (self._headers_in and self._until_close):
            self._finished()  # the sink had all it needed, or the close is the body's end
            return
        why = f": {exc!r}" if exc is not None else ""
        self._fail(ConnectionLost(f"the connection closed before the answer ended{why}"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        """The reason phrase."""
        self._reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header (httptools joins a line that arrives in pieces before calling this)."""
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        """Hand the head to the sink; note whether the body runs until the connection closes."""
        assert self._parser is not None and self._sink is not None
        h = self._headers
        self._until_close = "content-length" not in h and "chunked" not in h.get("transfer-encoding", "")
        self._headers_in = True
        try:
            self._sink.head(self._parser.get_status_code(), self._reason, h)
        except BaseException as e:
            self._error = e
            raise

    def on_body(self, body: bytes) -> None:
        """Hand a piece of the body to the sink (after it is satisfied, only drain)."""
        if self._satisfied:
            return
        assert self._sink is not None
        try:
            enough = self._sink.body(body, self._now)
        except BaseException as e:
            self._error = e
            raise
        if enough:
            # The rest (a chunked body's last empty chunk, usually in this same read) is read so
            # that the connection can serve the next request; not for long.
            self._satisfied = True
            if self._done is not None:
                self._drain = self._done.get_loop().call_later(DRAIN_S, self._give_up_drain)

    def on_message_complete(self) -> None:
        """The answer ended: the request is done and the connection free again."""
        self._finished()

    # -- request lifecycle --------------------------------------------------------------------

    def start(
        self, request: bytes, sink: ResponseSink, done: asyncio.Future[None], read_timeout_s: float
    ) -> None:
        """Send ``request`` and hand its answer to ``sink``; ``done`` resolves when it is in."""
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._sink, self._done = sink, done
        self._headers, self._reason = {}, ""
        self._until_close = self._headers_in = self._satisfied = self._complete = False
        self._error = None
        self._drain = None
        self._last_read = time.perf_counter()
        # One timer a request, re-armed only when it fires early: resetting it on every read was
        # part of what a chunk cost over aiohttp.
        self._timer = done.get_loop().call_later(read_timeout_s, self._check_idle, read_timeout_s)
        self.transport.write(request)

    def _check_idle(self, timeout_s: float) -> None:
        if self._complete or self._done is None:
            return
        idle = time.perf_counter() - self._last_read
        if idle >= timeout_s:
            self._fail(ReadTimeout(f"nothing arrived for {timeout_s:g} s"))
            return
        self._timer = self._done.get_loop().call_later(timeout_s - idle, self._check_idle, timeout_s)

    def _finished(self, *, reuse: bool = True) -> None:
        if self._complete:
            return
        self._complete = True
        self._stop_timers()
        sink = self._sink
        if not self._satisfied and sink is not None:
            try:
                sink.end()
            except BaseException as e:
                self._fail(e)
                return
        self._resolve()
        parser = self._parser
        if (
            reuse
            and parser is not None
            and not self.closed
            and not self._until_close
            and parser.should_keep_alive()
        ):
            self._parser = None
            self._sink = self._done = None
            self.pool._release(self)
        else:
            self.abort()

    def _give_up_drain(self) -> None:
        """The answer is in but its end is not: done, without keeping the connection."""
        self._drain = None
        self._finished(reuse=False)

    def _resolve(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._complete = True
        self._stop_timers()
        if self._done is not None and not self._done.done():
            self._done.set_exception(error)
        self.abort()

    def _stop_timers(self) -> None:
        for t in (self._timer, self._drain):
            if t is not None:
                t.cancel()
        self._timer = self._drain = None

    def abort(self) -> None:
        """Drop the connection now (never reused)."""
        self.closed = True
        self._stop_timers()
        if self.transport is not None:
            self.transport.abort()
        self.pool._forget(self)


class StreamPool:
    """Keep-alive connections to one ``http://`` or ``https://`` base URL, for streamed POSTs.

    Idle connections are reused newest first, and dropped once idle for ``keepalive_s`` (below
    the 5 s that uvicorn, vLLM's server, keeps an idle connection, so that a request rarely meets
    one the engine is closing). Bound to the event loop it is first used in.
    """

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
        keepalive_s: float = 4.0,
        max_idle: int = 256,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BadURL(f"not an http(s) URL: {base_url!r}")
        default_port = 443 if url.scheme == "https" else 80
        self.host = url.hostname
        self.port = url.port or default_port
        self.prefix = url.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if self.port == default_port else f"{host}:{self.port}"
        lines = [f"Host: {authority}", "User-Agent: llmconsole", "Accept: */*"]
        self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1") + _header_lines(headers or {})
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle
        self.loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    async def post(
        self,
        path: str,
        body: bytes,
        sink: ResponseSink,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """POST ``body`` to ``path`` and hand the answer to ``sink``; returns when it is in.

        ``headers`` go with this request only, after the pool's own.

        Raises :class:`ConnectFailed`, :class:`ReadTimeout`, :class:`ConnectionLost`,
        :class:`BadResponse`, or what the sink raised; ``ValueError`` (before anything is sent)
        for a header or path that would split the request. Cancelled, the connection is dropped
        (the engine sees its client go and can abort the request).
        """
        head = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode("latin-1")
        await self._send("POST", path, sink, headers, head, body)

    async def get(self, path: str, sink: ResponseSink, headers: dict[str, str] | None = None) -> None:
        """GET ``path`` (its query string included) and hand the answer to ``sink``, as :meth:`post`
        does: for a long answer read as it comes, such as a server-sent events stream."""
        await self._send("GET", path, sink, headers, b"\r\n")

    async def _send(
        self, method: str, path: str, sink: ResponseSink, headers: dict[str, str] | None, *tail: bytes
    ) -> None:
        target = f"{self.prefix}{path}" or "/"  # the base URL's path, then this request's
        if not target.startswith("/") or _NOT_IN_TARGET.search(target):
            raise ValueError(
                f"path {target!r} cannot be sent: it must start with / and hold no space or control"
            )
        request = b"".join(
            (
                f"{method} {target} HTTP/1.1\r\n".encode("latin-1"),
                self._head,
                _header_lines(headers) if headers else b"",
                *tail,
            )
        )
        conn = await self._acquire()  # after the request is built: a refused header holds no connection
        assert self.loop is not None
        done: asyncio.Future[None] = self.loop.create_future()
        conn.start(request, sink, done, self.read_timeout_s)
        try:
            await done
        except asyncio.CancelledError:
            conn.abort()
            raise

    async def _acquire(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # first use, or a new loop: connections of the old one are gone
            self.loop, self._idle, self._all = loop, [], set()
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.abort()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout_s:g} s"
            ) from None
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {e}") from None
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if len(self._idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    @property
    def in_use(self) -> int:
        """Requests open on this pool's connections now."""
        return len(self._all) - len(self._idle)

    async def aclose(self) -> None:
        """Close every connection (requests still open end with :class:`ConnectionLost`)."""
        for conn in list(self._all):
            conn.abort()
        self._idle, self._all = [], set()


def _header_lines(headers: dict[str, str]) -> bytes:
    """``Name: value\\r\\n`` lines; a name or value that could split the request is refused."""
    out = []
    for k, v in headers.items():
        if any(c in k or c in v for c in "\r\n") or ":" in k:
            raise ValueError(
                f"header {k!r} cannot be sent: CR or LF in it, or ':' in its name, would split the request"
            )
        out.append(f"{k}: {v}\r\n")
    return "".join(out).encode("latin-1")


async def post_read(pool: StreamPool, path: str, body: bytes, limit: int = 64 << 20) -> tuple[int, bytes]:
    """POST ``body`` and read the whole answer (at most ``limit`` bytes): (status, body)."""
    sink = Collect(limit)
    await pool.post(path, body, sink)
    return sink.status, bytes(sink.data)

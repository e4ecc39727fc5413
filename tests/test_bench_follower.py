"""The bench's results-stream follower, against a real HTTP server on loopback: events split
across reads, when each arrived, a cut stream resumed, a cancel that stops it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from bench.paths import RunFollower

Writer = Callable[[bytes], Awaitable[None]]


def _event(eid: str, job_id: str) -> bytes:
    return f"id: {eid}\nevent: job\ndata: {json.dumps({'job_id': job_id, 'state': 'succeeded'})}\n\n".encode()


@asynccontextmanager
async def _sse_server(
    serve: Callable[[int, str, Writer], Awaitable[None]], status: int = 200
) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback HTTP/1.1 server: each request's target is recorded and its body is what
    ``serve(n, target, write)`` writes, chunked (``n`` counts the requests from 0)."""
    targets: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ")[1].decode()
            targets.append(target)
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-type: text/event-stream\r\n"
                "transfer-encoding: chunked\r\n\r\n".encode()
            )

            async def write(data: bytes) -> None:
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()

            await serve(len(targets) - 1, target, write)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", targets
    finally:
        server.close()


async def test_events_carry_the_arrival_of_their_read_and_may_span_reads() -> None:
    # A burst of results is one read: every event in it arrived then, whenever the bench's loop
    # gets round to the request waiting on it. An event cut across two reads arrived with the
    # second; keepalive comments are no events.
    third = _event("3-0", "j3")
    gap = 0.2

    async def serve(n: int, target: str, write: Writer) -> None:
        await write(_event("1-0", "j1") + _event("2-0", "j2") + third[:10])
        await asyncio.sleep(gap)
        await write(third[10:] + b": keepalive\n\n")
        await asyncio.sleep(30)  # the stream stays open

    async with _sse_server(serve) as (base, targets):
        f = RunFollower(base, "r1", {"Authorization": "Bearer k"})
        before = time.perf_counter()
        f.start()
        got = [await f.wait(j, 5.0) for j in ("j1", "j2", "j3")]
        await f.aclose()
    assert targets == ["/v1/runs/r1/results?after=0"]
    assert all(g is not None for g in got)
    (v1, a1), (v2, a2), (v3, a3) = got  # type: ignore[misc]
    assert [v1["job_id"], v2["job_id"], v3["job_id"]] == ["j1", "j2", "j3"]
    assert before <= a1 == a2 < a3  # the first two came in one read
    assert a3 - a1 >= gap * 0.9
    assert f._last == "3-0"


async def test_a_cut_stream_resumes_after_the_last_event() -> None:
    # The server ends the first stream after one event (ingestion restarted, say): the follower
    # asks again from that event on, and gets the next.
    async def serve(n: int, target: str, write: Writer) -> None:
        if n == 0:
            await write(_event("1-0", "j1"))
            return
        await write(_event("2-0", "j2"))
        await asyncio.sleep(30)

    async with _sse_server(serve) as (base, targets):
        f = RunFollower(base, "r1")
        f.start()
        assert await f.wait("j1", 5.0) is not None
        assert await f.wait("j2", 5.0) is not None
        await f.aclose()
    assert targets == ["/v1/runs/r1/results?after=0", "/v1/runs/r1/results?after=1-0"]


async def test_an_ingestion_without_the_stream_makes_callers_long_poll() -> None:
    # An older ingestion answers 404: the follower says so at once, and waiters stop waiting.
    async def serve(n: int, target: str, write: Writer) -> None:
        await write(b'{"detail":"Not Found"}')

    async with _sse_server(serve, status=404) as (base, _targets):
        f = RunFollower(base, "r1")
        f.start()
        assert await f.wait("j1", 5.0) is None
        assert f.available is False
        await f.aclose()


async def test_aclose_stops_the_follower_while_it_reads() -> None:
    # Cancelled in the middle of a stream, the follower stops there (no reconnect) and drops
    # its connection: the server sees it go.
    gone = asyncio.Event()

    async def serve(n: int, target: str, write: Writer) -> None:
        await write(_event("1-0", "j1"))
        try:
            while True:
                await asyncio.sleep(0.05)
                await write(b": keepalive\n\n")
        except ConnectionError:
            gone.set()
            raise

    async with _sse_server(serve) as (base, targets):
        f = RunFollower(base, "r1")
        f.start()
        assert await f.wait("j1", 5.0) is not None
        task = f._task
        assert task is not None
        await f.aclose()
        await asyncio.wait_for(gone.wait(), 5.0)
    assert task.done() and len(targets) == 1

"""The bench's results-stream follower, against a real HTTP server on loopback: events split
across reads, when each arrived, a cut stream resumed, a cancel that stops it."""

from __future__ import annotations

import asyncio
import json
import time

from bench.paths import RunFollower
from tests.loophttp import CHUNKED_HEAD, chunk, read_request, served


def _event(eid: str, job_id: str) -> bytes:
    return f"id: {eid}\nevent: job\ndata: {json.dumps({'job_id': job_id, 'state': 'succeeded'})}\n\n".encode()


async def test_events_carry_the_arrival_of_their_read_and_may_span_reads() -> None:
    # A burst of results is one read: every event in it arrived then, whenever the bench's loop
    # gets round to the request waiting on it. An event cut across two reads arrived with the
    # second; keepalive comments are no events.
    third = _event("3-0", "j3")
    gap = 0.2
    requests: list[tuple[str, dict[str, str], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await read_request(reader))
        writer.write(CHUNKED_HEAD + chunk(_event("1-0", "j1") + _event("2-0", "j2") + third[:10]))
        await asyncio.sleep(gap)
        writer.write(chunk(third[10:] + b": keepalive\n\n"))
        await reader.read()  # the stream stays open

    async with served(handler) as (engine, _pool):
        f = RunFollower(engine.url, "r1", {"Authorization": "Bearer k"})
        before = time.perf_counter()
        f.start()
        got = [await f.wait(j, 5.0) for j in ("j1", "j2", "j3")]
        await f.aclose()
    ((line, headers, _body),) = requests
    assert line == "GET /v1/runs/r1/results?after=0 HTTP/1.1" and headers["authorization"] == "Bearer k"
    assert all(g is not None for g in got)
    (v1, a1), (v2, a2), (v3, a3) = got  # type: ignore[misc]
    assert [v1["job_id"], v2["job_id"], v3["job_id"]] == ["j1", "j2", "j3"]
    assert before <= a1 == a2 < a3  # the first two came in one read
    assert a3 - a1 >= gap * 0.9
    assert f._last == "3-0"


async def test_a_cut_stream_resumes_after_the_last_event() -> None:
    # The server ends the first stream after one event (ingestion restarted, say): the follower
    # asks again from that event on, and gets the next.
    lines: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines.append((await read_request(reader))[0])
        if len(lines) == 1:
            writer.write(CHUNKED_HEAD + chunk(_event("1-0", "j1")) + chunk(b""))
            return
        writer.write(CHUNKED_HEAD + chunk(_event("2-0", "j2")))
        await reader.read()

    async with served(handler) as (engine, _pool):
        f = RunFollower(engine.url, "r1")
        f.start()
        assert await f.wait("j1", 5.0) is not None
        assert await f.wait("j2", 5.0) is not None
        await f.aclose()
    assert [line.split()[1] for line in lines] == [
        "/v1/runs/r1/results?after=0",
        "/v1/runs/r1/results?after=1-0",
    ]


async def test_an_ingestion_without_the_stream_makes_callers_long_poll() -> None:
    # An older ingestion answers 404: the follower says so at once, and waiters stop waiting.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 404 Not Found\r\ncontent-length: 22\r\n\r\n{"detail":"Not Found"}')
        await reader.read()

    async with served(handler) as (engine, _pool):
        f = RunFollower(engine.url, "r1")
        f.start()
        assert await f.wait("j1", 5.0) is None
        assert f.available is False
        await f.aclose()


async def test_aclose_stops_the_follower_while_it_reads() -> None:
    # Cancelled in the middle of a stream, the follower stops there (no reconnect) and drops
    # its connection: the server sees it go.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + chunk(_event("1-0", "j1")))
        await reader.read()  # until the client goes

    async with served(handler) as (engine, _pool):
        f = RunFollower(engine.url, "r1")
        f.start()
        assert await f.wait("j1", 5.0) is not None
        task = f._task
        assert task is not None
        await f.aclose()
        await asyncio.wait_for(engine.closed[0].wait(), 5.0)
    assert task.done() and engine.connections == 1

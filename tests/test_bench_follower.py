"""The bench's results-stream follower: events split across chunks, and when each arrived."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx

from bench.paths import RunFollower


def _event(eid: str, job_id: str) -> bytes:
    return f"id: {eid}\nevent: job\ndata: {json.dumps({'job_id': job_id, 'state': 'succeeded'})}\n\n".encode()


async def test_events_carry_the_arrival_of_their_chunk_and_may_span_chunks() -> None:
    # A burst of results is one chunk: every event in it arrived then, whenever the bench's
    # loop gets round to the request waiting on it. An event cut across two chunks arrived
    # with the second; keepalive comments are no events.
    third = _event("3-0", "j3")
    gap = 0.2

    async def body() -> AsyncIterator[bytes]:
        yield _event("1-0", "j1") + _event("2-0", "j2") + third[:10]
        await asyncio.sleep(gap)
        yield third[10:] + b": keepalive\n\n"
        await asyncio.sleep(30)  # the stream stays open

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/runs/r1/results"
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        f = RunFollower(client, "http://ingestion", "r1")
        before = time.perf_counter()
        f.start()
        got = [await f.wait(j, 5.0) for j in ("j1", "j2", "j3")]
        await f.aclose()
    assert all(g is not None for g in got)
    (v1, a1), (v2, a2), (v3, a3) = got  # type: ignore[misc]
    assert [v1["job_id"], v2["job_id"], v3["job_id"]] == ["j1", "j2", "j3"]
    assert before <= a1 == a2 < a3  # the first two came in one chunk
    assert a3 - a1 >= gap * 0.9
    assert f._last == "3-0"  # a cut connection would resume after the last event


async def test_aclose_stops_the_follower_when_the_cancel_comes_out_as_a_transport_error() -> None:
    # A cancel met while reading the stream can surface as an httpx transport error; the follower
    # must stop there, not reconnect (aclose, waiting for it, would never return).
    connects = 0

    async def body() -> AsyncIterator[bytes]:
        yield _event("1-0", "j1")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise httpx.ReadError("read cut by the cancel") from None

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal connects
        connects += 1
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        f = RunFollower(client, "http://ingestion", "r1")
        f.start()
        assert await f.wait("j1", 5.0) is not None
        task = f._task
        assert task is not None
        await f.aclose()
    assert task.done() and connects == 1

"""The streamed-POST client the engine token streams go over (``services/stream_http.py``).

A loopback server written per test plays the engine's side byte by byte: chunked and
length-delimited answers, answers that end with the connection, a head and then silence, a
cut, bytes that are not HTTP. Every test runs on asyncio's loop (the bench) and on uvloop (the
inference worker), whose transports differ.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from services import stream_http
from services.engine_client import EngineClient, EngineError
from services.stream_http import StreamPool
from tests.loophttp import CHUNKED_HEAD, Handler, chunk, read_request, served


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Runs a test's body on asyncio's loop (as the bench does) or on uvloop (the worker)."""
    return uvloop.run if request.param == "uvloop" else asyncio.run  # type: ignore[return-value]


def holding(first: bytes) -> Handler:
    """A handler that answers the head and ``first`` (one chunk), then nothing until the client goes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + chunk(first))
        await reader.read()

    return handler


class Collect:
    """A sink that keeps what it is handed; ``enough`` ends it early at a marker."""

    def __init__(self, enough: bytes | None = None, fail_at: bytes | None = None) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.data = b""
        self.ended = False
        self.enough, self.fail_at = enough, fail_at
        self.got = asyncio.Event()

    def head(self, status: int, reason: str, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers

    def body(self, data: bytes, now: float) -> bool:
        self.data += data
        self.got.set()
        if self.fail_at is not None and self.fail_at in self.data:
            raise ValueError("the sink gave up")
        return self.enough is not None and self.enough in self.data

    def end(self) -> None:
        self.ended = True


def test_a_chunked_stream_arrives_piece_by_piece_and_its_connection_serves_the_next(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                line, headers, body = await read_request(reader)
                assert line == "POST /base/v1/completions HTTP/1.1" and headers["authorization"] == "Bearer k"
                assert headers["content-type"] == "application/json" and json.loads(body) == {"n": 1}
                writer.write(CHUNKED_HEAD)
                for piece in (b"data: a\n\n", b"data: b\n\n"):
                    writer.write(chunk(piece))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                writer.write(b"0\r\n\r\n")

        async with served(handler, "/base", {"Authorization": "Bearer k"}) as (engine, pool):
            for _ in range(3):
                sink = Collect()
                await pool.post("/v1/completions", b'{"n": 1}', sink)
                assert (sink.status, sink.headers["x-job-id"], sink.data, sink.ended) == (
                    200,
                    "j7",
                    b"data: a\n\ndata: b\n\n",
                    True,
                )
            assert engine.connections == 1

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nno model!",
        b"HTTP/1.0 404 Not Found\r\n\r\nno model!",  # no length: the body ends with the connection
    ],
)
def test_bodies_with_a_length_or_ending_with_the_connection(
    run: Callable[[Coroutine[Any, Any, None]], None], answer: bytes
) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
            if b"content-length" in answer:
                await read_request(reader)  # kept alive: a second request on the same connection
                writer.write(answer)

        async with served(handler) as (engine, pool):
            for _ in range(2):
                sink = Collect()
                await pool.post("/x", b"{}", sink)
                assert (sink.status, sink.data, sink.ended) == (404, b"no model!", True)
            assert engine.connections == (1 if b"content-length" in answer else 2)

    run(main())


def test_silence_after_the_head_is_a_read_timeout(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def main() -> None:
        async with served(holding(b"data: a\n\n"), read_timeout_s=0.3) as (engine, pool):
            sink = Collect()
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(stream_http.ReadTimeout, match=r"nothing arrived for 0.3 s"):
                await pool.post("/x", b"{}", sink)
            assert 0.25 < asyncio.get_running_loop().time() - t0 < 2
            assert sink.data == b"data: a\n\n"
            await asyncio.wait_for(engine.closed[0].wait(), 2)  # the engine sees its client go

    run(main())


def test_reads_that_keep_coming_are_not_a_timeout(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def main() -> None:
        # One timer a request, re-armed when it fires early: a stream longer than the timeout whose
        # pieces come closer together than it is not cut.
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(CHUNKED_HEAD)
            for _ in range(8):
                writer.write(chunk(b"data: a\n\n"))
                await asyncio.sleep(0.1)
            writer.write(b"0\r\n\r\n")

        async with served(handler, read_timeout_s=0.3) as (_engine, pool):
            sink = Collect()
            await pool.post("/x", b"{}", sink)
            assert sink.data.count(b"data: a") == 8 and sink.ended

    run(main())


def test_a_cut_mid_body_is_a_lost_connection_and_bytes_that_are_not_http_a_bad_response(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        answers = iter([CHUNKED_HEAD + chunk(b"data: a\n\n"), b"SSH-2.0-OpenSSH_9.2\r\n"])

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(next(answers))
            await writer.drain()

        async with served(handler) as (engine, pool):
            with pytest.raises(stream_http.ConnectionLost, match="closed before the answer ended"):
                await pool.post("/x", b"{}", Collect())
            with pytest.raises(stream_http.BadResponse, match="unreadable HTTP response"):
                await pool.post("/x", b"{}", Collect())
            assert engine.connections == 2

    run(main())


def test_nothing_listening_is_a_failed_connect(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def main() -> None:
        pool = StreamPool("http://127.0.0.1:1")
        with pytest.raises(stream_http.ConnectFailed, match=r"cannot connect to 127\.0\.0\.1:1"):
            await pool.post("/x", b"{}", Collect())

    run(main())


def test_a_sink_error_ends_the_request_with_it_and_drops_the_connection(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        async with served(holding(b"data: bad\n\n")) as (engine, pool):
            with pytest.raises(ValueError, match="the sink gave up"):
                await pool.post("/x", b"{}", Collect(fail_at=b"bad"))
            await asyncio.wait_for(engine.closed[0].wait(), 2)

    run(main())


def test_a_cancelled_request_drops_its_connection(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def main() -> None:
        async with served(holding(b"data: a\n\n")) as (engine, pool):
            sink = Collect()
            task = asyncio.create_task(pool.post("/x", b"{}", sink))
            await asyncio.wait_for(sink.got.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The engine sees its client go (vLLM aborts the request then).
            await asyncio.wait_for(engine.closed[0].wait(), 2)

    run(main())


def test_once_the_sink_has_enough_an_unended_body_is_given_up_after_the_drain(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        async with served(holding(b"data: [DONE]\n\n")) as (engine, pool):  # and never the last chunk
            sink = Collect(enough=b"[DONE]")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await pool.post("/x", b"{}", sink)  # the answer is in: no error
            assert stream_http.DRAIN_S * 0.8 < loop.time() - t0 < stream_http.DRAIN_S + 1
            assert not sink.ended
            await asyncio.wait_for(engine.closed[0].wait(), 2)  # not kept for the next request

    run(main())


def test_a_connection_the_engine_closed_while_idle_is_not_reused(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()  # then closes: the engine's keep-alive ran out

        async with served(handler) as (engine, pool):
            for _ in range(3):
                sink = Collect()
                await pool.post("/x", b"{}", sink)
                assert sink.data == b"ok"
                await asyncio.wait_for(engine.closed[-1].wait(), 2)
                await asyncio.sleep(0.05)  # the close reaches the client
            assert engine.connections == 3

    run(main())


def test_the_engine_client_says_what_went_wrong(run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    async def main() -> None:
        # Each failure of the transport becomes an EngineError with its kind: retryable, and
        # "unavailable" (backpressure, not a used-up attempt) only when nothing could connect.
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line, _, _ = await read_request(reader)
            if line.startswith("GET"):
                body = b'{"data": [{"id": "m"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                line, _, _ = await read_request(reader)
            err = json.dumps({"error": {"message": "prompt too long", "code": 400}}).encode()
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n%s" % (len(err), err))

        async with served(handler) as (engine, _pool):
            client = EngineClient(engine.url, timeout_s=5)
            try:
                with pytest.raises(EngineError) as bad:
                    await client.stream_completion([1, 2], 2)
                assert bad.value.status == 400 and not bad.value.retryable
                assert "engine 400 on /v1/completions: prompt too long" in str(bad.value)
            finally:
                await client.aclose()
            down = EngineClient("http://127.0.0.1:1", timeout_s=5)
            down._model = "m"  # skip /v1/models: the stream's own connect fails
            try:
                with pytest.raises(EngineError) as unreachable:
                    await down.stream_completion([1], 1)
                assert unreachable.value.unavailable and unreachable.value.retryable
                assert "engine not reachable at http://127.0.0.1:1" in str(unreachable.value)
            finally:
                await down.aclose()

    run(main())


def test_a_whole_answer_is_read_and_one_past_the_limit_refused(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    # The proxy reads the worker's whole answer (its result) this way, bounded.
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(CHUNKED_HEAD + chunk(b"x" * 600) + chunk(b"y" * 600) + b"0\r\n\r\n")

        async with served(handler) as (engine, pool):
            status, body = await stream_http.post_read(pool, "/v1/infer", b"{}")
            assert (status, body) == (200, b"x" * 600 + b"y" * 600)
            with pytest.raises(stream_http.BadResponse, match="an answer over 1000 bytes"):
                await stream_http.post_read(pool, "/v1/infer", b"{}", limit=1000)
            status, body = await stream_http.post_read(pool, "/v1/infer", b"{}")
            assert len(body) == 1200 and engine.connections == 2  # the refused one was dropped

    run(main())


@pytest.mark.slow  # starts a uvicorn server and the script
def test_the_hop_client_script_compares_both_clients_and_refuses_bad_arguments() -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "hop_client.py"
    args = [sys.executable, str(script), "--rounds", "1", "--wave", "2", "--waves", "3"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"round 1: aiohttp +\d+\.\d +stream_http +\d+\.\d", out.stdout), out.stdout
    bad = subprocess.run(
        [sys.executable, str(script), "--wave", "0"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--wave" in bad.stderr


def test_a_url_this_client_cannot_reach_is_refused_as_its_own_error() -> None:
    # The proxy reads it as a failed hop (StreamHttpError), not as a crash of its job loop.
    for url in ("ftp://127.0.0.1:21", "http://", "127.0.0.1:8001"):
        with pytest.raises(stream_http.BadURL, match="not an http"):
            StreamPool(url)
    assert issubclass(stream_http.BadURL, stream_http.StreamHttpError)


def test_a_request_s_own_headers_go_with_it_only_and_the_answer_keeps_its_headers(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    # The bench's submits: an Idempotency-Key per request, the pool's Authorization on all, and
    # the answer's Retry-After read back.
    async def main() -> None:
        seen: list[dict[str, str]] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                _line, headers, _body = await read_request(reader)
                seen.append(headers)
                writer.write(
                    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\ncontent-length: 2\r\n\r\n{}"
                )

        async with served(handler, headers={"Authorization": "Bearer k"}) as (engine, pool):
            first = stream_http.Collect(100)
            await pool.post("/v1/jobs", b"{}", first, headers={"Idempotency-Key": "run.1"})
            second = stream_http.Collect(100)
            await pool.post("/v1/jobs", b"{}", second)
            assert (first.status, first.reason, first.headers["retry-after"], bytes(first.data)) == (
                429,
                "Too Many Requests",
                "3",
                b"{}",
            )
            assert seen[0]["idempotency-key"] == "run.1" and "idempotency-key" not in seen[1]
            assert seen[0]["authorization"] == seen[1]["authorization"] == "Bearer k"
            assert engine.connections == 1
            for bad in ({"X-A": "1\r\nX-B: 2"}, {"X-A\n": "1"}, {"X:A": "1"}):
                with pytest.raises(ValueError, match="would split the request"):
                    await pool.post("/v1/jobs", b"{}", stream_http.Collect(100), headers=bad)
            with pytest.raises(ValueError, match="would split the request"):
                StreamPool(engine.url, {"Authorization": "Bearer k\r\nX: y"})
            assert len(seen) == 2  # nothing refused was sent
            await pool.post("/v1/jobs", b"{}", stream_http.Collect(100))
            assert len(seen) == 3 and engine.connections == 1  # and the refusals held no connection

    run(main())


def test_a_get_sends_no_body_and_a_path_that_would_split_the_request_is_refused(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    # The bench follows a run's results with a GET (query string kept, no body, no content
    # headers); a path with a space or a control character never leaves the client.
    async def main() -> None:
        seen: list[tuple[str, dict[str, str], bytes]] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                seen.append(await read_request(reader))
                writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n") + chunk(b""))

        async with served(handler, prefix="/api", headers={"Authorization": "Bearer k"}) as (engine, pool):
            sink = Collect()
            await pool.get("/v1/runs/r1/results?after=1-0", sink)
            assert (sink.status, sink.data, sink.ended) == (200, b"data: 1\n\n", True)
            line, headers, body = seen[0]
            assert line == "GET /api/v1/runs/r1/results?after=1-0 HTTP/1.1"
            assert body == b"" and "content-length" not in headers and "content-type" not in headers
            assert headers["authorization"] == "Bearer k"
            for bad in ("/v1/a b", "/v1/a\r\nX: y", "/v1/\x7f"):
                with pytest.raises(ValueError, match="cannot be sent"):
                    await pool.get(bad, Collect())
                with pytest.raises(ValueError, match="cannot be sent"):
                    await pool.post(bad, b"{}", Collect())
            bare = StreamPool(engine.url)
            with pytest.raises(ValueError, match="cannot be sent"):
                await bare.get("v1/no-slash", Collect())
            await pool.post("", b"{}", Collect())  # the base URL's own path: a skeleton worker's
            assert len(seen) == 2 and engine.connections == 1  # the refusals sent nothing
            assert seen[1][0] == "POST /api HTTP/1.1"

    run(main())

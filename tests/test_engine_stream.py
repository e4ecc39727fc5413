"""The engine client's stream parse against an engine that misbehaves in ways a real one can.

A loopback HTTP server plays back scripted ``/v1/completions`` streams (the real engines cannot
be made to send these on demand): empty-text token chunks, a cut before ``[DONE]``, malformed
events, error events with their status.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.engine_client import EngineClient, EngineError


def _tok(text: str, finish: str | None = None) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


USAGE = "data: " + json.dumps(
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "prompt_tokens_details": None}}
)
DONE = "data: [DONE]"


Step = str | bytes | float | threading.Event


class ScriptedEngine:
    """Serves ``/v1/models`` and plays ``script`` for completions.

    A step is an SSE line (its blank line added), raw bytes (written as they are), a float
    (sleep), or an event: the stream holds until the test sets it (at most 10 s; :attr:`held`
    records whether it was set in time, and :attr:`sent_ns` when each following line went out).
    """

    def __init__(self) -> None:
        self.script: list[Step] = []
        self.held: list[bool] = []
        self.sent_ns: list[int] = []
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps({"data": [{"id": "scripted"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # no length: the stream ends when the connection closes
                for step in engine.script:
                    if isinstance(step, float):
                        time.sleep(step)
                        continue
                    if isinstance(step, threading.Event):
                        engine.held.append(step.wait(10))
                        continue
                    engine.sent_ns.append(time.time_ns())
                    self.wfile.write(step if isinstance(step, bytes) else f"{step}\n\n".encode())
                    self.wfile.flush()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        """Base URL."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def engine() -> Iterator[ScriptedEngine]:
    e = ScriptedEngine()
    yield e
    e.server.shutdown()
    e.server.server_close()


async def _stream(
    engine: ScriptedEngine, script: list[Step], on_first_token: Any = None, text_chars: int | None = None
) -> Any:
    engine.script, engine.held, engine.sent_ns = script, [], []
    client = EngineClient(engine.url, timeout_s=10)
    try:
        return await client.stream_completion(
            [1, 2, 3], 4, on_first_token=on_first_token, text_chars=text_chars
        )
    finally:
        await client.aclose()


#: Whole parse of every chunk (None), and the lazy path that keeps no text (0) or a little (1).
TEXT_KEPT = pytest.mark.parametrize("text_chars", [None, 0, 1])


@TEXT_KEPT
async def test_empty_text_chunks_are_tokens(engine: ScriptedEngine, text_chars: int | None) -> None:
    # vLLM sends a chunk for a token whose text is empty (a special token under ignore_eos, half a
    # UTF-8 character); its benchmark counts it for TTFT and ITL, and so does this client.
    # The stream holds after the empty token until the client has taken its first token: the
    # order of events, not a duration, shows which chunk started the clock.
    first = threading.Event()
    script: list[Step] = [_tok(""), first, _tok("a"), _tok(""), _tok("b", "length"), USAGE, DONE]
    res = await _stream(engine, script, on_first_token=first.set, text_chars=text_chars)
    assert engine.held == [True], "the first token was not taken at the empty chunk"
    assert res.t_first_token < engine.sent_ns[1]  # before "a" was even sent
    assert res.chunks == 4 and len(res.itl_s) == 3
    assert res.text == "ab"[:text_chars]
    assert (res.prompt_tokens, res.completion_tokens, res.finish_reason) == (7, 4, "length")


@TEXT_KEPT
async def test_events_cut_across_reads_and_a_last_line_without_its_newline_are_read(
    engine: ScriptedEngine, text_chars: int | None
) -> None:
    # The client splits what it reads into lines itself: an event may come in pieces (a pause
    # between them forces two reads), several may come in one read, and the body may end on
    # a line with no newline after it.
    a = f"{_tok('a')}\n\n".encode()
    script: list[Step] = [a[:20], 0.05, a[20:] + a[:-2], 0.05, b"\r\n\r\n", _tok("b", "length"), USAGE]
    res = await _stream(engine, [*script, DONE.encode()], text_chars=text_chars)
    assert res.chunks == 3 and len(res.itl_s) == 2
    assert res.text == "aab"[:text_chars]
    assert (res.completion_tokens, res.finish_reason) == (4, "length")


async def test_a_stream_line_past_the_bound_is_an_engine_error(engine: ScriptedEngine) -> None:
    # A broken engine that never ends its line must not grow the worker's buffer without end.
    from services.engine_client import MAX_EVENT_BYTES

    long = b"data: " + b"x" * (MAX_EVENT_BYTES // 4)
    with pytest.raises(EngineError) as err:
        await _stream(engine, [_tok("a"), long, long, long, long, long, DONE])
    assert f"over {MAX_EVENT_BYTES} bytes" in str(err.value) and err.value.retryable


async def test_a_stream_cut_before_done_is_a_retryable_error(engine: ScriptedEngine) -> None:
    with pytest.raises(EngineError) as err:
        await _stream(engine, [_tok("a"), _tok("b")])
    assert "ended before [DONE] after 2 token chunks" in str(err.value)
    assert err.value.retryable and not err.value.overloaded


@TEXT_KEPT
@pytest.mark.parametrize("event", ["data: {trunc", "data: null", "data: [1, 2]"])
async def test_malformed_events_are_retryable_engine_errors(
    engine: ScriptedEngine, event: str, text_chars: int | None
) -> None:
    with pytest.raises(EngineError) as err:
        await _stream(engine, [_tok("a"), event, DONE], text_chars=text_chars)
    assert "engine sent a" in str(err.value) and err.value.retryable


@pytest.mark.parametrize(
    ("error", "status", "overloaded", "retryable"),
    [
        ({"error": {"message": "aborted", "type": "ServiceUnavailableError", "code": 503}}, 503, True, True),
        ({"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}, 400, False, False),
        ({"error": {"message": "boom"}}, 500, False, True),
    ],
)
@TEXT_KEPT
async def test_error_events_keep_their_status(
    engine: ScriptedEngine,
    error: dict[str, Any],
    status: int,
    overloaded: bool,
    retryable: bool,
    text_chars: int | None,
) -> None:
    with pytest.raises(EngineError) as err:
        await _stream(
            engine, [_tok("a"), _tok("b"), "data: " + json.dumps(error), DONE], text_chars=text_chars
        )
    assert err.value.status == status
    assert (err.value.overloaded, err.value.retryable) == (overloaded, retryable)


async def test_no_token_at_all_returns_zero_chunks_for_the_caller_to_refuse(engine: ScriptedEngine) -> None:
    res = await _stream(engine, [DONE])
    assert res.chunks == 0 and res.completion_tokens is None


@pytest.mark.parametrize(
    ("script", "why"),
    [([DONE], "without any token"), ([_tok("a"), _tok("b", "length"), DONE], "without usage")],
)
async def test_the_worker_refuses_an_answer_without_tokens_or_usage(
    engine: ScriptedEngine, script: list[Step], why: str
) -> None:
    # Such an answer must not become a succeeded job with 0 tokens: a retryable 502 instead.
    import httpx

    from services.inference_worker import create_app
    from services.settings import Settings

    engine.script = script
    port = int(engine.url.rsplit(":", 1)[1])
    app = create_app(Settings(_env_file=None, engine_port=port))  # type: ignore[call-arg]
    body = {
        "spec": {
            "job_id": "j1",
            "input_tokens": None,
            "output_tokens": 2,
            "prefix_share": 0.5,
            "prompt": "hi",
            "seed": 1,
        },
        "attempt": 1,
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as c:
        resp = await c.post("/v1/infer", json=body)
    await app.state.worker.engine.aclose()
    assert resp.status_code == 502, resp.text
    assert why in resp.json()["detail"] and resp.json()["retryable"] is True


async def test_the_workers_infer_fast_path_answers_well_formed_requests_and_leaves_refusals_to_the_route(
    engine: ScriptedEngine,
) -> None:
    # POST /v1/infer is served without FastAPI's layers when authorised and valid; a wrong key or
    # a bad body goes on to the FastAPI route, whose refusals (401, 422 field by field) stay as
    # documented. The route's own ASGI app counts what reaches it.
    import httpx

    from services.inference_worker import _INFER_BODY_MAX, INFER_PATH, create_app
    from services.settings import Settings

    engine.script = [_tok("a"), _tok("b"), _tok("c"), _tok("d", "length"), USAGE, DONE]
    port = int(engine.url.rsplit(":", 1)[1])
    app = create_app(Settings(_env_file=None, engine_port=port, worker_api_key="wk"))  # type: ignore[call-arg]
    (route,) = [r for r in app.router.routes if getattr(r, "path", "") == INFER_PATH]
    reached: list[str] = []
    route_app = route.app  # type: ignore[attr-defined]

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await route_app(scope, receive, send)

    route.app = counting  # type: ignore[attr-defined]
    spec = {"job_id": "j1", "input_tokens": None, "output_tokens": 4, "prefix_share": 0.5, "prompt": "hi"}
    body = {"spec": {**spec, "seed": 1}, "attempt": 1}
    key = {"Authorization": "Bearer wk"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://worker") as c:
        ok = await c.post(INFER_PATH, json=body, headers=key)
        assert ok.status_code == 200, ok.text
        assert (
            ok.json()["completion_tokens"] == 4 and ok.json()["t_engine_end"] >= ok.json()["t_engine_start"]
        )
        assert reached == []  # answered by the fast path
        wrong = await c.post(INFER_PATH, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "WORKER_API_KEY" in wrong.json()["detail"]
        bad = await c.post(INFER_PATH, json={"spec": spec, "attempt": 1}, headers=key)  # no seed
        assert bad.status_code == 422
        assert any("seed" in [str(x) for x in e["loc"]] for e in bad.json()["detail"])
        assert reached == [INFER_PATH, INFER_PATH]  # both refusals came from the route
        # Past the bound: refused with what to fix, not the route's verdict on a cut body; with
        # or without the key (the route has no bound of its own: it never reads such a body).
        big = {**body, "spec": {**body["spec"], "prompt": "x" * (_INFER_BODY_MAX + 1)}}
        for headers in (key, {"Authorization": "Bearer nope"}):
            huge = await c.post(INFER_PATH, json=big, headers=headers)
            assert huge.status_code == 413 and f"over {_INFER_BODY_MAX} bytes" in huge.json()["detail"]
        assert reached == [INFER_PATH, INFER_PATH]
    await app.state.worker.engine.aclose()


def test_plain_token_chunks_are_recognised_by_bytes_alone() -> None:
    """The lazy path skips a chunk's parse only when it is a token chunk with nothing else in it;
    text that spells the key patterns is escaped JSON and never matches."""
    from services.engine_client import _plain_token_chunk

    def chunk(text: str, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
        body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": usage}
        return json.dumps(body).encode()

    assert _plain_token_chunk(chunk("hello"))
    assert _plain_token_chunk(
        json.dumps({"choices": [{"text": "x", "finish_reason": None}]}, separators=(",", ":")).encode()
    )
    assert not _plain_token_chunk(chunk("end", finish="length"))
    assert not _plain_token_chunk(chunk("", usage={"prompt_tokens": 3, "completion_tokens": 2}))
    assert not _plain_token_chunk(json.dumps({"error": {"message": "boom", "code": 500}}).encode())
    assert not _plain_token_chunk(json.dumps({"choices": [], "usage": {"completion_tokens": 2}}).encode())
    # Generated text that spells the patterns is escaped inside its JSON string.
    sneaky = chunk('"finish_reason": "stop", "usage": {"x": 1}, "error"', finish="stop")
    assert not _plain_token_chunk(sneaky)
    assert _plain_token_chunk(chunk('"error" "usage": {'))

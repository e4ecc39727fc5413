"""Ingestion: the FastAPI service that accepts jobs.

``POST /v1/jobs`` validates, mints an id and writes the job hash and its
stream entry in one Lua script, answering ``202 {job_id}`` at once.
``GET /v1/jobs/{id}?wait=S`` long-polls on the job-event channel, so clients
need no busy loop. Above the active-job bound it answers 429 with
``Retry-After``; when Redis is down, 503 within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services import asgi, openai_api, procstats, prom, runtime
from services.admission import REDIS_DOWN_DETAIL, Refusal, enqueue, key_ok, live_nodes
from services.contracts import (
    ID_PATTERN,
    MAX_BODY_BYTES,
    MAX_WAIT_S,
    TERMINAL_STATES,
    JobAccepted,
    JobRequest,
    JobSpec,
    JobState,
    JobView,
    Keys,
    job_hash_to_view,
    new_id,
    now_ns,
)
from services.queue import REDIS_DOWN, JobQueue, redis_client
from services.retention import MemoryGauge
from services.settings import Settings, get_settings

log = logging.getLogger("llmconsole.ingestion")

IDEMPOTENCY_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
_IDEM_RE = re.compile(IDEMPOTENCY_PATTERN)


class Waiters:
    """Wakes long-polling requests when their job changes state.

    One pub/sub subscription per process feeds per-job asyncio events, so a thousand waiting
    clients cost one Redis connection, not a thousand polls. It is held only while someone waits
    (and ``linger_s`` after): every job publishes each change of state, and reading those
    messages cost ingestion about a tenth of its CPU per job in a benchmark, whose client follows
    its run's results stream instead (README, "Ninth round").

    A waiter clears its event *before* it reads the job, then waits: a change that lands after the
    read wakes it, and a subscription that begins late wakes every waiter once it is in place
    (they read again), so nothing published while it was being made is missed.
    """

    def __init__(
        self, follow: Callable[[], Coroutine[Any, Any, None]] | None = None, linger_s: float = 30.0
    ) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self._follow = follow
        self.linger_s = linger_s
        self._task: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None

    @property
    def following(self) -> bool:
        """Whether the subscription is held (or being made) now."""
        return self._task is not None and not self._task.done()

    def add(self, job_id: str) -> asyncio.Event:
        """Register interest in ``job_id``; the returned event fires on its next change."""
        ev = asyncio.Event()
        self._events.setdefault(job_id, set()).add(ev)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._follow is not None and not self.following:
            self._task = asyncio.create_task(self._follow())
        return ev

    def remove(self, job_id: str, ev: asyncio.Event) -> None:
        """Forget a waiter; the last one leaving lets the subscription go after ``linger_s``."""
        evs = self._events.get(job_id)
        if evs is not None:
            evs.discard(ev)
            if not evs:
                del self._events[job_id]
        if not self._events and self.following and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(self.linger_s, self._unfollow)

    def _unfollow(self) -> None:
        self._linger = None
        if not self._events and self._task is not None:
            self._task.cancel()
            self._task = None

    async def aclose(self) -> None:
        """Drop the subscription now (shutdown)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._task is not None:
            await runtime.cancel_and_wait(self._task)
            self._task = None

    def notify(self, job_id: str) -> None:
        """Wake every waiter of ``job_id``."""
        for ev in self._events.get(job_id, ()):
            ev.set()

    def notify_all(self) -> None:
        """Wake everyone (after a lost subscription: they re-read the hash)."""
        for evs in self._events.values():
            for ev in evs:
                ev.set()


async def _listen(app: FastAPI) -> None:
    """Feed :class:`Waiters` from the job-event channel; reconnect until cancelled."""
    s: Settings = app.state.settings
    keys: Keys = app.state.keys
    waiters: Waiters = app.state.waiters
    while True:
        r = redis_client(s, blocking=True)
        try:
            async with r.pubsub() as ps:
                await ps.subscribe(keys.events)
                waiters.notify_all()  # what changed before the subscription held is read again
                async for msg in ps.listen():
                    if msg.get("type") != "message":
                        continue
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        waiters.notify(json.loads(msg["data"])["job_id"])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # Redis down or restarted: retry, waiters re-read
            log.info("event subscription lost (%s); retrying", e.__class__.__name__)
            waiters.notify_all()
            await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await r.aclose()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    s: Settings = app.state.settings
    reporter = asyncio.create_task(
        procstats.publish_forever(app.state.redis, app.state.keys, "ingestion", s.effective_node_id)
    )
    gauge = asyncio.create_task(app.state.memory.run_forever())
    try:
        yield
    finally:
        await app.state.waiters.aclose()
        for task in (reporter, gauge):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await openai_api.aclose(app)
        await app.state.redis.aclose()


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API_KEY>")
_x_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: <API_KEY>")


async def _require_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    x_api_key: Annotated[str | None, Depends(_x_api_key)],
) -> None:
    """Check the API key in constant time (skipped when none is configured).

    ``bearer`` and ``x_api_key`` declare the two schemes in the OpenAPI schema; the check itself
    is :func:`services.admission.key_ok`, shared with the submit fast path and the OpenAI door.
    """
    del bearer
    if not key_ok(request.app.state.settings, request.headers.get("authorization"), x_api_key):
        raise HTTPException(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <API_KEY>' (the key is in var/llmconsole.env)",
            headers={"WWW-Authenticate": "Bearer"},
        )


class BodyLimit:
    """Pure ASGI middleware: refuse oversized bodies before reading them (413), and answer 503
    when Redis is down wherever the handler was.

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every
    request through an extra task and memory streams, a large share of ingestion's per-request
    cost (measured with py-spy on a real run).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared (or, when chunked, the actual) body size, then run the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
                break
        if length is not None:
            if not length.isdigit():
                await asgi.send_response(
                    send, JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)
                )
                return
            if int(length) > MAX_BODY_BYTES:
                detail = f"request body too large: {length.decode()} bytes, limit {MAX_BODY_BYTES}"
                await asgi.send_response(send, JSONResponse({"detail": detail}, status_code=413))
                return
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            # No length announced (chunked): read it here, bounded, and hand the app the buffer.
            body = bytearray()
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # the client went away
                body += msg.get("body", b"")
                if len(body) > MAX_BODY_BYTES:
                    detail = f"request body over {MAX_BODY_BYTES} bytes"
                    await asgi.send_response(send, JSONResponse({"detail": detail}, status_code=413))
                    return
                if not msg.get("more_body"):
                    break
            receive = asgi.replay(bytes(body), receive)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if scope["method"] == "POST" and scope["path"] == SUBMIT_PATH:
                replay = await _fast_submit(scope, receive, tracking_send)
                if replay is None:
                    return
                receive = replay
            await self.app(scope, receive, tracking_send)
        except REDIS_DOWN:
            if started:
                raise
            await asgi.send_response(send, _redis_down())
        except RuntimeError as e:
            # Under uvloop a command on a connection Redis just closed (a restart) raises this
            # instead of a ConnectionError: the same "Redis is down", not a server error.
            if started or "closed" not in str(e):
                raise
            await asgi.send_response(send, _redis_down())


#: The submit route, served by :func:`_fast_submit` when the request is well-formed.
SUBMIT_PATH = "/v1/jobs"


async def _fast_submit(scope: Scope, receive: Receive, send: Send) -> Receive | None:
    """``POST /v1/jobs`` without FastAPI's routing and dependency machinery, for well-formed
    requests; anything else goes to the FastAPI route, which answers it as before.

    Why: under wrk, py-spy put about half of ingestion's samples in Starlette/FastAPI's
    per-request layers (exception middlewares, routing, dependency solving for the two auth
    schemes and the header) around a handler whose own work is one Redis round trip. This path
    does only what the route checks: the API key (constant time), a JSON content type, the
    ``Idempotency-Key`` pattern and ``JobRequest`` validation (pydantic, from the raw bytes),
    then the same :func:`_accept`. When any check fails it answers nothing and returns a
    ``receive`` that replays the body, so every refusal (401, 422 with its field-by-field
    message, ...) keeps coming from the route and stays exactly as documented in the OpenAPI
    schema. Returns None when it answered (or the client left).
    """
    t_received = now_ns()
    got = await asgi.read_body(receive, MAX_BODY_BYTES)
    if got is None:
        return None  # the client went away before sending its body
    body, over = got
    if over:  # over the bound (a chunked body: a declared one was refused above)
        detail = f"request body over {MAX_BODY_BYTES} bytes"
        await asgi.send_response(send, JSONResponse({"detail": detail}, status_code=413))
        return None
    replay = asgi.replay(body, receive)
    app: FastAPI = scope["app"]
    auth = api_key = ctype = idem = None
    for name, value in scope["headers"]:
        # The first of each, as Starlette's Headers.get (what the route reads) takes it.
        if name == b"authorization" and auth is None:
            auth = value
        elif name == b"x-api-key" and api_key is None:
            api_key = value
        elif name == b"content-type" and ctype is None:
            ctype = value
        elif name == b"idempotency-key" and idem is None:
            idem = value
    if not key_ok(
        app.state.settings,
        auth.decode("latin-1") if auth is not None else None,
        api_key.decode("latin-1") if api_key is not None else None,
    ):
        return replay
    if ctype is None or ctype.partition(b";")[0].strip().lower() != b"application/json":
        return replay
    idempotency_key: str | None = None
    if idem is not None:
        idempotency_key = idem.decode("latin-1")
        if not _IDEM_RE.match(idempotency_key):
            return replay
    try:
        job = JobRequest.model_validate_json(body)
    except ValueError:  # pydantic's ValidationError included
        return replay
    out = await _accept(app, job, idempotency_key, t_received)
    if isinstance(out, Response):
        await out(scope, asgi.no_receive, send)
        return None
    await asgi.send_json(send, 202, out.model_dump_json().encode())
    return None


#: Result streams one ingestion process serves at once (each holds a blocking Redis read).
MAX_RESULT_STREAMS = 256
#: A Redis stream entry id, or '0' (from the start).
STREAM_ID_PATTERN = r"^(0|[0-9]{1,20}-[0-9]{1,20})$"
#: How long one blocking read waits before a keepalive comment goes out.
_RESULTS_BLOCK_MS = 15_000
#: Finished jobs sent in one go at most (one round trip each batch).
_RESULTS_BATCH = 256


async def _run_events(app: FastAPI, run_id: str, start: str) -> AsyncIterator[bytes]:
    """SSE bytes of a run's finished jobs after ``start``: each batch and its job hashes in one
    round trip (:meth:`JobQueue.run_results`); when there is none, one blocking XREAD waits for
    the next entry."""
    keys: Keys = app.state.keys
    queue: JobQueue = app.state.queue
    stream = keys.run_done(run_id)
    last = start
    app.state.result_streams += 1
    r = redis_client(app.state.settings, blocking=True)
    try:
        while True:
            try:
                batch = await queue.run_results(run_id, last, _RESULTS_BATCH)
                if not batch:
                    # Nothing new: wait for it (only the wake-up counts; the entry is read above).
                    if not await r.xread({stream: last}, count=1, block=_RESULTS_BLOCK_MS):
                        yield b": keepalive\n\n"
                    continue
            except REDIS_DOWN:
                yield b": redis unavailable, retrying\n\n"
                await asyncio.sleep(0.5)
                continue
            out = []
            for eid, fields, h in batch:
                last = eid
                if h:
                    data = job_hash_to_view(h).model_dump_json()
                else:  # retention already removed it: say so rather than skip it
                    data = json.dumps(
                        {"job_id": fields.get("job_id"), "state": fields.get("state"), "expired": True}
                    )
                out.append(f"id: {eid}\nevent: job\ndata: {data}\n\n")
            yield "".join(out).encode()
    finally:
        app.state.result_streams -= 1
        await r.aclose()


def _redis_down() -> JSONResponse:
    return JSONResponse({"detail": REDIS_DOWN_DETAIL}, status_code=503, headers={"Retry-After": "1"})


async def _accept(
    app: FastAPI, job: JobRequest, idempotency_key: str | None, t_received: int
) -> JobAccepted | JSONResponse:
    """Queue a validated job: the whole of ``POST /v1/jobs`` after the request was checked.

    Shared by the FastAPI route and :class:`BodyLimit`'s fast path. Refusals come back as
    responses (never raised), so both callers answer them the same way.
    """
    s: Settings = app.state.settings
    input_tokens = None if job.prompt is not None else (job.input_tokens or s.input_tokens)
    output_tokens = job.output_tokens or s.output_tokens
    try:
        _models, limit = await live_nodes(app)
    except REDIS_DOWN:
        prom.JOBS_REFUSED.labels("redis_down").inc()
        return _redis_down()
    if input_tokens is not None and input_tokens + output_tokens > limit:
        return _unprocessable(
            f"input_tokens + output_tokens = {input_tokens + output_tokens} exceeds the engine's "
            f"context length {limit}; lower one of them"
        )
    if input_tokens is None and output_tokens >= limit:
        # A literal prompt is at least one token; its real length is known only to the
        # engine's tokenizer, which refuses what does not fit (the job then fails, kept).
        return _unprocessable(
            f"output_tokens = {output_tokens} leaves no room for the prompt in the engine's "
            f"context length {limit}; lower output_tokens"
        )
    job_id = new_id("j")
    spec = JobSpec(
        job_id=job_id,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        prefix_share=s.prefix_share if job.prefix_share is None else job.prefix_share,
        prompt=job.prompt,
        run_id=job.run_id,
        label=job.label,
        seed=job.seed if job.seed is not None else int.from_bytes(job_id.encode()[-8:], "big"),
        prefix_group=job.prefix_group,
        routing=job.routing,
    )
    try:
        out = await enqueue(
            app,
            spec,
            t_received,
            idempotency_key=idempotency_key,
            # Only a keyed submit needs the request's fingerprint (a hash per submit otherwise).
            fingerprint=hashlib.sha256(job.model_dump_json().encode()).hexdigest()[:32]
            if idempotency_key
            else "",
        )
    except Refusal as r:
        return JSONResponse({"detail": r.detail}, status_code=r.status, headers=r.headers)
    if out.status == "conflict":
        return _unprocessable(
            f"Idempotency-Key {idempotency_key!r} was already used for job {out.job_id} with a "
            "different request: send the same body to get that job, or use a new key"
        )
    return JobAccepted(
        job_id=out.job_id, state=JobState.QUEUED, run_id=job.run_id, duplicate=out.status == "dup"
    )


def _unprocessable(detail: str) -> JSONResponse:
    """422 with the same body FastAPI gives an ``HTTPException(422, detail)``."""
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ingestion FastAPI app."""
    settings = settings or get_settings()
    app = FastAPI(
        title="llmconsole ingestion",
        version="0.1.0",
        lifespan=_lifespan,
        description=(
            "Accepts inference jobs and queues them in Redis. Authenticate with "
            "`Authorization: Bearer <API_KEY>`. Bodies over "
            f"{MAX_BODY_BYTES} bytes are refused (413); unknown fields are refused (422)."
        ),
    )
    app.state.settings = settings
    app.state.keys = Keys(settings.redis_prefix)
    app.state.redis = redis_client(settings)
    app.state.queue = JobQueue(app.state.redis, app.state.keys)
    app.state.waiters = Waiters(lambda: _listen(app), settings.event_linger_s)
    app.state.result_streams = 0
    #: Redis's used/max memory, read every 200 ms in the background (not per submit).
    app.state.memory = MemoryGauge(app.state.redis, settings)

    app.add_middleware(BodyLimit)
    # The OpenAI-compatible door (services/openai_api.py): /v1/completions, /v1/chat/completions, /v1/models.
    openai_api.install(app)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with one readable line per problem (plus FastAPI's structured errors)."""
        problems = []
        errors = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
            errors.append({k: err[k] for k in ("type", "loc", "msg") if k in err})
        return JSONResponse({"detail": "; ".join(problems), "errors": errors}, status_code=422)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Redis unreachable"}})
    async def readyz() -> JSONResponse:
        """Readiness: Redis answers PING."""
        try:
            await asyncio.wait_for(app.state.redis.ping(), timeout=1.0)
        except (TimeoutError, *REDIS_DOWN):
            return JSONResponse({"redis": "unreachable"}, status_code=503)
        return JSONResponse({"redis": "ok"})

    @app.post(
        SUBMIT_PATH,
        status_code=202,
        response_model=JobAccepted,
        dependencies=[Depends(_require_key)],
        tags=["jobs"],
        responses={
            401: {"description": "Missing or wrong API key"},
            413: {"description": "Body too large"},
            422: {"description": "Invalid job: the message says which field and why"},
            429: {"description": "Too many active jobs; retry after Retry-After seconds"},
            503: {"description": "Redis unavailable; nothing was accepted"},
        },
    )
    async def submit(
        job: JobRequest,
        idempotency_key: Annotated[
            str | None,
            Header(
                max_length=128,
                pattern=IDEMPOTENCY_PATTERN,
                description="Repeat a submit safely: the same key returns the same job id.",
            ),
        ] = None,
    ) -> JobAccepted | JSONResponse:
        """Accept a job and queue it; answers at once with its id."""
        t_received = now_ns()
        if idempotency_key is not None and not _IDEM_RE.match(idempotency_key):
            raise HTTPException(422, f"Idempotency-Key must match {IDEMPOTENCY_PATTERN}")
        return await _accept(app, job, idempotency_key, t_received)

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobView,
        dependencies=[Depends(_require_key)],
        tags=["jobs"],
        responses={404: {"description": "Unknown or expired job"}, 503: {"description": "Redis unavailable"}},
    )
    async def get_job(
        job_id: Annotated[str, Path(pattern=ID_PATTERN, description="A job id from POST /v1/jobs")],
        wait: Annotated[
            float,
            Query(ge=0, le=MAX_WAIT_S, description="Seconds to wait for the job to finish (long poll)."),
        ] = 0.0,
    ) -> JobView | JSONResponse:
        """A job's state, timestamps, per-stage durations and result."""
        waiters: Waiters = app.state.waiters
        ev = waiters.add(job_id) if wait > 0 else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while True:
                if ev is not None:
                    ev.clear()  # before the read: a change after it still wakes this waiter
                try:
                    h = await app.state.queue.get_job(job_id)
                except REDIS_DOWN:
                    return _redis_down()
                if not h:
                    raise HTTPException(404, f"no job {job_id} (unknown, or expired after its TTL)")
                remaining = deadline - loop.time()
                if ev is None or h.get("state") in TERMINAL_STATES or remaining <= 0:
                    return job_hash_to_view(h)
                with contextlib.suppress(asyncio.TimeoutError):
                    # Re-read at least every 2 s in case an event was missed.
                    await asyncio.wait_for(ev.wait(), timeout=min(remaining, 2.0))
        finally:
            if ev is not None:
                waiters.remove(job_id, ev)

    @app.get(
        "/v1/runs/{run_id}/results",
        dependencies=[Depends(_require_key)],
        tags=["runs"],
        response_class=StreamingResponse,
        responses={
            200: {"description": "Server-sent events: one `job` event per finished job (a JobView)"},
            429: {"description": "Too many result streams open on this ingestion process"},
        },
    )
    async def run_results(
        run_id: Annotated[
            str, Path(pattern=ID_PATTERN, description="The run_id the jobs were submitted with")
        ],
        after: Annotated[
            str,
            Query(pattern=STREAM_ID_PATTERN, description="Start after this event id ('0': from the start)."),
        ] = "0",
        last_event_id: Annotated[
            str | None,
            Header(pattern=STREAM_ID_PATTERN, description="Resume after this event id (SSE reconnect)."),
        ] = None,
    ) -> Response:
        """Follow a run's finished jobs over one connection (server-sent events).

        Each finished job of the run arrives once, in finish order, as ``event: job`` with its
        full view (state, timestamps, result) and ``id:`` its place in the run's stream, so a
        client follows thousands of jobs without a request per job and resumes after a cut with
        ``Last-Event-ID``. Comments (``: keepalive``) come every 15 s. The stream stays open until
        the client closes it; the run's stream keeps its last 50,000 entries for an
        hour after its last finish.
        """
        if app.state.result_streams >= MAX_RESULT_STREAMS:
            return JSONResponse(
                {"detail": f"too many result streams open ({MAX_RESULT_STREAMS}); close one or retry later"},
                status_code=429,
                headers={"Retry-After": "1"},
            )
        start = last_event_id or after
        return StreamingResponse(
            _run_events(app, run_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/queue", dependencies=[Depends(_require_key)], tags=["jobs"])
    async def queue_stats() -> dict[str, Any]:
        """Queue depth, in flight, active and lifetime counters."""
        try:
            st = await app.state.queue.stats()
        except REDIS_DOWN:
            return _redis_down()  # type: ignore[return-value]
        return {
            "waiting": st.waiting,
            "in_flight": st.in_flight,
            "active": st.active,
            "stream_len": st.stream_len,
            "consumers": st.consumers,
            "counters": st.counters,
            "max_active_jobs": app.state.settings.max_active_jobs,
            # Bounded storage (README "Redis memory and retention"): what Redis holds against its
            # limit, how many finished jobs are retained and since when; submits are refused
            # with 503 from `refuse_at_pct` of the limit.
            "memory": {
                "redis_used_bytes": st.redis_used,
                "redis_maxmemory_bytes": st.redis_limit or None,
                "used_fraction": round(st.redis_used / st.redis_limit, 4)
                if st.redis_used is not None and st.redis_limit
                else None,
                "refuse_at_pct": app.state.settings.redis_memory_refuse_pct,
                "retained_jobs": st.retained,
                "oldest_finished": st.oldest_finished,
            },
        }

    @app.get("/metrics", dependencies=[Depends(_require_key)], tags=["health"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics (``llmconsole:`` names); queue gauges read from Redis now."""
        with contextlib.suppress(*REDIS_DOWN):
            st = await app.state.queue.stats()
            prom.set_queue(st.waiting, st.in_flight, st.active)
        body, content_type = prom.render()
        return Response(body, media_type=content_type)

    return app


def main() -> None:
    """Run ingestion under uvicorn (``python -m services.ingestion``)."""
    import uvicorn

    s = get_settings()
    runtime.setup_logging()
    app = create_app(s)
    runtime.freeze_startup_heap()
    uvicorn.run(
        app,
        host=s.ingestion_host,
        port=s.ingestion_port,
        timeout_graceful_shutdown=int(s.shutdown_grace_s),
        log_level="info",
        access_log=False,
        limit_concurrency=4096,
        # httptools (a C parser) with the request line and headers bounded (431 past
        # MAX_HEADER_BYTES): the API is the one port users reach, and its requests are small JSON.
        http=asgi.BoundedHttpToolsProtocol,
    )


if __name__ == "__main__":
    main()

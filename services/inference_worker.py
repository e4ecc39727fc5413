"""Inference worker: the FastAPI service next to the engine.

``POST /v1/infer`` builds the job's exact-length prompt on the engine's own
tokenizer, streams the completion, measures engine (GPU) time, samples the
GPUs over the engine window and returns an :class:`InferResult`. It also keeps
a heartbeat of its node in Redis and publishes GPU samples for the console.

Errors map to statuses the proxy worker understands: 422 = final (the engine
refused the request: retrying cannot help), 502 = retryable (engine 5xx,
timeout, connection), 503 = the engine is overloaded or not ready
(backpressure, not a used-up attempt).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from services import asgi, procstats, prom, runtime, telemetry, token_stream
from services.contracts import (
    MAX_BODY_BYTES,
    RESULT_TEXT_HEAD_MAX,
    InferRequest,
    InferResult,
    JobSpec,
    Keys,
    NodeHeartbeat,
    NodeState,
    now_ns,
    prefix_key,
)
from services.engine_client import EngineClient, EngineError, StreamResult
from services.prompts import PromptBuilder, prefix_seed_for_run, split_tokens
from services.queue import (
    ALLOW_OOM,
    REDIS_DOWN,
    check_redis_version,
    field_args,
    raise_if_cancelling,
    redis_client,
)
from services.routing import kv_events
from services.settings import Settings, get_settings

log = logging.getLogger("llmconsole.inference_worker")


class WorkerState:
    """Long-lived objects of one inference worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = EngineClient(settings.engine_url, settings.engine_api_key.get_secret_value())
        self.prompts = PromptBuilder(self.engine)
        self.keys = Keys(settings.redis_prefix)
        self.node = settings.effective_node_id
        self.gpu = telemetry.make_backend()
        self.engine_name = ""
        self.model = ""
        self.max_model_len: int | None = None
        #: The engine's batch limit: what engine_launch passes as --max-num-seqs, or what the
        #: simulator reports.
        self.max_num_seqs = (
            settings.sim_max_num_seqs if settings.engine_kind == "sim" else settings.max_num_seqs
        )
        self.started = now_ns()
        #: Follows the engine's KV cache events when KV_EVENTS_PORT is set.
        self.kv = (
            kv_events.KvMirror(
                redis_client(settings), self.keys, self.node, settings.kv_events_port, settings.node_ttl_s
            )
            if settings.kv_events_port
            else None
        )
        self.in_flight = 0
        self.tasks: list[asyncio.Task[None]] = []
        #: Token streams and cancels of OpenAI-door jobs (``services.token_stream``).
        self.redis = redis_client(settings)
        self.cancels = token_stream.CancelWatcher(settings, self.keys)

    async def describe_engine(self) -> None:
        """Learn the engine's name, version, model and context length, and the prompts' token pool (once ready)."""
        models = await self.engine.models()
        first = models[0] if models else {}
        self.model = str(first.get("id", ""))
        mml = first.get("max_model_len")
        self.max_model_len = int(mml) if isinstance(mml, int) else None
        seqs = first.get("max_num_seqs")  # the simulator says it; vLLM runs with our --max-num-seqs
        if isinstance(seqs, int) and seqs > 0:
            self.max_num_seqs = seqs
        version = await self.engine.version()
        # The word-token pool prompts are drawn from, learned as soon as the engine is known
        # rather than by the first job: a run's first burst waited for it (about 20 ms on the
        # simulator), every job of the burst that reached the worker before it was in. A
        # failure here is left to the first job, which learns it (or says why it cannot).
        with contextlib.suppress(EngineError, ValueError):
            await self.prompts.pool()
        kind = self.settings.engine_kind
        if first.get("owned_by") == "llmconsole-simulator" or first.get("simulator"):
            self.engine_name = f"sim (llmconsole simulator {version})".strip()
        else:
            self.engine_name = f"vllm{'-cpu' if kind == 'cpu' else ''} {version}".strip()


def _key_ok(settings: Settings, authorization: str | None) -> bool:
    """True when no worker key is set, or ``authorization`` carries it (constant time)."""
    key = settings.effective_worker_api_key
    if not key:
        return True
    given = (authorization or "").removeprefix("Bearer ").strip()
    return hmac.compare_digest(given.encode(), key.encode())


async def _require_key(request: Request, authorization: str | None = Header(None)) -> None:
    state: WorkerState = request.app.state.worker
    if not _key_ok(state.settings, authorization):
        raise HTTPException(
            401, "missing or wrong API key (Authorization: Bearer <WORKER_API_KEY, else API_KEY>)"
        )


#: The route :class:`InferFastPath` serves.
INFER_PATH = "/v1/infer"
#: The largest ``/v1/infer`` body read (a job's spec, bounded at ingestion, inside an
#: InferRequest); a larger one is refused with 413.
_INFER_BODY_MAX = 4 * MAX_BODY_BYTES


class InferFastPath:
    """Pure ASGI middleware: ``POST /v1/infer`` without FastAPI's routing and dependency layers.

    Why: in a py-spy profile of the worker at concurrency 32, Starlette/FastAPI's per-request
    layers around the handler (exception middlewares, routing, the key dependency, request-model
    validation through the dependency solver) were about a tenth of the process's samples, all of
    it on the hop from proxy to engine. This path checks what the route checks (the worker key in
    constant time, ``InferRequest`` validated from the raw bytes) and calls the same
    :func:`serve_infer`; when a check fails it answers nothing and replays the body to the
    route, so every refusal (401, 422 with its field-by-field message) stays the route's own.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a well-formed infer request here; pass everything else on."""
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == INFER_PATH:
            got = await asgi.read_body(receive, _INFER_BODY_MAX)
            if got is None:
                return  # the proxy went away before sending the body
            body, over = got
            if over:
                # Refused here: the route would only see the body cut at the limit (and answer
                # that it is not JSON). No job spec, bounded at ingestion, comes near this size.
                detail = f"infer request body over {_INFER_BODY_MAX} bytes; a job spec is far smaller"
                await asgi.send_json(send, 413, json.dumps({"detail": detail}).encode())
                return
            receive = asgi.replay(body, receive)
            req = self._parse(scope, body)
            if req is not None:
                response = await serve_infer(scope["app"].state.worker, req)
                await response(scope, asgi.no_receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _parse(scope: Scope, body: bytes) -> InferRequest | None:
        """The request when authorised and valid; None sends it on to the route."""
        auth: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":  # the first, as Starlette's Headers.get takes it
                auth = value
                break
        state: WorkerState = scope["app"].state.worker
        if not _key_ok(state.settings, auth.decode("latin-1") if auth is not None else None):
            return None
        try:
            return InferRequest.model_validate_json(body)
        except ValueError:  # pydantic's ValidationError included
            return None


def _gpus_summary(state: WorkerState) -> str:
    """The node's GPUs in words ("2× NVIDIA H100 80GB HBM3"), "" without NVML."""
    if not state.gpu.available():
        return ""
    try:
        names = collections.Counter(g.name for g in state.gpu.sample())
    except Exception:  # NVML trouble: the heartbeat goes on without it
        return ""
    return ", ".join(f"{n}× {name}" for name, n in names.items())


#: The node's heartbeat, one script that runs past Redis's maxmemory (``queue.ALLOW_OOM``): a node
#: whose beat Redis refused would drop out of routing within NODE_TTL_S, and the accepted jobs that
#: could free memory by finishing would have nowhere to run. It rewrites one hash of bounded size.
_BEAT = (
    ALLOW_OOM
    + """
-- KEYS: nodes (set), node (hash) ; ARGV: node id, ttl (ms), then the beat's field/value pairs
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
)


async def _heartbeat(state: WorkerState) -> None:
    """Register this node in Redis every ``NODE_TTL_S / 5`` seconds (the key lives ``NODE_TTL_S``).

    The beat says whether the engine is ready and whether an operator asked the node to drain;
    routers send jobs only to ready nodes that are up. A graceful stop removes the beat at once.
    """
    s = state.settings
    r = redis_client(s)
    beat_script = r.register_script(_BEAT)
    key = state.keys.node(state.node)
    gpus = _gpus_summary(state)
    interval = max(s.node_ttl_s / 5, 0.1)
    checked = False
    try:
        while True:
            try:
                if not checked:
                    await check_redis_version(r)
                    checked = True
                ready = await state.engine.health()
                if ready and not state.model:
                    await state.describe_engine()
                draining = bool(await r.exists(state.keys.node_drain(state.node)))
                beat = NodeHeartbeat(
                    node=state.node,
                    url=s.worker_url,
                    engine_kind=s.engine_kind,
                    engine=state.engine_name,
                    model=state.model,
                    max_model_len=state.max_model_len,
                    max_num_seqs=state.max_num_seqs,
                    capacity_factor=s.node_capacity_factor,
                    capacity=max(1, int(state.max_num_seqs * s.node_capacity_factor)),
                    state=NodeState.DRAINING if draining else NodeState.UP,
                    ready=ready and bool(state.model),
                    gpu="yes" if state.gpu.available() else f"no: {state.gpu.reason}",
                    gpus=gpus,
                    in_flight=state.in_flight,
                    worker_cpu_s=round(time.process_time(), 3),
                    engine_url=s.engine_url,
                    t=now_ns(),
                    started=state.started,
                )
                await beat_script(
                    keys=[state.keys.nodes, key],
                    args=[state.node, int(s.node_ttl_s * 1000), *field_args(beat.to_redis())],
                )
                raise_if_cancelling()
            except REDIS_DOWN:
                pass  # Redis is back soon; the TTL marks us gone meanwhile
            except EngineError as e:
                log.info("engine not ready yet: %s", e)
            except (RedisError, RuntimeError) as e:  # e.g. a Redis too old: said, and tried again
                log.warning("node heartbeat not written: %s", e)
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(*REDIS_DOWN):
            await r.delete(key)  # stopping: no new jobs here (a crash lets the TTL say it)
        await r.aclose()


async def _publish_gpu(state: WorkerState) -> None:
    """Publish GPU samples for the console (nothing to do without a GPU)."""
    if not state.gpu.available():
        return
    r = redis_client(state.settings)
    try:
        while True:
            try:
                await telemetry.publish_samples(r, state.keys, state.node, state.gpu, 1.0)
            except REDIS_DOWN:
                await asyncio.sleep(1.0)
    finally:
        await r.aclose()


async def _report_cpu(state: WorkerState) -> None:
    """Report this process's CPU and RSS for the bench's pipeline-cost figures."""
    r = redis_client(state.settings)
    try:
        await procstats.publish_forever(r, state.keys, "inference_worker", state.node)
    finally:
        await r.aclose()


async def _mirror_kv(state: WorkerState) -> None:
    """Mirror the engine's KV cache events into Redis (``kv_events`` routing)."""
    assert state.kv is not None
    try:
        await state.kv.run()
    finally:
        await state.kv.r.aclose()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: WorkerState = app.state.worker
    state.tasks = [
        asyncio.create_task(_heartbeat(state)),
        asyncio.create_task(_publish_gpu(state)),
        asyncio.create_task(_report_cpu(state)),
        asyncio.create_task(state.cancels.run()),
    ]
    if state.kv is not None:
        state.tasks.append(asyncio.create_task(_mirror_kv(state)))
    try:
        yield
    finally:
        for t in state.tasks:
            t.cancel()
        for t in state.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await state.engine.aclose()
        await state.redis.aclose()


def _exposed(settings: Settings) -> bool:
    """True when the worker listens beyond loopback."""
    return settings.worker_host not in ("127.0.0.1", "localhost", "::1")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The inference worker's FastAPI app."""
    settings = settings or get_settings()
    # Bound beyond loopback (a node that joined a head), every request needs the worker key:
    # health and docs too, which would otherwise tell anyone the engine and model.
    exposed = _exposed(settings)
    app = FastAPI(
        title="llmconsole inference worker",
        version="0.1.0",
        lifespan=_lifespan,
        description="Builds exact-length prompts, calls the engine, measures engine time per job.",
        dependencies=[Depends(_require_key)] if exposed else None,
        docs_url=None if exposed else "/docs",
        redoc_url=None if exposed else "/redoc",
        openapi_url=None if exposed else "/openapi.json",
    )
    app.state.worker = WorkerState(settings)
    prom.track(prom.WORKER_IN_FLIGHT, lambda: app.state.worker.in_flight, node=app.state.worker.node)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: the engine answers ``/health``."""
        state: WorkerState = app.state.worker
        ok = await state.engine.health()
        if ok and not state.model:
            with contextlib.suppress(EngineError):
                await state.describe_engine()
        body = {
            "engine": "ready" if ok else "not ready",
            "model": state.model,
            "engine_name": state.engine_name,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/v1/infer", response_model=InferResult, dependencies=[Depends(_require_key)])
    async def infer(req: InferRequest) -> Response:
        """Run one job on the engine and return its timings and usage.

        Well-formed requests are answered by :class:`InferFastPath` (same handler, without
        FastAPI's layers); this route answers the rest, and documents the endpoint.
        """
        return await serve_infer(app.state.worker, req)

    app.add_middleware(InferFastPath)

    @app.get("/metrics", dependencies=[Depends(_require_key)], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics of this worker (``llmconsole:worker_*``), key required like /v1/infer."""
        body, content_type = prom.render()
        return Response(body, media_type=content_type)

    return app


async def serve_infer(state: WorkerState, req: InferRequest) -> Response:
    """Run one job on the engine: its :class:`InferResult`, or the error status the proxy reads."""
    state.in_flight += 1
    job_id = req.spec.job_id
    try:
        if req.spec.openai is not None:
            # An OpenAI-door job runs in its own task, which a cancel from its client ends.
            task = asyncio.create_task(_infer(state, req))
            state.cancels.register(job_id, task)
            try:
                result = await task
            except asyncio.CancelledError:
                if not state.cancels.unregister(job_id):
                    raise
                prom.WORKER_REQUESTS.labels(state.node, state.model, "cancelled").inc()
                return JSONResponse(
                    {"detail": "cancelled: the client went away; the engine request was aborted"},
                    status_code=499,
                )
            state.cancels.unregister(job_id)
        else:
            result = await _infer(state, req)
        prom.WORKER_REQUESTS.labels(state.node, state.model, "ok").inc()
        prom.WORKER_PROMPT_TOKENS.labels(state.node, state.model).inc(result.prompt_tokens)
        if result.cached_tokens:
            prom.WORKER_CACHED_TOKENS.labels(state.node, state.model).inc(result.cached_tokens)
        # Serialised once by pydantic (the response model stays for the OpenAPI schema):
        # FastAPI would validate the model again and encode it through jsonable_encoder.
        return Response(result.model_dump_json(), media_type="application/json")
    except StreamBroken as e:
        prom.WORKER_REQUESTS.labels(state.node, state.model, "refused").inc()
        return JSONResponse({"detail": str(e), "retryable": False}, status_code=422)
    except JobCancelled as e:
        prom.WORKER_REQUESTS.labels(state.node, state.model, "cancelled").inc()
        return JSONResponse({"detail": str(e)}, status_code=499)
    except EngineError as e:
        if e.overloaded:
            code, outcome = 503, "overloaded"
        elif e.retryable:
            code, outcome = 502, "retryable"
        else:
            code, outcome = 422, "refused"
        prom.WORKER_REQUESTS.labels(state.node, state.model, outcome).inc()
        return JSONResponse({"detail": str(e), "retryable": code != 422}, status_code=code)
    except ValueError as e:
        prom.WORKER_REQUESTS.labels(state.node, state.model, "refused").inc()
        return JSONResponse({"detail": str(e), "retryable": False}, status_code=422)
    finally:
        state.cancels.unregister(job_id)
        state.in_flight -= 1


class StreamBroken(Exception):
    """An OpenAI-door job failed after tokens went to its client: final, never restarted."""


class JobCancelled(Exception):
    """The client of an OpenAI-door job went away before it started."""


async def _openai_stream(
    state: WorkerState, spec: JobSpec, prompt: str | list[int] | None
) -> tuple[StreamResult, token_stream.TokenSink]:
    """Stream an OpenAI-door job, forwarding every chunk on its token stream.

    A job whose client cancelled is not started; a job whose earlier attempt already put tokens
    on the stream is not restarted (that would duplicate them at the client); a failure after the
    first token ends the client's stream with an error and the job as failed.
    """
    oa = spec.openai
    assert oa is not None
    cancelled, entries = await token_stream.prior(state.redis, state.keys, spec.job_id)
    if cancelled:
        raise JobCancelled("cancelled: the client went away before the job started")
    if entries:
        raise StreamBroken(
            f"an earlier attempt already streamed {entries} entries of tokens to the client; "
            "not restarted (the client would get tokens twice)"
        )
    sink = token_stream.TokenSink(state.redis, state.keys, spec.job_id, state.settings.token_stream_ttl_s)
    messages = [m.model_dump() for m in oa.messages] if oa.messages is not None else None
    try:
        res = await state.engine.stream_completion(
            prompt,
            spec.output_tokens if oa.max_tokens_given else None,
            exact=False,
            extra=oa.sampling,
            messages=messages,
            on_chunk=sink.push,
        )
    except asyncio.CancelledError:
        sink.abort()
        raise
    except EngineError as e:
        if not sink.started:
            sink.abort()
            raise  # nothing reached the client: retried as any job
        sink.fail(f"the engine failed after {sink.pushed} token chunks: {e}")
        await sink.close()
        raise StreamBroken(f"stream broken after {sink.pushed} token chunks reached the client: {e}") from e
    return res, sink


async def _infer(state: WorkerState, req: InferRequest) -> InferResult:
    t_received = now_ns()
    spec = req.spec
    if not state.model:
        await state.describe_engine()
    prefix_tokens = 0
    prompt: str | list[int] | None
    sink: token_stream.TokenSink | None = None
    if spec.openai is not None:
        prompt = spec.prompt if spec.prompt is not None else spec.openai.prompt_token_ids
    elif spec.prompt is not None:
        prompt = spec.prompt
    else:
        assert spec.input_tokens is not None
        prefix_tokens = split_tokens(spec.input_tokens, spec.prefix_share)
        built = await state.prompts.build(
            spec.input_tokens, prefix_tokens, prefix_seed_for_run(spec.run_id, spec.prefix_group), spec.seed
        )
        prompt, prefix_tokens = built.token_ids, built.prefix_tokens
        if state.kv is not None:
            state.kv.chains.register_prefix(prefix_key(spec), built.token_ids[:prefix_tokens])
    sampler = telemetry.JobGpuSampler(state.gpu, state.settings.telemetry_interval_s)
    async with sampler:
        if spec.openai is not None:
            res, sink = await _openai_stream(state, spec, prompt)
        else:
            # Only the stored preview of the text is kept: the other token chunks are just timed.
            res = await state.engine.stream_completion(
                prompt, spec.output_tokens, exact=True, text_chars=RESULT_TEXT_HEAD_MAX
            )
    if sink is not None:
        if res.chunks == 0:
            sink.abort()  # nothing reached the client: retried below like any job
        elif res.completion_tokens is None:
            sink.fail("the engine's stream had no usage after its tokens")
            await sink.close()
            raise StreamBroken("the engine's stream had no usage after its tokens")
        else:
            usage: dict[str, Any] = {
                "prompt_tokens": res.prompt_tokens or 0,
                "completion_tokens": res.completion_tokens,
                "total_tokens": (res.prompt_tokens or 0) + res.completion_tokens,
            }
            if res.cached_tokens is not None:
                usage["prompt_tokens_details"] = {"cached_tokens": res.cached_tokens}
            sink.end(usage)
            await sink.close()
    if res.chunks == 0 or res.completion_tokens is None:
        # No token or no usage is an answer that failed, not a result: vLLM's own benchmark
        # counts a request without output as failed. Another attempt may go better.
        raise EngineError(
            f"engine answered without {'any token' if res.chunks == 0 else 'usage'} "
            f"({res.chunks} token chunks, usage completion_tokens={res.completion_tokens})"
        )
    mismatches: list[str] = []
    if spec.input_tokens is not None and res.prompt_tokens != spec.input_tokens:
        mismatches.append(f"prompt_tokens {res.prompt_tokens} != requested {spec.input_tokens}")
    if res.completion_tokens != spec.output_tokens and spec.openai is None:
        mismatches.append(f"completion_tokens {res.completion_tokens} != requested {spec.output_tokens}")
    if res.completion_tokens is not None and res.chunks and res.chunks != res.completion_tokens:
        # Not an error (an engine may pack tokens into one chunk), but the ITL list is per chunk.
        log.debug("job %s: %d stream chunks for %d tokens", spec.job_id, res.chunks, res.completion_tokens)
    return InferResult(
        engine=state.engine_name or state.settings.engine_kind,
        model=state.model,
        node=state.node,
        requested_input_tokens=spec.input_tokens,
        requested_output_tokens=spec.output_tokens,
        prompt_tokens=res.prompt_tokens or 0,
        completion_tokens=res.completion_tokens or 0,
        cached_tokens=res.cached_tokens,
        prefix_tokens=prefix_tokens,
        token_mismatch=mismatches,
        finish_reason=res.finish_reason,
        ttft_s=res.ttft_s,
        decode_s=res.decode_s,
        engine_time_s=res.total_s,
        itl_s=res.itl_s,
        text_head=res.text[:500],
        gpu=sampler.stats(res.completion_tokens or 0),
        t_worker_received=t_received,
        t_engine_start=res.t_start,
        t_first_token=res.t_first_token,
        t_engine_end=res.t_end,
    )


def main() -> None:
    """Run the inference worker under uvicorn (``python -m services.inference_worker``)."""
    import uvicorn

    s = get_settings()
    runtime.setup_logging()
    if _exposed(s) and not s.effective_worker_api_key:
        raise SystemExit(
            f"WORKER_HOST={s.worker_host} is reachable from other machines: set WORKER_API_KEY "
            "(install.sh --join takes it from var/node.env) so that only proxy workers are served"
        )
    app = create_app(s)
    runtime.freeze_startup_heap()
    uvicorn.run(
        app,
        host=s.worker_host,
        port=s.worker_port,
        timeout_graceful_shutdown=int(s.shutdown_grace_s),
        log_level="info",
        access_log=False,
    )


if __name__ == "__main__":
    main()

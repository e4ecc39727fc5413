"""The OpenAI-compatible door of ingestion: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Every request becomes a job on the same Redis stream as ``POST /v1/jobs`` (proxy worker, routing,
inference worker, every stage timestamp), with the request's prompt or messages and sampling
fields in ``JobSpec.openai``. The inference worker forwards the engine's token chunks on the
job's token stream (:mod:`services.token_stream`); this module relays them to the client as
server-sent events in OpenAI's chunk format, or gathers them for a non-streamed answer, which
goes out once the job is final.

* Auth: the API key as ``Authorization: Bearer`` (what OpenAI clients send).
* Errors: OpenAI's ``{"error": {"message", "type", "param", "code"}}``; bad input is a 4xx.
* A client that goes away cancels its job: the engine request is aborted, the job ends failed
  with the reason.
* Retries: an attempt that fails before its first token went out is retried as any job; after
  that the client's stream ends with an error event and the job fails (never a silent restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import redis.asyncio as aioredis
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from services import prom, token_stream
from services.admission import Refusal, enqueue, key_ok, live_nodes
from services.contracts import (
    CHUNK_ERROR,
    CHUNK_FINISH,
    CHUNK_TEXTS,
    CHUNK_USAGE,
    ID_PATTERN,
    MAX_CHAT_MESSAGES,
    MAX_INPUT_TOKENS,
    MAX_OUTPUT_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    TERMINAL_STATES,
    ChatMessage,
    JobSpec,
    JobState,
    Keys,
    OpenAIJob,
    new_id,
    now_ns,
    valid_id,
)
from services.queue import REDIS_DOWN, redis_client
from services.settings import Settings

log = logging.getLogger("llmconsole.openai_api")

router = APIRouter(tags=["openai"])

#: max_tokens of a completion that names none (OpenAI's and vLLM's default).
DEFAULT_COMPLETION_TOKENS = 16
#: How long one blocking read of a token stream waits before the job's state is looked at (a job
#: that fails before its first token is seen within this).
_BLOCK_MS = 1000
#: Longest a finished token stream's job may take to show its final state (non-streamed answers).
_FINAL_WAIT_S = 30.0


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type = status, message, err_type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        """``{"error": {message, type, param, code}}``."""
        return {
            "error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The error as a JSON response (with ``headers`` added)."""
        return JSONResponse(
            self.body(), status_code=self.status, headers={**(self.headers or {}), **(headers or {})}
        )


def _validation_error(e: ValidationError) -> OpenAIError:
    problems, param = [], None
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        param = param or loc or None
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not supported by this server)"
        problems.append(f"{loc or 'body'}: {msg}")
    return OpenAIError(400, "; ".join(problems)[:1000], param=param, code="invalid_value")


# ---------------------------------------------------------------------------
# Request bodies (vLLM's sampling extras included; unknown fields are refused)
# ---------------------------------------------------------------------------


class StreamOptionsBody(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    min_tokens: int | None = Field(None, ge=0, le=MAX_OUTPUT_TOKENS)
    ignore_eos: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=1_000_000)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptionsBody | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per choice")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return v

    def sampling(self) -> dict[str, Any]:
        """The sampling fields to send to the engine (temperature None: the engine's default)."""
        out: dict[str, Any] = {"temperature": self.temperature}
        for name in (
            "top_p",
            "top_k",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
            "seed",
            "stop",
            "min_tokens",
            "ignore_eos",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


class CompletionBody(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(v, str):
            texts = [v]
        elif v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request: send several prompts as separate requests")
            texts = [str(v[0])]
        else:
            if not v:
                raise ValueError("the prompt is empty")
            if len(v) > MAX_INPUT_TOKENS:
                raise ValueError(f"at most {MAX_INPUT_TOKENS} prompt token ids")
            if any(not 0 <= int(t) < 2**31 for t in v):
                raise ValueError("token ids must be between 0 and 2^31-1")
            return v
        if not texts[0] or len(texts[0]) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt must have 1 to {MAX_PROMPT_CHARS} characters")
        return v

    @field_validator("logprobs", "echo", "best_of", "suffix", "logit_bias")
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        allowed: dict[str, tuple[Any, ...]] = {"echo": (False,), "best_of": (1,), "logit_bias": ({},)}
        if v is None or v in allowed.get(str(info.field_name), ()):
            return v
        raise ValueError(f"{info.field_name} is not supported by this server")


class ContentPart(BaseModel):
    """A text part of a message's content."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class MessageBody(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = Field(None, max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        """The message's text."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatBody(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[MessageBody] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("logprobs", "top_logprobs", "tools", "tool_choice", "response_format")
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v in (None, False) or (info.field_name == "tool_choice" and v == "none"):
            return v
        if info.field_name == "response_format" and v == {"type": "text"}:
            return v
        raise ValueError(f"{info.field_name} is not supported by this server")


# ---------------------------------------------------------------------------
# Live nodes: models and context length
# ---------------------------------------------------------------------------


def _blocking(app: FastAPI) -> aioredis.Redis:
    """The pool of blocking Redis connections token streams are read over (made on first use)."""
    r: aioredis.Redis | None = getattr(app.state, "openai_redis", None)
    if r is None:
        r = app.state.openai_redis = redis_client(app.state.settings, blocking=True)
    return r


async def _follow(app: FastAPI, job_id: str) -> AsyncIterator[dict[str, str]]:
    """The job's token-stream entries as they come; ends after the usage or error entry.

    When the job turns final without either (it failed before any token, or its stream expired),
    one last item ``{"state": ..., "error": ...}`` says how it ended.
    """
    keys: Keys = app.state.keys
    r = _blocking(app)
    key = keys.token_stream(job_id)
    last = "0"
    while True:
        resp = await r.xread({key: last}, count=1024, block=_BLOCK_MS)
        if resp:
            for eid, fields in resp[0][1]:
                last = eid
                yield fields
                if CHUNK_USAGE in fields or CHUNK_ERROR in fields:
                    return
            continue
        # Nothing for a second: is the job final (it failed before any token)?
        state, error = await app.state.redis.hmget(keys.job(job_id), "state", "error")
        if state is None or state in TERMINAL_STATES:
            resp = await r.xread({key: last}, count=1024)
            for _eid, fields in resp[0][1] if resp else []:
                yield fields
                if CHUNK_USAGE in fields or CHUNK_ERROR in fields:
                    return
            yield {"state": state or "expired", "error": error or ""}
            return


async def _wait_final(app: FastAPI, job_id: str) -> tuple[str, str]:
    """The job's final state and error (waits for it, on the job-event channel)."""
    keys: Keys = app.state.keys
    waiters = app.state.waiters
    ev = waiters.add(job_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FINAL_WAIT_S
    try:
        while True:
            ev.clear()  # before the read: a change after it still wakes this waiter
            state, error = await app.state.redis.hmget(keys.job(job_id), "state", "error")
            if state is None or state in TERMINAL_STATES or loop.time() >= deadline:
                return state or "expired", error or ""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout=1.0)
    finally:
        waiters.remove(job_id, ev)


def _job_error(state: str, error: str) -> OpenAIError:
    """A job that ended without an answer, as an OpenAI error."""
    if state == JobState.FAILED.value:
        # "STATUS: message" from the proxy worker; the engine (or worker) refused the request.
        head, _, rest = error.partition(": ")
        msg = rest if head.isdigit() else error
        if head == "499":
            return OpenAIError(499, msg or "cancelled", "cancelled", code="cancelled")
        return OpenAIError(400, msg or "the engine refused the request", code="engine_refused")
    if state == "expired":
        return OpenAIError(500, "the job's record expired before its answer", "server_error")
    return OpenAIError(
        503,
        error or f"the job ended {state}",
        "server_error",
        code="upstream_failed",
        headers={"Retry-After": "1"},
    )


async def _until_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _cancel_later(app: FastAPI, job_id: str) -> None:
    """Cancel the job in the background (callable from a cancelled scope)."""

    async def run() -> None:
        with contextlib.suppress(*REDIS_DOWN):
            s: Settings = app.state.settings
            ttl = int(s.job_timeout_s) + s.token_stream_ttl_s
            await token_stream.cancel(app.state.redis, app.state.keys, job_id, ttl)
        log.info("job %s: the client went away; cancelled", job_id)

    bg: set[asyncio.Task[None]] = app.state.openai_bg
    task = asyncio.create_task(run())
    bg.add(task)
    task.add_done_callback(bg.discard)


# ---------------------------------------------------------------------------
# Response shapes
# ---------------------------------------------------------------------------


class _Shape:
    """Builds OpenAI's response and chunk objects for one request."""

    def __init__(self, chat: bool, job_id: str, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self.head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _event(self, obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def opening(self) -> str:
        """The chat stream's first chunk (the role), '' for completions."""
        if not self.chat:
            return ""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._chunk(choice)

    def _chunk(self, choice: dict[str, Any]) -> str:
        obj = {**self.head, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return self._event(obj)

    def chunks(self, fields: dict[str, str]) -> str:
        """SSE events of one token-stream entry: one per engine chunk (ITLs survive batching)."""
        texts = json.loads(fields[CHUNK_TEXTS]) if CHUNK_TEXTS in fields else []
        finish = fields.get(CHUNK_FINISH) or None
        out = []
        for i, text in enumerate(texts):
            fr = finish if i == len(texts) - 1 else None
            if self.chat:
                choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": fr}
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": fr,
                    "stop_reason": None,
                }
            out.append(self._chunk(choice))
        return "".join(out)

    def usage(self, usage: dict[str, Any]) -> str:
        """The usage chunk (only with ``stream_options.include_usage``)."""
        if not self.include_usage:
            return ""
        return self._event({**self.head, "choices": [], "usage": usage})

    def error(self, e: OpenAIError) -> str:
        """An error event (the stream then ends with ``[DONE]``)."""
        return self._event(e.body())

    def whole(self, text: str, finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer."""
        head = {**self.head, "object": "chat.completion" if self.chat else "text_completion"}
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        return {**head, "choices": [choice], "usage": usage, "system_fingerprint": None}


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------


def _check_key(request: Request) -> None:
    h = request.headers
    if not key_ok(request.app.state.settings, h.get("authorization"), h.get("x-api-key")):
        raise OpenAIError(
            401,
            "Incorrect API key provided: send 'Authorization: Bearer <API_KEY>' (the key is in var/llmconsole.env)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _body(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except ValueError as e:
        raise OpenAIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
    return data


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """The models the live nodes serve (OpenAI's model list)."""
    try:
        _check_key(request)
        models, limit = await live_nodes(request.app)
    except OpenAIError as e:
        return e.response()
    except REDIS_DOWN:
        return _redis_down().response()
    created = int(time.time())
    data = [
        {
            "id": m,
            "object": "model",
            "created": created,
            "owned_by": "llmconsole",
            "root": m,
            "max_model_len": limit,
        }
        for m in models
    ]
    return JSONResponse({"object": "list", "data": data})


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI completions through the pipeline, streamed (SSE) or not."""
    return await _serve(request, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions through the pipeline, streamed (SSE) or not."""
    return await _serve(request, chat=True)


def _redis_down() -> OpenAIError:
    return OpenAIError(
        503,
        "Redis is unavailable; the request was probably not accepted (if Redis failed during the "
        "write, it runs). Retry shortly.",
        "server_error",
        headers={"Retry-After": "1"},
    )


async def _serve(request: Request, chat: bool) -> Response:
    t_received = now_ns()
    app: FastAPI = request.app
    try:
        _check_key(request)
        raw = await _body(request)
        try:
            body: CompletionBody | ChatBody = (ChatBody if chat else CompletionBody).model_validate(raw)
        except ValidationError as e:
            raise _validation_error(e) from None
        spec, model = await _spec(request, body, chat)
        job_id = await _submit(app, spec, t_received)
    except OpenAIError as e:
        return e.response()
    except REDIS_DOWN:
        prom.JOBS_REFUSED.labels("redis_down").inc()
        return _redis_down().response()
    opts = body.stream_options
    shape = _Shape(chat, job_id, model, bool(body.stream and opts is not None and opts.include_usage))
    headers = {"X-Job-Id": job_id}
    if not body.stream:
        return await _answer_whole(request, job_id, shape, headers)
    return await _answer_stream(request, job_id, shape, headers)


async def _spec(request: Request, body: CompletionBody | ChatBody, chat: bool) -> tuple[JobSpec, str]:
    app: FastAPI = request.app
    models, limit = await live_nodes(app)
    if body.model is not None and models and body.model not in models:
        raise OpenAIError(
            404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found"
        )
    model = body.model or (models[0] if models else "")
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options can only be given with stream=true", param="stream_options")
    max_tokens = body.max_tokens
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    token_ids: list[int] | None = None
    if isinstance(body, ChatBody):
        max_tokens = body.max_completion_tokens or body.max_tokens
        messages = [ChatMessage(role=m.role, content=m.text()) for m in body.messages]
        if sum(len(m.content) for m in messages) > MAX_PROMPT_CHARS:
            raise OpenAIError(
                400, f"the messages have more than {MAX_PROMPT_CHARS} characters", param="messages"
            )
    elif isinstance(body.prompt, str):
        prompt = body.prompt
    elif body.prompt and isinstance(body.prompt[0], str):
        prompt = str(body.prompt[0])
    else:
        token_ids = [int(t) for t in body.prompt]
    given = max_tokens is not None
    out = max_tokens if max_tokens is not None else (limit - 1 if chat else DEFAULT_COMPLETION_TOKENS)
    n_prompt = len(token_ids) if token_ids is not None else 1
    if given and n_prompt + out > limit:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + out} tokens ({n_prompt} in the prompt, {out} for the completion). "
            "Please reduce the length of the prompt or of the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if body.min_tokens is not None and body.min_tokens > out:
        raise OpenAIError(
            400, f"min_tokens ({body.min_tokens}) must be at most max_tokens ({out})", param="min_tokens"
        )
    run_id = request.headers.get("x-run-id")
    if run_id is not None and not valid_id(run_id):
        raise OpenAIError(400, f"X-Run-Id must match {ID_PATTERN}", param="X-Run-Id")
    job_id = new_id("j")
    seed = (
        body.seed if body.seed is not None and body.seed >= 0 else int.from_bytes(job_id.encode()[-8:], "big")
    )
    spec = JobSpec(
        job_id=job_id,
        input_tokens=None,
        output_tokens=max(out, 1),
        prefix_share=0.0,
        prompt=prompt,
        run_id=run_id,
        label=f"openai {'chat' if chat else 'completions'}",
        seed=seed,
        openai=OpenAIJob(
            endpoint="chat" if chat else "completions",
            messages=messages,
            prompt_token_ids=token_ids,
            max_tokens_given=given,
            sampling=body.sampling(),
        ),
    )
    return spec, model


async def _submit(app: FastAPI, spec: JobSpec, t_received: int) -> str:
    try:
        out = await enqueue(app, spec, t_received)
    except Refusal as r:
        if r.status == 429:
            raise OpenAIError(
                429, r.detail, "rate_limit_error", code="rate_limit_exceeded", headers=r.headers
            ) from None
        raise OpenAIError(r.status, r.detail, "server_error", headers=r.headers) from None
    return out.job_id


async def _race_disconnect(request: Request, aw: Any) -> tuple[bool, Any]:
    """Await ``aw`` unless the client goes away first: (disconnected, result)."""
    work = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if work.done():
        return False, work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, *REDIS_DOWN):
        await work
    return True, None


async def _answer_whole(request: Request, job_id: str, shape: _Shape, headers: dict[str, str]) -> Response:
    app: FastAPI = request.app

    async def gather() -> Response:
        texts: list[str] = []
        finish: str | None = None
        usage: dict[str, Any] | None = None
        async for fields in _follow(app, job_id):
            if CHUNK_TEXTS in fields:
                texts.extend(json.loads(fields[CHUNK_TEXTS]))
                finish = fields.get(CHUNK_FINISH) or finish
            if CHUNK_USAGE in fields:
                usage = json.loads(fields[CHUNK_USAGE])
            if CHUNK_ERROR in fields:
                await _wait_final(app, job_id)
                return OpenAIError(500, fields[CHUNK_ERROR], "server_error", code="stream_broken").response(
                    headers
                )
            if "state" in fields:
                return _job_error(fields["state"], fields.get("error", "")).response(headers)
        state, error = await _wait_final(app, job_id)
        if state != JobState.SUCCEEDED.value or usage is None:
            return _job_error(state, error).response(headers)
        return JSONResponse(shape.whole("".join(texts), finish, usage), headers=headers)

    try:
        gone, resp = await _race_disconnect(request, gather())
    except REDIS_DOWN:
        return _redis_down().response(headers)
    if gone:
        _cancel_later(app, job_id)
        return Response(status_code=499)
    return resp  # type: ignore[no-any-return]


async def _answer_stream(request: Request, job_id: str, shape: _Shape, headers: dict[str, str]) -> Response:
    """Wait for the first entry (an error before any token is still an HTTP error), then relay."""
    app: FastAPI = request.app
    entries = _follow(app, job_id)
    try:
        gone, first = await _race_disconnect(request, entries.__anext__())
    except StopAsyncIteration:
        return _job_error("expired", "").response(headers)
    except REDIS_DOWN:
        _cancel_later(app, job_id)
        return _redis_down().response(headers)
    if gone:
        _cancel_later(app, job_id)
        return Response(status_code=499)
    if "state" in first:
        return _job_error(first["state"], first.get("error", "")).response(headers)

    async def relay() -> AsyncIterator[str]:
        ended = False
        try:
            yield shape.opening()
            fields = first
            while True:
                out = shape.chunks(fields)
                if CHUNK_USAGE in fields:
                    out += shape.usage(json.loads(fields[CHUNK_USAGE]))
                    ended = True
                elif CHUNK_ERROR in fields:
                    out += shape.error(
                        OpenAIError(500, fields[CHUNK_ERROR], "server_error", code="stream_broken")
                    )
                    ended = True
                elif "state" in fields:
                    out = shape.error(_job_error(fields["state"], fields.get("error", "")))
                    ended = True
                if ended:
                    yield out + "data: [DONE]\n\n"
                    return
                if out:
                    yield out
                try:
                    fields = await entries.__anext__()
                except StopAsyncIteration:
                    fields = {"state": "expired", "error": ""}
                except REDIS_DOWN:
                    fields = {"state": "dead", "error": "Redis became unavailable while streaming"}
        finally:
            if not ended:
                _cancel_later(app, job_id)  # the client went away mid-stream
            with contextlib.suppress(Exception):
                await entries.aclose()

    return StreamingResponse(
        relay(),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def install(app: FastAPI) -> None:
    """Add the OpenAI door to ingestion's app."""
    app.state.openai_bg = set()
    app.include_router(router)


async def aclose(app: FastAPI) -> None:
    """Close the door's Redis pool (at ingestion's shutdown)."""
    r = getattr(app.state, "openai_redis", None)
    if r is not None:
        await r.aclose()

"""Client of the engine's OpenAI-compatible API (vLLM or the simulator).

Tokenize, stream a completion with per-token timing, read ``/v1/models`` and
``/metrics``. Used by the inference worker, the bench's direct path and the
console's engine panel, so the three measure the same way.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic_core import to_json

from services import stream_http
from services.contracts import now_ns

#: The longest stream line read from an engine (a token chunk is a few hundred bytes; a bound
#: keeps a broken engine from growing the worker's buffer without end).
MAX_EVENT_BYTES = 1 << 20


class EngineError(Exception):
    """The engine answered with an error or could not be reached.

    ``status`` is the HTTP status (None for connection errors and timeouts);
    ``retryable`` tells the caller whether another attempt may succeed.
    """

    def __init__(self, message: str, status: int | None = None, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        #: The engine could not be connected to at all (down, restarting, loading).
        self.unavailable = unavailable

    @property
    def retryable(self) -> bool:
        """5xx, timeouts and connection errors may pass on retry; 4xx will not."""
        return self.status is None or self.status >= 500 or self.status == 429

    @property
    def overloaded(self) -> bool:
        """503/429 or not reachable: busy or restarting; backpressure, not a used-up attempt."""
        return self.unavailable or self.status in (429, 503)


@dataclass
class StreamResult:
    """Timings and usage of one streamed completion.

    Timestamps are wall-clock ns; durations come from a monotonic clock.
    """

    t_start: int
    t_first_token: int
    t_end: int
    ttft_s: float
    decode_s: float
    total_s: float
    #: Gaps between successive token-bearing chunks (seconds).
    itl_s: list[float] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    chunks: int = 0
    #: The answer's ``X-Job-Id`` (ingestion's OpenAI door: the job behind it), else None.
    job_id: str | None = None


def _auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error_message(resp: httpx.Response) -> str:
    return _error_text(resp.text, resp.reason_phrase)


def _error_text(text: str, reason: str | None) -> str:
    """The message of an engine's error body (OpenAI's, vLLM's or FastAPI's shape), else the text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500] or (reason or "")
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return str(body["error"].get("message", body))[:500]
        if "message" in body:
            return str(body["message"])[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return str(body)[:500]


class EngineClient:
    """Async client of one engine: token streams over :mod:`services.stream_http`, the rest over httpx."""

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        timeout_s: float = 600.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._own = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
            headers=_auth_headers(api_key),
        )
        self._model: str | None = None
        self._timeout_s = timeout_s
        self._headers = _auth_headers(api_key)
        self._pool: stream_http.StreamPool | None = None

    def _streams(self) -> stream_http.StreamPool:
        """The connections completions stream over (made on first use)."""
        if self._pool is None:
            self._pool = stream_http.StreamPool(
                self.base_url, self._headers, connect_timeout_s=5.0, read_timeout_s=self._timeout_s
            )
        return self._pool

    async def aclose(self) -> None:
        """Close the pooled connections (if this client owns them)."""
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        if self._own:
            await self._client.aclose()

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = await self._client.request(method, f"{self.base_url}{path}", **kw)
        except httpx.TimeoutException as e:
            raise EngineError(f"engine timed out on {path}: {e!r}") from e
        except httpx.ConnectError as e:
            raise EngineError(f"engine not reachable at {self.base_url}: {e!r}", unavailable=True) from e
        except httpx.TransportError as e:
            raise EngineError(f"engine unreachable at {self.base_url}: {e!r}") from e
        if resp.status_code >= 400:
            raise EngineError(
                f"engine {resp.status_code} on {path}: {_error_message(resp)}", resp.status_code
            )
        return resp

    async def health(self) -> bool:
        """True if ``/health`` answers 200."""
        try:
            resp = await self._client.get(f"{self.base_url}/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def models(self) -> list[dict[str, Any]]:
        """``/v1/models`` data entries."""
        resp = await self._request("GET", "/v1/models")
        return list(resp.json().get("data", []))

    async def model(self) -> str:
        """The served model id (first of ``/v1/models``), cached."""
        if self._model is None:
            data = await self.models()
            if not data:
                raise EngineError("engine serves no model")
            self._model = str(data[0]["id"])
        return self._model

    async def version(self) -> str:
        """The engine's ``/version`` string, or '' if it has none."""
        try:
            resp = await self._request("GET", "/version")
            return str(resp.json().get("version", ""))
        except (EngineError, ValueError):
            return ""

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` on the engine's own tokenizer."""
        body = {"model": await self.model(), "prompt": text, "add_special_tokens": add_special_tokens}
        resp = await self._request("POST", "/tokenize", json=body)
        return list(resp.json()["tokens"])

    async def detokenize(self, tokens: list[int]) -> str:
        """Text of ``tokens`` on the engine's own tokenizer."""
        resp = await self._request(
            "POST", "/detokenize", json={"model": await self.model(), "tokens": tokens}
        )
        return str(resp.json()["prompt"])

    async def metrics_text(self) -> str:
        """Raw Prometheus text of ``/metrics``."""
        resp = await self._request("GET", "/metrics")
        return resp.text

    async def stream_completion(
        self,
        prompt: str | list[int] | None,
        max_tokens: int | None,
        *,
        exact: bool = True,
        extra: dict[str, Any] | None = None,
        on_first_token: Callable[[], None] | None = None,
        messages: list[dict[str, str]] | None = None,
        on_chunk: Callable[[str, str | None], None] | None = None,
        text_chars: int | None = None,
    ) -> StreamResult:
        """Stream ``/v1/completions`` (or, given ``messages``, ``/v1/chat/completions``) and time it.

        With ``exact`` the engine is forced to produce exactly ``max_tokens``
        (``min_tokens`` = ``max_tokens`` and ``ignore_eos``), as the seed asks. ``max_tokens``
        None leaves the engine's default. ``on_chunk(text, finish_reason)`` is called for every
        token-bearing chunk as it arrives (the OpenAI door forwards them).

        ``text_chars`` keeps only the first that many characters of the answer's text (None: all).
        Once they are in, a plain token chunk (one choice, no finish reason, no usage, no error)
        is timed and counted without being parsed, as vLLM's benchmark keeps only a timestamp per
        chunk: JSON parsing was a third of this loop's CPU per token (scripts/token_scaling.py).
        Every other chunk (the first, the last, usage, errors) is still parsed whole.
        """
        chat = messages is not None
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body: dict[str, Any] = {
            "model": await self.model(),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
        }
        if chat:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if exact and max_tokens is not None:
            body.update(min_tokens=max_tokens, ignore_eos=True)
        if extra:
            body.update(extra)
        t_start = now_ns()
        m0 = time.perf_counter()
        res = StreamResult(t_start=t_start, t_first_token=0, t_end=0, ttft_s=0.0, decode_s=0.0, total_s=0.0)
        # Skipping the parse needs nothing of the chunk but its time: no callback, no chat role
        # chunks, and the kept text complete.
        lazy = text_chars is not None and on_chunk is None and not chat
        sink = _CompletionSink(
            res, chat=chat, lazy=lazy, text_chars=text_chars, on_chunk=on_chunk, on_first_token=on_first_token
        )
        try:
            # pydantic-core's serialiser: a quarter of json.dumps's time for a 1,000-id prompt.
            await self._streams().post(path, to_json(body), sink)
        except stream_http.ConnectFailed as e:
            raise EngineError(f"engine not reachable at {self.base_url}: {e}", unavailable=True) from e
        except stream_http.ReadTimeout as e:
            raise EngineError(f"engine timed out streaming: {e}") from e
        except stream_http.ConnectionLost as e:
            raise EngineError(f"engine connection lost while streaming: {e}") from e
        except stream_http.BadResponse as e:
            raise EngineError(f"engine sent an unreadable stream: {e}") from e
        if sink.status >= 400:
            text = bytes(sink.error_body).decode("utf-8", "replace")
            raise EngineError(
                f"engine {sink.status} on {path}: {_error_text(text, sink.reason)}", sink.status
            )
        if not sink.done:
            # A clean close without the terminator: the engine stopped mid-answer.
            raise EngineError(f"engine stream ended before [DONE] after {res.chunks} token chunks")
        m_end = sink.m_end
        m_first = sink.m_first
        if m_first is None:  # no token at all (max_tokens=0 or engine sent none)
            m_first, res.t_first_token = m_end, res.t_end
        res.ttft_s = m_first - m0
        res.decode_s = m_end - m_first
        res.total_s = m_end - m0
        res.itl_s = [round(x, 6) for x in sink.itl]
        res.text = "".join(sink.parts)
        return res


class _CompletionSink:
    """Reads one completion stream as it arrives: a timestamp per token chunk, the rest parsed.

    Fed from the connection's read callback (:mod:`services.stream_http`), so a token chunk costs
    no task wake-up of its own. It splits what arrives into lines itself, and keeps, per chunk,
    what vLLM's benchmark keeps: the time it came.
    """

    __slots__ = (
        "chat",
        "done",
        "error_body",
        "itl",
        "kept",
        "lazy",
        "limit",
        "m_end",
        "m_first",
        "m_last",
        "on_chunk",
        "on_first_token",
        "parts",
        "reason",
        "res",
        "rest",
        "status",
        "text_chars",
    )

    def __init__(
        self,
        res: StreamResult,
        *,
        chat: bool,
        lazy: bool,
        text_chars: int | None,
        on_chunk: Callable[[str, str | None], None] | None,
        on_first_token: Callable[[], None] | None,
    ) -> None:
        self.res = res
        self.chat, self.lazy = chat, lazy
        self.text_chars = text_chars
        self.limit = text_chars if text_chars is not None else 0
        self.on_chunk, self.on_first_token = on_chunk, on_first_token
        self.status = 0
        self.reason = ""
        self.error_body = bytearray()
        self.done = False
        self.rest = b""
        self.kept = 0
        self.m_first: float | None = None
        self.m_last = 0.0
        self.m_end = 0.0
        self.itl: list[float] = []
        self.parts: list[str] = []

    def head(self, status: int, reason: str, headers: dict[str, str]) -> None:
        """Note the status; an OpenAI-door answer names its job in ``X-Job-Id``."""
        self.status, self.reason = status, reason
        self.res.job_id = headers.get("x-job-id")

    def body(self, block: bytes, now: float) -> bool:
        """Read the events in ``block``; True once ``[DONE]`` is in."""
        if self.status >= 400:  # an error body: kept (bounded) for the message
            self.error_body += block[: MAX_EVENT_BYTES - len(self.error_body)]
            return False
        if self.rest:
            block = self.rest + block
        *lines, self.rest = block.split(b"\n")
        if len(self.rest) > MAX_EVENT_BYTES:
            raise EngineError(f"engine sent a stream line over {MAX_EVENT_BYTES} bytes")
        for raw in lines:
            if self._line(raw, now):
                return True
        return False

    def end(self) -> None:
        """The body ended: its last line may have come without a newline."""
        if self.status < 400 and self.rest and not self.done:
            rest, self.rest = self.rest, b""
            self._line(rest, time.perf_counter())

    def _line(self, raw: bytes, now: float) -> bool:
        if not raw.startswith(b"data:"):
            return False
        data = raw[5:].strip()
        res = self.res
        if data == b"[DONE]":
            self.done = True
            self.m_end = time.perf_counter()
            res.t_end = now_ns()
            return True
        if self.lazy and self.m_first is not None and self.kept >= self.limit and _plain_token_chunk(data):
            res.chunks += 1
            self.itl.append(now - self.m_last)
            self.m_last = now
            return False
        chunk = _stream_event(data)
        usage = chunk.get("usage")
        if usage:
            res.prompt_tokens = usage.get("prompt_tokens")
            res.completion_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details") or {}
            res.cached_tokens = details.get("cached_tokens")
        for choice in chunk.get("choices") or ():
            # One chunk per engine step that produced tokens, even when their text is empty
            # (special tokens under ignore_eos, half a UTF-8 character): vLLM sends it, and its
            # benchmark counts it, for TTFT and ITL alike.
            if self.chat:
                delta = choice.get("delta") or {}
                if "role" in delta and not delta.get("content") and not choice.get("finish_reason"):
                    continue  # the chat stream's opening chunk: a role, no token
                text = delta.get("content") or ""
            else:
                text = choice.get("text") or ""
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
            if self.on_chunk is not None:
                self.on_chunk(text, choice.get("finish_reason"))
            res.chunks += 1
            if self.m_first is None:
                self.m_first = now
                res.t_first_token = now_ns()
                if self.on_first_token:
                    self.on_first_token()
            else:
                self.itl.append(now - self.m_last)
            self.m_last = now
            if self.text_chars is None:
                self.parts.append(text)
            elif self.kept < self.text_chars:
                self.parts.append(text[: self.text_chars - self.kept])
                self.kept += len(self.parts[-1])
        return False


def _plain_token_chunk(data: bytes) -> bool:
    """True when a completion chunk carries one token chunk and nothing else to read.

    A byte test, no parse: the finish reason is null and no usage object is present. Inside a
    JSON string every quote is escaped, so generated text can never contain these key patterns;
    anything unusual (an error, a finish, usage, a second choice) fails the test and is parsed.
    """
    return (
        (b'"finish_reason":null' in data or b'"finish_reason": null' in data)
        and data.count(b'"finish_reason"') == 1
        and b'"usage":{' not in data
        and b'"usage": {' not in data
        and b'"error"' not in data
    )


def _head(data: str | bytes) -> str:
    return (data.decode("utf-8", "replace") if isinstance(data, bytes) else data)[:200]


def _stream_event(data: str | bytes) -> dict[str, Any]:
    """One ``data:`` event of a completion stream, or :class:`EngineError` for a bad or error event."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise EngineError(f"engine sent a malformed stream event: {_head(data)!r}") from None
    if not isinstance(chunk, dict):
        raise EngineError(f"engine sent a stream event that is not an object: {_head(data)!r}")
    if chunk.get("object") == "error" or "error" in chunk:
        # vLLM: {"error": {"message", "type", "code"}}; older: {"object": "error", "message", "code"}.
        err = chunk.get("error") if isinstance(chunk.get("error"), dict) else chunk
        code = err.get("code")
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        raise EngineError(f"engine error in stream: {str(err.get('message') or chunk)[:300]}", status)
    return chunk


# ---------------------------------------------------------------------------
# Prometheus text parsing (enough for vLLM's /metrics)
# ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One Prometheus sample line."""

    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """Parse Prometheus text exposition format into samples (comments skipped)."""
    out: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        labels: dict[str, str] = {}
        if "{" in line:
            name, rest = line.split("{", 1)
            label_str, _, value_str = rest.rpartition("}")
            for part in _split_labels(label_str):
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"')
        else:
            name, _, value_str = line.partition(" ")
        tokens = value_str.split()
        if not tokens:
            continue
        try:
            value = float(tokens[0])
        except ValueError:
            continue
        out.append(Sample(name.strip(), labels, value))
    return out


def _split_labels(s: str) -> list[str]:
    """Split ``a="x",b="y, z"`` at commas outside quotes (``\\"`` is an escaped quote)."""
    parts: list[str] = []
    buf: list[str] = []
    in_q = escaped = False
    for ch in s:
        if escaped:
            buf.append(ch)
            escaped = False
            continue
        if ch == "\\" and in_q:
            buf.append(ch)
            escaped = True
            continue
        if ch == '"':
            in_q = not in_q
        if ch == "," and not in_q:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    if buf and "".join(buf).strip():
        parts.append("".join(buf))
    return parts


def metric_sum(samples: list[Sample], name: str) -> float | None:
    """Sum of all samples named ``name`` across labels (None if absent)."""
    vals = [s.value for s in samples if s.name == name and not math.isnan(s.value)]
    return sum(vals) if vals else None


def histogram_quantile(samples: list[Sample], name: str, q: float) -> float | None:
    """Estimate a quantile of a Prometheus histogram (summed over labels)."""
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket" and "le" in s.labels:
            le = float("inf") if s.labels["le"] in ("+Inf", "inf") else float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_b, prev_c = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_b
            if c == prev_c:
                return b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return bounds[-1]

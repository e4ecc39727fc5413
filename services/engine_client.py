"""Client of the engine's OpenAI-compatible API (vLLM or the simulator).

Tokenize, stream a completion with per-token timing, read ``/v1/models`` and
``/metrics``. Used by the inference worker, the bench's direct path and the
console's engine panel, so the three measure the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from pydantic_core import to_json

from services.contracts import now_ns

#: The longest stream line read from an engine (a token chunk is a few hundred bytes; a bound
#: keeps a broken engine from growing the worker's buffer without end).
MAX_EVENT_BYTES = 1 << 20
#: The content type of a request body serialised ahead (aiohttp sets it only for ``json=``).
_JSON = {"Content-Type": "application/json"}
#: How long a finished answer's closing bytes are awaited (so its connection can be reused).
_DRAIN_S = 0.5


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
    """Async client of one engine, over a pooled httpx client."""

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
        self._session: aiohttp.ClientSession | None = None

    def _stream_session(self) -> aiohttp.ClientSession:
        """The aiohttp session completions stream over (made on first use, in the running loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=self._timeout_s),
                connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30),
                # No cookies, no environment proxies: a loopback or LAN engine, reached directly.
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def aclose(self) -> None:
        """Close the pooled connections (if this client owns them)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
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
        m_first: float | None = None
        m_last = m0
        t_first = 0
        itl: list[float] = []
        parts: list[str] = []
        res = StreamResult(t_start=t_start, t_first_token=0, t_end=0, ttft_s=0.0, decode_s=0.0, total_s=0.0)
        # The stream goes over aiohttp, whose C HTTP parser costs a third of httpx's pure-Python h11
        # per chunk (measured: about 4 ms against 11 ms of client CPU for a 100-token job); vLLM's
        # own benchmark client streams with aiohttp too. Per chunk: one timestamp and one JSON parse.
        session = self._stream_session()
        try:
            # pydantic-core's serialiser: a quarter of json.dumps's time for a 1,000-id prompt.
            data = to_json(body)
            async with session.post(f"{self.base_url}{path}", data=data, headers=_JSON) as resp:
                if resp.status >= 400:
                    text = await resp.text(errors="replace")
                    raise EngineError(
                        f"engine {resp.status} on {path}: {_error_text(text, resp.reason)}",
                        resp.status,
                    )
                res.job_id = resp.headers.get("x-job-id")
                done = False
                # Skipping the parse needs nothing of the chunk but its time: no callback, no chat
                # role chunks, and the kept text complete.
                lazy = text_chars is not None and on_chunk is None and not chat
                limit = text_chars if text_chars is not None else 0
                kept = 0
                # Read whatever arrived (one event per read, usually: the engine writes one per
                # token step) and split it into lines here: two awaited readline()s per event cost
                # more than the rest of the loop (an event is a data line and a blank line).
                content = resp.content
                rest = b""
                while not done:
                    block = await content.readany()
                    now = time.perf_counter()
                    if not block:  # the end of the body
                        if not rest:
                            break
                        block = b"\n"  # its last line came without a newline: read it all the same
                    if rest:
                        block = rest + block
                    *lines, rest = block.split(b"\n")
                    if len(rest) > MAX_EVENT_BYTES:
                        raise EngineError(f"engine sent a stream line over {MAX_EVENT_BYTES} bytes")
                    for raw in lines:
                        if not raw.startswith(b"data:"):
                            continue
                        data = raw[5:].strip()
                        if data == b"[DONE]":
                            done = True
                            break
                        if lazy and m_first is not None and kept >= limit and _plain_token_chunk(data):
                            res.chunks += 1
                            itl.append(now - m_last)
                            m_last = now
                            continue
                        chunk = _stream_event(data)
                        usage = chunk.get("usage")
                        if usage:
                            res.prompt_tokens = usage.get("prompt_tokens")
                            res.completion_tokens = usage.get("completion_tokens")
                            details = usage.get("prompt_tokens_details") or {}
                            res.cached_tokens = details.get("cached_tokens")
                        for choice in chunk.get("choices") or ():
                            # One chunk per engine step that produced tokens, even when their text is
                            # empty (special tokens under ignore_eos, half a UTF-8 character): vLLM
                            # sends it, and its benchmark counts it, for TTFT and ITL alike.
                            if chat:
                                delta = choice.get("delta") or {}
                                if (
                                    "role" in delta
                                    and not delta.get("content")
                                    and not choice.get("finish_reason")
                                ):
                                    continue  # the chat stream's opening chunk: a role, no token
                                text = delta.get("content") or ""
                            else:
                                text = choice.get("text") or ""
                            if choice.get("finish_reason"):
                                res.finish_reason = choice["finish_reason"]
                            if on_chunk is not None:
                                on_chunk(text, choice.get("finish_reason"))
                            res.chunks += 1
                            if m_first is None:
                                m_first = now
                                t_first = now_ns()
                                if on_first_token:
                                    on_first_token()
                            else:
                                itl.append(now - m_last)
                            m_last = now
                            if text_chars is None:
                                parts.append(text)
                            elif kept < text_chars:
                                parts.append(text[: text_chars - kept])
                                kept += len(parts[-1])
                if not done:
                    # A clean close without the terminator: the engine stopped mid-answer.
                    raise EngineError(f"engine stream ended before [DONE] after {res.chunks} token chunks")
                m_end = time.perf_counter()
                res.t_end = now_ns()
                if not content.is_eof():
                    # The body's closing chunk can come in a read of its own after [DONE].
                    # aiohttp keeps a connection only once its body was read to the end: leaving
                    # before that closes it, and the next job pays a new TCP connection on both
                    # sides (tests/test_bench_sim.py shows it on a zero-latency simulator).
                    await _drain(content)
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise EngineError(f"engine timed out streaming: {e!r}") from e
        except aiohttp.ClientConnectorError as e:
            raise EngineError(f"engine not reachable at {self.base_url}: {e!r}", unavailable=True) from e
        except aiohttp.ClientError as e:
            raise EngineError(f"engine connection lost while streaming: {e!r}") from e
        except ValueError as e:  # an unreadable body (aiohttp's own checks): not an answer we can use
            raise EngineError(f"engine sent an unreadable stream: {e}") from e
        if m_first is None:  # no token at all (max_tokens=0 or engine sent none)
            m_first, t_first = m_end, res.t_end
        res.t_first_token = t_first
        res.ttft_s = m_first - m0
        res.decode_s = m_end - m_first
        res.total_s = m_end - m0
        res.itl_s = [round(x, 6) for x in itl]
        res.text = "".join(parts)
        return res


async def _drain(content: aiohttp.StreamReader) -> None:
    """Read what is left of a finished answer's body (its closing chunk), within bounds.

    The answer is complete already: whatever happens here (a slow or broken ending) only means
    the connection is not reused.
    """
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, ValueError):
        async with asyncio.timeout(_DRAIN_S):
            left = MAX_EVENT_BYTES
            while left > 0 and (block := await content.readany()):
                left -= len(block)


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

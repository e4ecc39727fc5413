"""The two ways a request travels: through the pipeline, or straight to the engine.

Both fill a :class:`~bench.records.RequestRecord`. The direct path streams from
the engine with :class:`services.engine_client.EngineClient` exactly as the
inference worker does, so its TTFT and ITL are vLLM's client-side
definitions. The pipeline path submits a job to ingestion and long-polls it;
its TTFT and ITL are the engine-side figures the inference worker measured
(same client code), its E2EL is the benchmark client's own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.records import RequestRecord
from bench.workload import WorkItem
from services import stream_http
from services.contracts import (
    MAX_WAIT_S,
    JobAccepted,
    JobRequest,
    JobState,
    JobView,
    RoutingPolicy,
    end_to_end_s,
    engine_time_s,
    now_ns,
)
from services.engine_client import EngineClient, EngineError
from services.prompts import PromptBuilder, prefix_seed_for_run, split_tokens
from services.runtime import cancel_and_wait
from services.settings import Settings


@dataclass
class StepClock:
    """The zero of a run step, on the monotonic and the wall clock at once."""

    t0: float = field(default_factory=time.perf_counter)
    t0_ns: int = field(default_factory=now_ns)

    def now(self) -> float:
        """Seconds since the step started (monotonic)."""
        return time.perf_counter() - self.t0

    def wall_offset(self, t_ns: int | None) -> float | None:
        """A wall-clock ns timestamp (possibly another process's) as seconds since the step started."""
        return None if t_ns is None else (t_ns - self.t0_ns) / 1e9


def token_mismatches(
    requested_in: int | None, requested_out: int, prompt_tokens: int | None, completion_tokens: int | None
) -> list[str]:
    """Human-readable differences between asked and served token counts (the worker's wording)."""
    out: list[str] = []
    if requested_in is not None and prompt_tokens != requested_in:
        out.append(f"prompt_tokens {prompt_tokens} != requested {requested_in}")
    if completion_tokens != requested_out:
        out.append(f"completion_tokens {completion_tokens} != requested {requested_out}")
    return out


def _short(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {e}"[:300]


class DirectPath:
    """Requests straight to the engine's OpenAI-compatible API, with the pipeline's prompts."""

    name = "direct"

    def __init__(self, engine: EngineClient, run_id: str, build_concurrency: int = 16) -> None:
        self.engine = engine
        #: Who the completions stream from (the engine here; the OpenAI door on the pipeline).
        self.streamer = engine
        self.run_id = run_id
        self.builder = PromptBuilder(engine)
        self._prompts: dict[int, list[int] | str] = {}
        self._build_sem = asyncio.Semaphore(build_concurrency)

    async def prepare(self, items: list[WorkItem]) -> None:
        """Build every item's prompt before the clock starts (as ``vllm bench serve`` does).

        Prompt building on the pipeline path happens inside the inference worker
        and shows as its ``prompt_build`` stage.
        """

        async def one(it: WorkItem) -> None:
            if it.prompt is not None:
                self._prompts[it.seed_for(self.name)] = it.prompt
                return
            assert it.input_tokens is not None
            async with self._build_sem:
                built = await self.builder.build(
                    it.input_tokens,
                    split_tokens(it.input_tokens, it.prefix_share),
                    prefix_seed_for_run(self.run_id, it.prefix_group),
                    it.seed_for(self.name),
                )
            self._prompts[it.seed_for(self.name)] = built.token_ids

        await asyncio.gather(*(one(it) for it in items))

    def forget(self) -> None:
        """Drop the prepared prompts of a finished phase."""
        self._prompts.clear()

    async def send(self, item: WorkItem, rec: RequestRecord, clock: StepClock, deadline_s: float) -> None:
        """Stream one completion and record vLLM's timings.

        ``deadline_s`` is the step clock time by which the request must be done.
        """
        prompt = self._prompts[item.seed_for(self.name)]
        rec.requested_input_tokens = item.input_tokens
        rec.requested_output_tokens = item.output_tokens
        try:
            async with asyncio.timeout(max(deadline_s - clock.now(), 0.0)):
                # Like vLLM's benchmark client: a timestamp per token chunk, the text not kept.
                res = await self.streamer.stream_completion(
                    prompt, item.output_tokens, exact=True, text_chars=0
                )
                rec.job_id = res.job_id
        except EngineError as e:
            rec.error = str(e)[:500]
            rec.latency_s = clock.now() - rec.sent_s
            return
        except TimeoutError:
            rec.error = "timed out streaming from the engine"
            rec.latency_s = clock.now() - rec.sent_s
            return
        if res.chunks == 0:
            # vLLM's rule: no token chunk, no TTFT, a failed request.
            rec.error = "no token received from the engine"
            rec.latency_s = res.total_s
            return
        rec.success = True
        rec.ttft_s = res.ttft_s
        rec.itl_s = list(res.itl_s)
        # vLLM's latency is start → last token-bearing chunk (not the trailing usage chunk).
        rec.latency_s = res.ttft_s + sum(res.itl_s)
        rec.first_token_s = rec.sent_s + res.ttft_s
        rec.prompt_tokens = res.prompt_tokens
        rec.completion_tokens = res.completion_tokens
        rec.cached_tokens = res.cached_tokens
        rec.token_mismatch = token_mismatches(
            item.input_tokens, item.output_tokens, res.prompt_tokens, res.completion_tokens
        )


def fill_stages(view: JobView, rec: RequestRecord, clock: StepClock) -> None:
    """A job's attempt, state, stages, node and server-side times into ``rec`` (both pipeline APIs)."""
    ts = view.timestamps
    rec.attempt = view.attempt
    rec.state = view.state.value
    rec.stages_s = dict(view.stages_s)
    rec.server_e2e_s = end_to_end_s(ts)
    rec.engine_time_s = engine_time_s(ts)
    rec.node, rec.policy = view.node, view.policy
    rec.node_start_s = clock.wall_offset(ts.get("t_dispatched"))
    rec.node_end_s = clock.wall_offset(ts.get("t_result_received"))
    if rec.server_e2e_s is not None and rec.latency_s is not None:
        rec.client_s = rec.latency_s - rec.server_e2e_s


class OpenAIPipelinePath(DirectPath):
    """The pipeline through ingestion's OpenAI door (``--pipeline-api openai``).

    The same prompts as the direct path (token ids built before the clock starts), streamed from
    ``/v1/completions`` on ingestion with the same client code, so TTFT, TPOT and ITL are timed
    by the client on both paths. Each request is a job; its stage timestamps stay in the job API
    (``X-Job-Id``), not in this record.
    """

    name = "pipeline"

    def __init__(self, settings: Settings, engine: EngineClient, run_id: str, timeout_s: float) -> None:
        super().__init__(engine, run_id)
        self.streamer = EngineClient(
            settings.ingestion_url, settings.api_key.get_secret_value(), timeout_s=timeout_s
        )

        key = settings.api_key.get_secret_value()
        self.jobs = httpx.AsyncClient(
            base_url=settings.ingestion_url,
            timeout=httpx.Timeout(30.0, connect=5.0),
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )

    async def aclose(self) -> None:
        """Close the door's connections."""
        await self.streamer.aclose()
        await self.jobs.aclose()

    async def send(self, item: WorkItem, rec: RequestRecord, clock: StepClock, deadline_s: float) -> None:
        """Stream through the door (client timings), then add the job's stages from the job API."""
        await super().send(item, rec, clock, deadline_s)
        if not rec.job_id:
            return
        with contextlib.suppress(httpx.HTTPError, ValueError):
            resp = await self.jobs.get(f"/v1/jobs/{rec.job_id}", params={"wait": "10"})
            if resp.status_code != 200:
                return
            view = JobView.model_validate_json(resp.content)
            fill_stages(view, rec, clock)
            if view.result is not None:
                rec.engine, rec.model = view.result.engine, view.result.model


class RunFollower:
    """Follows a run's finished jobs over one connection: ``GET /v1/runs/{id}/results`` (SSE).

    One stream for the whole run instead of a long poll per job, so the client stage measures
    the pipeline rather than the client's own event loop. Events that arrive before their
    submit's answer are kept until asked for; a cut connection resumes after the last event id.

    Each event carries the moment its bytes arrived (``time.perf_counter``, taken once per
    read in the connection's read callback, :mod:`services.stream_http`): a job's latency ends
    there, as the direct path's ends at its last chunk's arrival, and not when the bench's own
    loop gets round to the waiting request (a burst of results is one read, and the waiting
    requests resume one after another). The stream is read over ``stream_http`` rather than
    httpx: httpx parsed each read in pure Python (h11) and stamped it only when the following
    task next ran, behind whatever else the bench's loop had to do in a wave of results.
    """

    def __init__(self, base: str, run_id: str, headers: dict[str, str] | None = None) -> None:
        self.path = f"/v1/runs/{run_id}/results"
        # Keepalive comments come every 15 s: a minute of silence is a dead connection.
        self._pool = stream_http.StreamPool(
            base, headers, connect_timeout_s=5.0, read_timeout_s=60.0, max_idle=1
        )
        self._last = "0"
        self._early: dict[str, tuple[dict[str, Any], float]] = {}
        self._waiters: dict[str, asyncio.Future[tuple[dict[str, Any], float]]] = {}
        self._task: asyncio.Task[None] | None = None
        #: False once ingestion said it has no such endpoint (an older one): callers long-poll.
        self.available = True

    def start(self) -> None:
        """Begin following (idempotent; needs a running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow())

    async def aclose(self) -> None:
        """Stop following."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._pool.aclose()

    async def wait(self, job_id: str, within_s: float) -> tuple[dict[str, Any], float] | None:
        """The view of ``job_id`` (decoded JSON) once it finished, with when its bytes arrived
        (``time.perf_counter``); None after ``within_s`` seconds."""
        raw = self._early.pop(job_id, None)
        if raw is not None or not self.available:
            return raw
        fut: asyncio.Future[tuple[dict[str, Any], float]] = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = fut
        try:
            async with asyncio.timeout(within_s):
                return await fut
        except TimeoutError:
            return self._early.pop(job_id, None)
        finally:
            self._waiters.pop(job_id, None)

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            sink = _EventSink(self)
            try:
                await self._pool.get(f"{self.path}?after={self._last}", sink)
            except stream_http.StreamHttpError:
                pass  # cut, timed out or unreadable: resumed below after the last event
            if sink.status in (404, 405):
                self.available = False
                for fut in self._waiters.values():
                    if not fut.done():
                        fut.set_exception(TimeoutError())
                return
            if sink.status == 200 and sink.events:
                backoff = 0.1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _event(self, event: bytes, arrived: float) -> None:
        """One SSE event (its lines, without the blank line that ended it); comments ignored."""
        event_id, data = "", ""
        for line in event.decode("utf-8", "replace").splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
            elif line.startswith("id:"):
                event_id = line[3:].strip()
        if data:
            self._deliver(event_id, data, arrived)

    def _deliver(self, event_id: str, data: str, arrived: float) -> None:
        if event_id:
            self._last = event_id
        try:  # parsed once here; the path validates the dict into a JobView
            view = json.loads(data)
            job_id = str(view["job_id"])
        except (ValueError, KeyError, TypeError):
            return
        fut = self._waiters.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result((view, arrived))
        else:
            # Finished before its submit answered (or a warm-up job nobody waits for any more):
            # kept, bounded, until asked for.
            self._early[job_id] = (view, arrived)
            if len(self._early) > _EARLY_MAX:
                self._early.pop(next(iter(self._early)))


class _EventSink:
    """Splits a results stream into its events as the reads come, inside the read callback."""

    def __init__(self, follower: RunFollower) -> None:
        self.follower = follower
        self.status = 0
        self.events = 0
        self._buf = b""

    def head(self, status: int, reason: str, headers: dict[str, str]) -> None:
        """Keep the status: only a 200 carries events."""
        self.status = status

    def body(self, data: bytes, now: float) -> bool:
        """Hand every whole event to the follower, stamped with this read's arrival."""
        if self.status != 200:
            return True  # an error's body: not read (the status says enough)
        self._buf += data
        if b"\n\n" in self._buf:
            *events, self._buf = self._buf.split(b"\n\n")
            for event in events:
                self.events += 1
                self.follower._event(event, now)
        if len(self._buf) > _EVENT_MAX:
            raise stream_http.BadResponse(f"a results-stream event over {_EVENT_MAX} bytes")
        return False

    def end(self) -> None:
        """The stream ended (ingestion stopped): the follower reconnects."""


#: The largest results-stream event taken (a job view with every ITL of a long answer is far less).
_EVENT_MAX = 16 << 20
#: Finished-job events kept for jobs nobody waits on yet.
_EARLY_MAX = 100_000
#: How long a job waits on the results stream before it is also read once directly (a safety net
#: for an event that never came: the job is final but its stream entry was trimmed or lost).
_FOLLOW_CHECK_S = 30.0
#: Ingestion's answer to a submit is a short JSON object; more than this is not ingestion.
_SUBMIT_ANSWER_LIMIT = 1 << 20


class PipelinePath:
    """Jobs through ingestion → Redis → proxy worker → inference worker → engine."""

    name = "pipeline"

    def __init__(
        self,
        settings: Settings,
        run_id: str,
        label: str | None,
        *,
        poll_wait_s: float = 30.0,
        max_connections: int = 256,
        client: httpx.AsyncClient | None = None,
        routing: RoutingPolicy | None = None,
    ) -> None:
        self.base = settings.ingestion_url
        self.run_id = run_id
        self.label = label
        self.routing = routing
        self.poll_wait_s = min(poll_wait_s, MAX_WAIT_S)
        # In every Idempotency-Key: a rerun with the same run id must not get the old jobs back.
        self._nonce = secrets.token_hex(4)
        key = settings.api_key.get_secret_value()
        self._own = client is None
        self.follower: RunFollower | None = None
        # Submits go over services.stream_http, the proxy's own client: httpx's pool, which scans
        # every open connection per request, was three quarters of this client's busy time in a
        # py-spy profile at concurrency 32 (the queueing it caused in the bench's own loop showed
        # up as the "client" stage), and aiohttp, used next, cost 2-3 times stream_http's CPU per
        # request (scripts/hop_client.py). The results stream goes over it too (RunFollower).
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._submits = stream_http.StreamPool(
            self.base,
            self._auth,
            connect_timeout_s=5.0,
            read_timeout_s=self.poll_wait_s + 15.0,
            max_idle=max_connections,
        )
        # At most this many submits open at once (the pool itself does not bound its connections).
        self._submit_slots = asyncio.Semaphore(max_connections)
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(self.poll_wait_s + 15.0, connect=5.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )

    async def aclose(self) -> None:
        """Stop following the run's results and close the HTTP client (if this path owns it)."""
        if self.follower is not None:
            await self.follower.aclose()
        await self._submits.aclose()
        if self._own:
            await self.client.aclose()

    async def prepare(self, items: list[WorkItem]) -> None:
        """Nothing to build: the inference worker builds each prompt from the job's numbers."""

    def forget(self) -> None:
        """Nothing kept between phases."""

    def job_request(self, item: WorkItem) -> JobRequest:
        """The job body for an item: the numbers the worker builds the identical prompt from."""
        if item.prompt is not None:
            return JobRequest(
                prompt=item.prompt,
                output_tokens=item.output_tokens,
                run_id=self.run_id,
                label=self.label,
                seed=item.seed_for(self.name),
            )
        return JobRequest(
            input_tokens=item.input_tokens,
            output_tokens=item.output_tokens,
            prefix_share=float(item.prefix_share),
            run_id=self.run_id,
            label=self.label,
            seed=item.seed_for(self.name),
            prefix_group=item.prefix_group,
            routing=self.routing,
        )

    async def send(self, item: WorkItem, rec: RequestRecord, clock: StepClock, deadline_s: float) -> None:
        """Submit, long-poll to a terminal state, and record the job's timings.

        ``deadline_s`` is the step clock time by which the request must be done.
        """
        rec.requested_input_tokens = item.input_tokens
        rec.requested_output_tokens = item.output_tokens
        rec.prefix_group = item.prefix_group
        body = self.job_request(item).model_dump_json(exclude_none=True).encode()
        # The same key on every retry: a POST whose answer was lost is not queued twice.
        headers = {"Idempotency-Key": f"{self.run_id}.{self._nonce}.{item.seed_for(self.name):x}"}
        job_id = await self._submit(body, headers, rec, clock, deadline_s)
        if job_id is None:
            rec.latency_s = clock.now() - rec.sent_s
            return
        rec.job_id = job_id
        view, arrived = await self._result(job_id, rec, clock, deadline_s)
        # The result's arrival: on the results stream, when its bytes came in (see RunFollower).
        rec.latency_s = (arrived - clock.t0 if arrived is not None else clock.now()) - rec.sent_s
        if view is None:
            return
        self._fill(view, rec, clock)

    async def _submit(
        self,
        body: bytes,
        headers: dict[str, str],
        rec: RequestRecord,
        clock: StepClock,
        deadline_s: float,
    ) -> str | None:
        backoff = 0.1
        while True:
            if clock.now() >= deadline_s:
                rec.error = "timed out submitting the job"
                return None
            answer = stream_http.Collect(_SUBMIT_ANSWER_LIMIT)
            try:
                async with self._submit_slots:
                    await self._submits.post("/v1/jobs", body, answer, headers=headers)
            except stream_http.StreamHttpError as e:
                rec.submit_retries += 1
                rec.error = f"ingestion unreachable: {_short(e)}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            status, content = answer.status, bytes(answer.data)
            if status == 202:
                rec.error = ""
                return JobAccepted.model_validate_json(content).job_id
            if status == 429:
                # Over the active-job bound: honour Retry-After, then submit again.
                rec.refused_429 += 1
                await asyncio.sleep(_retry_after(answer.headers, 1.0))
                continue
            if status >= 500:
                rec.submit_retries += 1
                rec.error = f"ingestion {status}: {_detail(content, answer.reason)}"
                await asyncio.sleep(max(_retry_after(answer.headers, backoff), backoff))
                backoff = min(backoff * 2, 5.0)
                continue
            rec.error = f"ingestion refused the job ({status}): {_detail(content, answer.reason)}"
            return None

    async def _result(
        self, job_id: str, rec: RequestRecord, clock: StepClock, deadline_s: float
    ) -> tuple[JobView | None, float | None]:
        """The job's final view: from the run's results stream (with when it arrived, as
        ``time.perf_counter``), else by long-polling it (no arrival: the caller takes now)."""
        if self.follower is None:
            self.follower = RunFollower(self.base, self.run_id, self._auth)
            self.follower.start()
        while self.follower.available:
            remaining = deadline_s - clock.now()
            if remaining <= 0:
                rec.error = f"timed out waiting for job {job_id}"
                return None, None
            got = await self.follower.wait(job_id, min(remaining, _FOLLOW_CHECK_S))
            if got is not None:
                raw, arrived = got
                try:
                    view = JobView.model_validate(raw)
                except ValueError:  # an "expired" marker: the job is gone from Redis already
                    break
                rec.error = ""
                return view, arrived
            if not self.follower.available:
                break
            # No event yet: read the job once (cheap), in case its event was lost.
            view = await self._wait(job_id, rec, clock, min(deadline_s, clock.now() + 0.001))
            if view is not None:
                return view, None
        return await self._wait(job_id, rec, clock, deadline_s), None

    async def _wait(
        self, job_id: str, rec: RequestRecord, clock: StepClock, deadline_s: float
    ) -> JobView | None:
        backoff = 0.1
        while True:
            remaining = deadline_s - clock.now()
            if remaining <= 0:
                rec.error = f"timed out waiting for job {job_id}"
                return None
            wait = max(0.0, min(self.poll_wait_s, remaining))
            try:
                resp = await self.client.get(f"{self.base}/v1/jobs/{job_id}", params={"wait": f"{wait:.3f}"})
            except httpx.TransportError as e:
                rec.error = f"ingestion unreachable while waiting: {_short(e)}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if resp.status_code == 200:
                view = JobView.model_validate_json(resp.content)
                if view.state.terminal:
                    rec.error = ""
                    return view
                continue
            if resp.status_code >= 500:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            rec.error = f"ingestion answered {resp.status_code} for job {job_id}: {_detail(resp.content, resp.reason_phrase)}"
            return None

    def _fill(self, view: JobView, rec: RequestRecord, clock: StepClock) -> None:
        fill_stages(view, rec, clock)
        res = view.result
        if view.state != JobState.SUCCEEDED or res is None:
            rec.error = view.error or f"job ended {view.state.value}"
            return
        rec.success = True
        rec.ttft_s = res.ttft_s
        rec.itl_s = list(res.itl_s)
        rec.first_token_s = clock.wall_offset(res.t_first_token)
        rec.prompt_tokens = res.prompt_tokens
        rec.completion_tokens = res.completion_tokens
        rec.cached_tokens = res.cached_tokens
        rec.token_mismatch = list(res.token_mismatch)
        rec.gpu = res.gpu.model_dump(mode="json") if res.gpu is not None else None
        rec.engine, rec.model, rec.node = res.engine, res.model, res.node
        rec.prefix_tokens = res.prefix_tokens


def _retry_after(headers: Mapping[str, str], default: float) -> float:
    with contextlib.suppress(TypeError, ValueError):
        # Lower-case: httpx's headers look names up either way, stream_http's answer has them lower-cased.
        return min(max(float(headers.get("retry-after", default)), 0.0), 60.0)
    return default


def _detail(content: bytes, reason: str) -> str:
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")[:300] or reason
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]

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
import secrets
import time
from dataclasses import dataclass, field

import httpx

from bench.records import RequestRecord
from bench.workload import WorkItem
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
                res = await self.engine.stream_completion(prompt, item.output_tokens, exact=True)
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
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(self.poll_wait_s + 15.0, connect=5.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )

    async def aclose(self) -> None:
        """Close the HTTP client (if this path owns it)."""
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
        body = self.job_request(item).model_dump(mode="json", exclude_none=True)
        # The same key on every retry: a POST whose answer was lost is not queued twice.
        headers = {"Idempotency-Key": f"{self.run_id}.{self._nonce}.{item.seed_for(self.name):x}"}
        job_id = await self._submit(body, headers, rec, clock, deadline_s)
        if job_id is None:
            rec.latency_s = clock.now() - rec.sent_s
            return
        rec.job_id = job_id
        view = await self._wait(job_id, rec, clock, deadline_s)
        rec.latency_s = clock.now() - rec.sent_s
        if view is None:
            return
        self._fill(view, rec, clock)

    async def _submit(
        self,
        body: dict[str, object],
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
            try:
                resp = await self.client.post(f"{self.base}/v1/jobs", json=body, headers=headers)
            except httpx.TransportError as e:
                rec.submit_retries += 1
                rec.error = f"ingestion unreachable: {_short(e)}"
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if resp.status_code == 202:
                rec.error = ""
                return JobAccepted.model_validate_json(resp.content).job_id
            if resp.status_code == 429:
                # Over the active-job bound: honour Retry-After, then submit again.
                rec.refused_429 += 1
                await asyncio.sleep(_retry_after(resp, 1.0))
                continue
            if resp.status_code >= 500:
                rec.submit_retries += 1
                rec.error = f"ingestion {resp.status_code}: {_detail(resp)}"
                await asyncio.sleep(max(_retry_after(resp, backoff), backoff))
                backoff = min(backoff * 2, 5.0)
                continue
            rec.error = f"ingestion refused the job ({resp.status_code}): {_detail(resp)}"
            return None

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
            rec.error = f"ingestion answered {resp.status_code} for job {job_id}: {_detail(resp)}"
            return None

    def _fill(self, view: JobView, rec: RequestRecord, clock: StepClock) -> None:
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


def _retry_after(resp: httpx.Response, default: float) -> float:
    with contextlib.suppress(TypeError, ValueError):
        return min(max(float(resp.headers.get("Retry-After", default)), 0.0), 60.0)
    return default


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]

"""The OpenAI-compatible door of ingestion, driven by the official ``openai`` client, on the simulator."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import BenchConfig, run_benchmark
from services.contracts import STAGE_NAMES, TIMESTAMPS, Keys, VllmMetric
from services.engine_client import metric_sum, parse_prometheus
from services.sim_engine import FAIL_MARKER
from tests.stackutil import Stack, wait_until

pytestmark = pytest.mark.slow  # a four-process stack on the simulator


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(
        base_url=f"{stack.settings.ingestion_url}/v1",
        api_key=stack.values["api_key"],
        max_retries=0,
        timeout=60,
    )
    yield c
    c.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def _job(stack: Stack, http: httpx.Client, job_id: str) -> dict[str, object]:
    return stack.wait_job(http, job_id)


def test_models_lists_what_the_nodes_serve(stack: Stack, client: openai.OpenAI) -> None:
    # The node's heartbeat names its model from its first beat after the engine was ready.
    wait_until(lambda: bool(client.models.list().data), 30, "a model in /v1/models")
    assert [m.id for m in client.models.list()] == ["llmconsole-sim"]


def test_completion_not_streamed_is_a_job_with_every_stage(
    stack: Stack, client: openai.OpenAI, http: httpx.Client
) -> None:
    raw = client.completions.with_raw_response.create(
        model="llmconsole-sim",
        prompt="tell me about the sea",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "min_tokens": 12},
    )
    resp = raw.parse()
    assert resp.object == "text_completion" and resp.usage is not None
    assert resp.usage.completion_tokens == 12 and resp.usage.prompt_tokens > 0
    assert resp.choices[0].text and resp.choices[0].finish_reason == "length"
    job = _job(stack, http, raw.headers["x-job-id"])
    assert job["state"] == "succeeded"
    ts = job["timestamps"]
    assert isinstance(ts, dict) and all(ts[k] is not None for k in TIMESTAMPS), ts
    assert job["spec"]["openai"]["endpoint"] == "completions"  # type: ignore[index]


def test_completion_streamed_with_usage(stack: Stack, client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="llmconsole-sim",
        prompt="once upon a time",
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    # One SSE chunk per engine chunk, even when the worker batched several into one Redis write.
    assert len(texts) == 20 and finish == "length"
    assert usage is not None and usage.completion_tokens == 20


def test_chat_not_streamed_and_streamed(stack: Stack, client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "you are terse"},
        {"role": "user", "content": "hello there"},
    ]
    resp = client.chat.completions.create(
        model="llmconsole-sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model="llmconsole-sim",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    roles, contents, usage = [], [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.role:
                roles.append(delta.role)
            if delta.content:
                contents.append(delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert roles == ["assistant"] and len(contents) == 8
    assert usage is not None and usage.completion_tokens == 8


def test_wrong_key_is_401(stack: Stack) -> None:
    bad = openai.OpenAI(base_url=f"{stack.settings.ingestion_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model="llmconsole-sim", prompt="hi", max_tokens=2)
    assert e.value.status_code == 401
    body = e.value.body
    assert isinstance(body, dict) and "API key" in str(body.get("message"))
    bad.close()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
        ({"extra_body": {"logprobs": 5}}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_fields_are_400_in_openai_format(
    stack: Stack, client: openai.OpenAI, extra: dict[str, object], param: str
) -> None:
    kwargs: dict[str, object] = {"model": "llmconsole-sim", "prompt": "hi", "max_tokens": 3, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert e.value.status_code == 400
    body = e.value.body
    assert isinstance(body, dict) and body.get("type") == "invalid_request_error"
    assert param in str(body.get("param")) or param in str(body.get("message"))


def test_unknown_model_is_404_and_bad_json_400(
    stack: Stack, client: openai.OpenAI, http: httpx.Client
) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    r = http.post(
        f"{stack.settings.ingestion_url}/v1/chat/completions",
        content=b"{not json",
        headers={**stack.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = http.post(
        f"{stack.settings.ingestion_url}/v1/chat/completions",
        json={"messages": [], "model": "llmconsole-sim"},
        headers=stack.headers,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_failure_before_the_first_token_is_retried_then_an_http_error(
    stack: Stack, client: openai.OpenAI, http: httpx.Client
) -> None:
    # The engine fails every attempt before any token: retried as any job, then dead; the client
    # gets an HTTP error, not a 200 stream.
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(
            model="llmconsole-sim", prompt=f"x {FAIL_MARKER}", max_tokens=3, stream=True
        )
    assert e.value.status_code == 503
    job = stack.wait_job(http, e.value.response.headers["x-job-id"])
    assert job["state"] == "dead" and "gave up after 3 tries" in str(job["error"]), job


def _running(stack: Stack, http: httpx.Client) -> float:
    text = http.get(f"{stack.settings.engine_url}/metrics").text
    return metric_sum(parse_prometheus(text), VllmMetric.RUNNING) or 0.0


def _generated(stack: Stack, http: httpx.Client) -> float:
    text = http.get(f"{stack.settings.engine_url}/metrics").text
    return metric_sum(parse_prometheus(text), VllmMetric.GENERATION_TOKENS) or 0.0


def test_client_disconnect_cancels_job_and_engine_request(stack: Stack, http: httpx.Client) -> None:
    body = {
        "model": "llmconsole-sim",
        "prompt": "a long story",
        "max_tokens": 1900,
        "ignore_eos": True,
        "stream": True,
    }
    url = f"{stack.settings.ingestion_url}/v1/completions"
    generated = _generated(stack, http)
    with http.stream("POST", url, json=body, headers=stack.headers) as resp:
        assert resp.status_code == 200
        job_id = resp.headers["x-job-id"]
        # Lines are pulled one by one: leaving an httpx line iterator (a break) closes the connection.
        lines = resp.iter_lines()
        seen = 0
        while seen < 5:
            line = next(lines)
            if line.startswith("data: {"):
                json.loads(line[6:])
                seen += 1
        assert _running(stack, http) >= 1  # the engine request is running while the client reads
    # The client went away: the job ends failed with the reason, and the engine request is gone.
    job = stack.wait_job(http, job_id, timeout=30)
    assert job["state"] == "failed", job
    assert "cancel" in str(job["error"]), job
    wait_until(lambda: _running(stack, http) == 0, 10, "the engine's running count back to 0")
    assert job["result"] is None
    # aborted, not run to its end: far fewer than the 1900 tokens asked were generated
    assert _generated(stack, http) - generated < 1900


def test_non_streamed_client_disconnect_cancels(stack: Stack, http: httpx.Client) -> None:
    body = {"model": "llmconsole-sim", "prompt": "a long story", "max_tokens": 1900, "ignore_eos": True}
    url = f"{stack.settings.ingestion_url}/v1/completions"
    generated = _generated(stack, http)
    with pytest.raises(httpx.ReadTimeout):
        http.post(url, json=body, headers=stack.headers, timeout=1.0)  # gives up before the answer
    rc = stack.redis.client()
    try:
        job_id = str(rc.lindex(f"{stack.values['redis_prefix']}recent", 0))
    finally:
        rc.close()
    job = stack.wait_job(http, job_id, timeout=30)
    assert job["state"] == "failed" and "cancel" in str(job["error"]), job
    wait_until(lambda: _running(stack, http) == 0, 10, "the engine's running count back to 0")
    assert _generated(stack, http) - generated < 1900


async def test_bench_through_the_openai_door(stack: Stack, tmp_path: Path) -> None:
    cfg = BenchConfig(
        input_tokens=64,
        output_tokens=6,
        requests=8,
        concurrency=4,
        path="both",
        pipeline_api="openai",
        plots=False,
        out=str(tmp_path / "run"),
    )
    res = await run_benchmark(cfg, settings=stack.settings)
    pipe, direct = res.summary["paths"]["pipeline"], res.summary["paths"]["direct"]
    assert pipe["completed"] == direct["completed"] == 8
    assert pipe["total_input_tokens"] == direct["total_input_tokens"] == 8 * 64
    assert pipe["total_output_tokens"] == 8 * 6 and pipe["token_mismatches"] == 0
    prec = [r for r in res.records if r.path == "pipeline"]
    # client-timed as on the direct path: one ITL per token after the first
    assert all(r.ttft_s and len(r.itl_s) == 5 for r in prec)
    # each request a job of the pipeline, its stages filled in from the job API
    assert all(r.job_id and r.state == "succeeded" and r.server_e2e_s for r in prec)
    for name in STAGE_NAMES:
        assert pipe["stages"][name]["count"] == 8, name


def test_failure_after_the_first_token_ends_the_stream_with_an_error(
    make_stack: Callable[..., Stack],
) -> None:
    # The engine dies mid-stream: tokens already reached the client, so the job is not restarted
    # (that would send them twice); the stream ends with an OpenAI error event, the job fails.
    stk = make_stack(max_attempts=3)
    body = {"model": "llmconsole-sim", "prompt": "x", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    events: list[dict[str, object]] = []
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", f"{stk.settings.ingestion_url}/v1/completions", json=body, headers=stk.headers
        ) as r:
            assert r.status_code == 200
            job_id = r.headers["x-job-id"]
            done = False
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                    break
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 5:
                        stk.procs["engine"].kill()
        assert done and "error" in events[-1], events[-3:]
        assert events[-1]["error"]["code"] == "stream_broken"  # type: ignore[index]
        job = stk.wait_job(http, job_id)
    assert job["state"] == "failed" and "stream broken" in str(job["error"]), job
    assert job["attempt"] == 1


def test_a_job_cancelled_while_queued_never_runs(make_stack: Callable[..., Stack]) -> None:
    stk = make_stack()
    stk.procs["proxy_worker"].stop()  # nothing takes jobs: the request's job waits in the stream
    body = {"model": "llmconsole-sim", "prompt": "x", "max_tokens": 50, "stream": True}
    url = f"{stk.settings.ingestion_url}/v1/completions"
    with httpx.Client() as http:
        with pytest.raises(httpx.ReadTimeout):
            # no header before the first token: the client gives up while the job is queued
            http.post(url, json=body, headers={**stk.headers, "X-Run-Id": "cancelq"}, timeout=1.0)
        r = http.get(f"{stk.settings.ingestion_url}/v1/queue", headers=stk.headers)
        assert r.json()["active"] == 1
        keys = Keys(stk.values["redis_prefix"])
        rc = stk.redis.client()
        try:
            job_id = str(rc.lindex(keys.recent, 0))
            # Ingestion marks the job cancelled once it has seen the client go; only then may a
            # proxy take it (a proxy started sooner could start it first: a cancel mid-run, a
            # different ending, which another test covers).
            wait_until(lambda: rc.exists(keys.cancelled(job_id)), 10, "ingestion's cancel mark")
        finally:
            rc.close()
        stk.procs["proxy_worker"].start()
        stk.wait_consumer(stk.procs["proxy_worker"])
        # the job (found through its run) ends failed without ever reaching the engine
        job = stk.wait_job(http, job_id)
        assert job["state"] == "failed" and "before the job started" in str(job["error"]), job
        assert job["spec"]["run_id"] == "cancelq"  # type: ignore[index]
        assert job["timestamps"]["t_engine_start"] is None  # type: ignore[index]
        assert _running(stk, http) == 0


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=st.dictionaries(
        st.sampled_from(
            [
                "model",
                "prompt",
                "messages",
                "max_tokens",
                "min_tokens",
                "temperature",
                "top_p",
                "seed",
                "stop",
                "n",
                "stream_options",
                "ignore_eos",
                "logprobs",
                "max_completion_tokens",
                "whatever",
            ]
        ),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=30),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=6,
    ),
)
def test_no_server_error_on_any_body(stack: Stack, endpoint: str, body: dict[str, object]) -> None:
    # Bodies that happen to be valid run as jobs (short ones: capped below); none may be a 5xx.
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(int(body["max_tokens"]), 8)  # type: ignore[call-overload]
    body.pop("stream", None)
    r = httpx.post(f"{stack.settings.ingestion_url}{endpoint}", json=body, headers=stack.headers, timeout=60)
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"], r.text

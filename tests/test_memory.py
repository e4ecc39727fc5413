"""Redis memory: a finished job's footprint, and a full Redis that refuses new jobs, then recovers.

Both run the real pipeline on the simulator against a Redis of their own, configured with the
memory settings ``services.lifecycle.redis_launch`` gives the production Redis.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from bench.config import BenchConfig
from bench.runner import run_benchmark
from services.contracts import Keys
from services.lifecycle.redis_launch import memory_config
from services.settings import Settings
from tests.stackutil import RedisServer, Stack, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

#: The issue's bound on one finished 500-token job, its share of run records included.
JOB_BYTES_MAX = 4096
PASSWORD = "mem-test-pw"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (maxmemory is server-wide), with production memory settings."""
    srv = RedisServer(tmp_path / "redis", password=PASSWORD)
    srv.start()
    r = redis.Redis(port=srv.port, password=PASSWORD)
    for k, v in memory_config(Settings(_env_file=None, redis_maxmemory_mb=256)).items():  # type: ignore[call-arg]
        r.config_set(k, v)
    r.close()
    yield srv
    srv.stop()


def _redis(st: Stack) -> redis.Redis:
    return redis.Redis(port=st.redis.port, password=PASSWORD, decode_responses=True)


def _usage(r: redis.Redis, key: str) -> int:
    return int(r.memory_usage(key, samples=0) or 0)


async def test_finished_500_token_job_takes_at_most_4_kb(
    own_redis: RedisServer, make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    st = make_stack(redis=own_redis, proxy_concurrency=16)
    n = 40
    cfg = BenchConfig(input_tokens=1000, output_tokens=500, requests=n, concurrency=10, path="pipeline",
                      plots=False, out=str(tmp_path / "run"))  # fmt: skip
    res = await run_benchmark(cfg, settings=st.settings)
    assert res.summary["completed"] == n, res.summary
    # The API still gave every job's full result: 499 ITLs each, decoded from the compact form.
    assert all(len(rec.itl_s) == 499 and rec.completion_tokens == 500 for rec in res.records)

    keys = Keys(st.settings.redis_prefix)
    r = _redis(st)
    try:
        job_bytes = [_usage(r, keys.job(rec.job_id or "")) for rec in res.records]
        assert all(job_bytes), "every job is still retained"
        run_keys = (keys.run(res.run_id), keys.run_jobs(res.run_id), keys.run_done(res.run_id))
        run_bytes = sum(_usage(r, k) for k in run_keys)
        assert not r.exists(keys.run_jobs(res.run_id)), "per-request records are not kept in Redis"
        # Each job's share of the indexes that name it: the retention index and the recent list.
        index_share = _usage(r, keys.finished) / r.zcard(keys.finished) + _usage(r, keys.recent) / r.llen(
            keys.recent
        )
        runs_share = _usage(r, keys.runs) / max(r.zcard(keys.runs), 1)
    finally:
        r.close()
    per_job = max(job_bytes) + (run_bytes + runs_share) / n + index_share
    print(
        f"job hash max {max(job_bytes)} B (min {min(job_bytes)}), run hash {run_bytes} B over {n} jobs, "
        f"index share {index_share:.0f} B: {per_job:.0f} B a job"
    )
    assert per_job <= JOB_BYTES_MAX, f"{per_job:.0f} B a job (job hashes {job_bytes})"


def _finishes(r: redis.Redis, key: str) -> list[tuple[str, str]]:
    """(job id, final state) for every finish of a run, in order: the run's results stream, which
    the fenced finish writes once per job (not lossy like pub/sub across reconnects)."""
    return [(f["job_id"], f["state"]) for _id, f in r.xrange(key)]


def _full_redis_stack(
    make_stack: Callable[..., Stack], own_redis: RedisServer, proxy_concurrency: int
) -> tuple[Stack, Keys, redis.Redis, str]:
    """A stack on the test's own Redis with quick retention and no token pacing: the stack, its
    keys, a client of its Redis and the submit URL."""
    st = make_stack(
        redis=own_redis, proxy_concurrency=proxy_concurrency, sim_itl_ms=0, retention_interval_s=0.2
    )
    return st, Keys(st.settings.redis_prefix), _redis(st), f"{st.settings.ingestion_url}/v1/jobs"


def _succeeded(r: redis.Redis, keys: Keys, run_id: str) -> set[str]:
    """Jobs of the run that finished succeeded (its results stream)."""
    return {j for j, state in _finishes(r, keys.run_done(run_id)) if state == "succeeded"}


def test_full_redis_refuses_new_jobs_finishes_accepted_ones_and_recovers(
    own_redis: RedisServer, make_stack: Callable[..., Stack]
) -> None:
    st, keys, r, url = _full_redis_stack(make_stack, own_redis, proxy_concurrency=8)
    run_id = "fill"

    def succeeded() -> set[str]:
        return _succeeded(r, keys, run_id)

    try:
        limit = int(r.info("memory")["used_memory"]) + 16 * 1024 * 1024
        r.config_set("maxmemory", limit)
        with httpx.Client(timeout=30) as c:
            # Finished jobs first: what retention may prune when Redis fills up.
            early = [
                st.submit(c, input_tokens=32, output_tokens=40, seed=i, run_id=run_id) for i in range(100)
            ]
            wait_until(lambda: set(early) <= succeeded(), 120, "the first jobs to succeed")

            # With the proxy worker frozen, accepted jobs pile up (8 KB prompts) until ingestion refuses.
            st.procs["proxy_worker"].signal(signal.SIGSTOP)
            accepted: list[str] = []
            refusal: httpx.Response | None = None
            for i in range(6000):
                body = {"prompt": "w" * 8_000, "output_tokens": 4, "seed": i, "run_id": run_id}
                resp = c.post(url, json=body, headers=st.headers)
                if resp.status_code == 503:
                    refusal = resp
                    break
                assert resp.status_code == 202, resp.text
                accepted.append(resp.json()["job_id"])
            assert refusal is not None, f"no refusal after {len(accepted)} jobs of 8 KB"
            detail = refusal.json()["detail"]
            assert "maxmemory" in detail and f"{limit / 2**20:.1f} MiB" in detail, detail
            assert refusal.headers.get("Retry-After")
            used = int(r.info("memory")["used_memory"])
            assert used < limit, "ingestion refused before Redis itself would have"

            # Every accepted job still finishes, and retention makes room: submits are accepted again.
            st.procs["proxy_worker"].signal(signal.SIGCONT)
            wait_until(lambda: set(accepted) <= succeeded(), 180, f"{len(accepted)} accepted jobs to succeed")
            later: list[str] = []

            def accepted_again() -> bool:
                body = {"input_tokens": 32, "output_tokens": 4, "run_id": run_id}
                resp = c.post(url, json=body, headers=st.headers)
                if resp.status_code == 202:
                    later.append(resp.json()["job_id"])
                return resp.status_code == 202

            wait_until(accepted_again, 120, "a submit to be accepted again", interval=0.2)
            wait_until(lambda: set(later) <= succeeded(), 60, "the new job to succeed")
        finishes = _finishes(r, keys.run_done(run_id))
        everyone = [*early, *accepted, *later]
        # Each accepted job finished exactly once, and succeeded; nothing else finished.
        assert sorted(j for j, _s in finishes) == sorted(everyone)
        assert {state for _j, state in finishes} == {"succeeded"}
        stats = r.hgetall(keys.stats)
        assert int(stats["succeeded"]) == len(everyone), stats
        assert int(r.info("memory")["used_memory"]) < limit
    finally:
        r.close()


def test_accepted_jobs_finish_with_redis_over_its_maxmemory(
    own_redis: RedisServer, make_stack: Callable[..., Stack]
) -> None:
    # Ingestion refuses new jobs from REDIS_MEMORY_REFUSE_PCT of maxmemory up, reading Redis's
    # memory every 200 ms: a burst of submits between two readings can take Redis past its limit.
    # Then Redis refuses every write that adds memory (noeviction), so no accepted job could
    # start or finish, and with none finished retention had nothing to prune: they waited for
    # ever (a run of the test above saw it). The scripts that carry accepted jobs to their end may
    # go past the limit (Redis's allow-oom); only a new job is refused.
    st, keys, r, url = _full_redis_stack(make_stack, own_redis, proxy_concurrency=4)
    run_id = "over"
    try:
        with httpx.Client(timeout=30) as c:
            st.procs["proxy_worker"].stop()
            accepted = [
                st.submit(c, prompt="w" * 8_000, output_tokens=4, seed=i, run_id=run_id) for i in range(200)
            ]
            limit = int(r.info("memory")["used_memory"]) - 256 * 1024
            r.config_set("maxmemory", limit)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                r.set(f"{keys.prefix}probe", "x" * 1000)  # Redis is past its limit now
            wait_until(
                lambda: (
                    c.post(url, json={"input_tokens": 32, "output_tokens": 4}, headers=st.headers).status_code
                    == 503
                ),
                5,
                "ingestion's refusal",
                interval=0.1,
            )
            st.procs["proxy_worker"].start()
            wait_until(
                lambda: set(accepted) <= _succeeded(r, keys, run_id),
                60,
                f"{len(accepted)} accepted jobs to succeed",
            )
            # Finished, they are retention's to prune: Redis comes back under its limit and new
            # jobs are accepted again.
            wait_until(
                lambda: int(r.info("memory")["used_memory"]) < limit, 30, "Redis under its limit again"
            )
            later = st.submit(c, input_tokens=32, output_tokens=4, run_id=run_id)
            assert st.wait_job(c, later)["state"] == "succeeded"
        assert sorted(j for j, _s in _finishes(r, keys.run_done(run_id))) == sorted([*accepted, later])
    finally:
        r.close()

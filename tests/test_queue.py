"""The Redis Streams queue against a real redis-server: fencing, reclaim, idempotency, bounds, trim."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.contracts import JobSpec, JobState, Keys, new_id, now_ns, prefix_key
from services.queue import JobQueue
from tests.stackutil import RedisServer


@pytest.fixture
async def q(redis_server: RedisServer) -> AsyncIterator[JobQueue]:
    r = aioredis.Redis(port=redis_server.port, password=redis_server.password, decode_responses=True)
    queue = JobQueue(r, Keys(f"tq{new_id()[-8:]}:"))
    await queue.ensure_group()
    yield queue
    await r.aclose()


def _spec(**kw: object) -> JobSpec:
    return JobSpec(job_id=new_id("j"), input_tokens=10, output_tokens=5, prefix_share=0.5, seed=1, **kw)


async def test_submit_claim_finish(q: JobQueue) -> None:
    spec = _spec()
    out = await q.submit(spec, now_ns(), max_active=10)
    assert out.status == "ok" and out.job_id == spec.job_id
    entries = await q.read("c1", count=10, block_ms=100)
    assert [e.job_id for e in entries] == [spec.job_id]
    # The entry carries the routing hints the proxy worker chooses a node from before the claim.
    assert entries[0].prefix == prefix_key(spec) != "" and entries[0].routing == ""
    d = await q.start(entries[0][0], spec.job_id, "c1")
    assert d is not None and d.attempt == 1
    assert (await q.get_job(spec.job_id))["state"] == "running"
    assert await q.finish(d, JobState.SUCCEEDED, {"result": "{}", "t_finished": now_ns()}, ttl_s=60)
    h = await q.get_job(spec.job_id)
    assert h["state"] == "succeeded"
    st = await q.stats()
    assert st.active == 0 and st.in_flight == 0 and st.counters["succeeded"] == 1
    assert 0 < await q.r.ttl(q.keys.job(spec.job_id)) <= 60


async def test_reclaimed_job_refuses_late_result(q: JobQueue) -> None:
    spec = _spec()
    await q.submit(spec, now_ns(), max_active=10)
    ((entry, job_id, *_),) = await q.read("frozen", count=1, block_ms=100)
    d1 = await q.start(entry, job_id, "frozen")
    assert d1 is not None
    # The frozen consumer stops renewing; another takes the job over after the lease.
    reclaimed = await q.reclaim("alive", min_idle_ms=0)
    assert [(e.entry_id, e.job_id) for e in reclaimed] == [(entry, job_id)]
    d2 = await q.start(entry, job_id, "alive")
    assert d2 is not None and d2.attempt == 2
    # The late worker wakes up: its renew and its result are refused.
    assert not await q.renew(d1, "frozen")
    assert not await q.finish(d1, JobState.SUCCEEDED, {"result": "late"}, ttl_s=60)
    assert await q.finish(d2, JobState.SUCCEEDED, {"result": "current"}, ttl_s=60)
    h = await q.get_job(job_id)
    assert h["result"] == "current" and h["attempt"] == "2"
    # Written once: a second finish of the same attempt (a re-sent call) changes nothing.
    await q.finish(d2, JobState.SUCCEEDED, {"result": "again"}, ttl_s=60)
    assert (await q.get_job(job_id))["result"] == "current"
    assert (await q.stats()).counters["succeeded"] == 1


async def test_scripts_sent_twice_act_once(q: JobQueue) -> None:
    # redis-py re-sends a command whose reply timed out or whose connection dropped, after Redis
    # may already have run it: submit, start and finish must act once when sent twice.
    spec = _spec()
    keys = [q.keys.job(spec.job_id), q.keys.stream, q.keys.active, q.keys.stats, q.keys.recent, ""]
    args = [spec.job_id, spec.model_dump_json(), now_ns(), now_ns(), 10, 60, q.keys.events, "", "", 100]
    args += [q.group, prefix_key(spec), ""]
    assert await q._submit(keys=keys, args=args) == ["ok", spec.job_id]
    assert await q._submit(keys=keys, args=args) == ["ok", spec.job_id]
    assert await q.r.xlen(q.keys.stream) == 1
    st = await q.stats()
    assert st.active == 1 and st.counters["submitted"] == 1

    ((entry, job_id, *_),) = await q.read("c1", count=1, block_ms=100)
    start_args = [entry, "c1", now_ns(), q.group, q.keys.events, "nonce-1"]
    start_keys = [q.keys.job(job_id), q.keys.stream, q.keys.stats]
    first = await q._start(keys=start_keys, args=start_args)
    assert first[:2] == [1, "running"] and first[2] == spec.model_dump_json()  # the claim carries the spec
    assert await q._start(keys=start_keys, args=start_args) == first
    assert (await q.get_job(job_id))["attempt"] == "1" and "redelivered" not in (await q.stats()).counters
    # A real redelivery (another call, another nonce) is a new attempt.
    assert (await q._start(keys=start_keys, args=[*start_args[:5], "nonce-2"]))[:2] == [2, "running"]

    d = await q.start(entry, job_id, "c1", nonce="nonce-3")
    again = await q.start(entry, job_id, "c1", nonce="nonce-3")  # the proxy's own re-send
    assert d is not None and d.attempt == 3 and again == d
    assert d.spec_json == spec.model_dump_json() and d.stamps["t_received"] and d.stamps["t_enqueued"]
    for _ in range(2):
        assert await q.finish(d, JobState.SUCCEEDED, {"result": "{}"}, ttl_s=60)
    st = await q.stats()
    assert st.active == 0 and st.counters["succeeded"] == 1


async def test_redelivery_of_finished_job_is_acked_not_rerun(q: JobQueue) -> None:
    spec = _spec()
    await q.submit(spec, now_ns(), max_active=10)
    ((entry, job_id, *_),) = await q.read("c", count=1, block_ms=100)
    d = await q.start(entry, job_id, "c")
    assert d is not None
    await q.r.hset(q.keys.job(job_id), "state", "succeeded")  # finished, but the ack was lost
    assert await q.start(entry, job_id, "c2") is None
    assert (await q.stats()).in_flight == 0


async def test_idempotency_key_returns_same_job(q: JobQueue) -> None:
    a = await q.submit(_spec(), now_ns(), max_active=10, idempotency_key="k1")
    b = await q.submit(_spec(), now_ns(), max_active=10, idempotency_key="k1")
    assert a.status == "ok" and b.status == "dup" and b.job_id == a.job_id
    assert await q.r.xlen(q.keys.stream) == 1
    fa = await q.submit(_spec(), now_ns(), max_active=10, idempotency_key="k2", fingerprint="f1")
    fb = await q.submit(_spec(), now_ns(), max_active=10, idempotency_key="k2", fingerprint="f1")
    fc = await q.submit(_spec(), now_ns(), max_active=10, idempotency_key="k2", fingerprint="f2")
    assert (fb.status, fb.job_id) == ("dup", fa.job_id) and (fc.status, fc.job_id) == ("conflict", fa.job_id)
    assert await q.r.xlen(q.keys.stream) == 2


async def test_bound_refuses_above_max_active(q: JobQueue) -> None:
    for _ in range(3):
        assert (await q.submit(_spec(), now_ns(), max_active=3)).status == "ok"
    out = await q.submit(_spec(), now_ns(), max_active=3)
    assert out.status == "busy" and out.active == 3
    assert await q.r.xlen(q.keys.stream) == 3


async def test_trim_keeps_pending_and_undelivered(q: JobQueue) -> None:
    specs = [_spec() for _ in range(6)]
    for s in specs:
        await q.submit(s, now_ns(), max_active=100)
    entries = await q.read("c", count=4, block_ms=100)
    ds = [await q.start(e, j, "c") for e, j, *_ in entries]
    # Finish the 2nd..4th; the 1st stays pending, 5th and 6th undelivered.
    for d in ds[1:]:
        assert d is not None
        await q.finish(d, JobState.SUCCEEDED, {}, ttl_s=60)
    await q.trim()
    left = [e for e, _ in await q.r.xrange(q.keys.stream)]
    # The oldest entry is still pending, so nothing at or after it may go.
    assert left[0] == entries[0][0] and len(left) == 6
    d0 = ds[0]
    assert d0 is not None
    await q.finish(d0, JobState.SUCCEEDED, {}, ttl_s=60)
    await q.read("c", count=10, block_ms=100)  # deliver the rest
    await q.trim()
    # Everything before the oldest pending entry (the 5th) is acked and trimmed.
    left = [f["job_id"] for _, f in await q.r.xrange(q.keys.stream)]
    assert left == [specs[4].job_id, specs[5].job_id]


async def test_dead_goes_to_dead_letter(q: JobQueue) -> None:
    spec = _spec()
    await q.submit(spec, now_ns(), max_active=10)
    ((entry, job_id, *_),) = await q.read("c", count=1, block_ms=100)
    d = await q.start(entry, job_id, "c")
    assert d is not None
    assert await q.finish(d, JobState.DEAD, {"error": "boom"}, ttl_s=60, reason="boom")
    dead = await q.r.xrange(q.keys.dead)
    assert dead[0][1]["job_id"] == job_id and dead[0][1]["reason"] == "boom"


async def test_prune_consumers_keeps_busy_and_live_ones(q: JobQueue) -> None:
    for _ in range(2):
        await q.submit(_spec(), now_ns(), max_active=10)
    await q.read("gone", count=1, block_ms=100)  # dies holding a pending entry: must stay
    ((entry, job_id, *_),) = await q.read("left", count=1, block_ms=100)
    d = await q.start(entry, job_id, "left")
    assert d is not None
    await q.finish(d, JobState.SUCCEEDED, {}, ttl_s=60)  # nothing pending, no heartbeat: goes
    await q.r.xgroup_createconsumer(q.keys.stream, q.group, "live")  # nothing pending, but alive
    await q.r.set(q.keys.consumer_heartbeat("live"), "1", ex=15)
    removed = await q.prune_consumers(min_idle_ms=0)
    names = {c["name"] for c in await q.r.xinfo_consumers(q.keys.stream, q.group)}
    assert removed == ["left"]
    assert names == {"gone", "live"}


async def test_release_hands_back_only_the_current_attempt(q: JobQueue) -> None:
    spec = _spec()
    await q.submit(spec, now_ns(), max_active=10)
    ((entry, job_id, *_),) = await q.read("stopping", count=1, block_ms=100)
    d1 = await q.start(entry, job_id, "stopping")
    assert d1 is not None
    assert await q.release(d1)
    h = await q.get_job(job_id)
    assert h["state"] == "queued" and h["handbacks"] == "1" and "worker" not in h
    assert not await q.release(d1)  # not running any more
    d2 = await q.start(entry, job_id, "next")
    assert d2 is not None and d2.attempt == 2
    assert not await q.release(d1)  # stale attempt
    assert (await q.get_job(job_id))["state"] == "running"


async def test_clients_detect_a_half_open_connection(redis_server: RedisServer) -> None:
    # A blocking client has no read timeout: TCP keepalive is what ends a hang on a dead peer.
    import socket

    from services.queue import redis_client
    from services.settings import load_settings

    s = load_settings(redis_port=redis_server.port, redis_password=redis_server.password)
    r = redis_client(s, blocking=True)
    try:
        assert await r.ping()
        conn = await r.connection_pool.get_connection()
        sock = conn._writer.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        await r.connection_pool.release(conn)
    finally:
        await r.aclose()


async def test_reclaim_finds_a_dead_consumers_entries_behind_many_live_ones(q: JobQueue) -> None:
    # XAUTOCLAIM examines ten entries per one it may claim: with one free slot, a scan that
    # always started at 0-0 would never get past the live jobs at the head of the pending list.
    for _ in range(30):
        await q.submit(_spec(), now_ns(), max_active=100)
    live = await q.read("live", count=25, block_ms=100)
    dead = await q.read("dead", count=5, block_ms=100)
    assert len(live) == 25 and len(dead) == 5
    await asyncio.sleep(0.3)
    # The live consumer renews its leases; the dead one cannot.
    await q.r.xclaim(q.keys.stream, q.group, "live", 0, [e.entry_id for e in live], justid=True)
    found = []
    for _ in range(10):
        found += await q.reclaim("survivor", min_idle_ms=200, count=1)
        if len(found) == 5:
            break
    assert sorted(found) == sorted(dead)


async def test_concurrent_submits_share_round_trips_and_each_gets_its_own_answer(q: JobQueue) -> None:
    """Many submits in one loop iteration go out as one pipeline; each caller gets its own reply,
    including the ones the script refuses (busy), and a flushed script cache is reloaded."""
    specs = [_spec() for _ in range(40)]
    sent: list[int] = []
    orig = q.r.pipeline

    def counting_pipeline(*a: object, **kw: object) -> object:
        sent.append(1)
        return orig(*a, **kw)

    q.r.pipeline = counting_pipeline  # type: ignore[method-assign]
    outs = await asyncio.gather(*(q.submit(s, now_ns(), max_active=30) for s in specs))
    assert len(sent) == 1  # one pipelined round trip for the 40
    assert [o.status for o in outs] == ["ok"] * 30 + ["busy"] * 10
    assert [o.job_id for o in outs[:30]] == [s.job_id for s in specs[:30]]
    assert (await q.stats()).active == 30
    # After Redis lost its scripts (a restart without them): the batch reloads and reruns.
    await q.r.script_flush()
    more = [_spec() for _ in range(5)]
    outs = await asyncio.gather(*(q.submit(s, now_ns(), max_active=100) for s in more))
    assert [o.status for o in outs] == ["ok"] * 5
    entries = await q.read("c1", count=100, block_ms=100)
    assert {e.job_id for e in entries} == {s.job_id for s in specs[:30] + more}


async def test_waiting_is_counted_from_the_stream_when_redis_lag_drifts(q: JobQueue) -> None:
    # redis/redis#13957 on Redis 7.0: a trim past the group, then a read, leaves XINFO's lag
    # wrong (here 3 with nothing undelivered). The queue's waiting count must not follow it.
    specs = [_spec() for _ in range(5)]
    for spec in specs:
        await q.submit(spec, now_ns(), max_active=100)
    await q.read("c", count=1, block_ms=100)
    await q.r.xtrim(q.keys.stream, maxlen=1, approximate=False)
    await q.read("c", count=1, block_ms=100)
    group = next(g for g in await q.r.xinfo_groups(q.keys.stream) if g["name"] == q.group)
    assert group["lag"] in (0, 3)  # 3 on Redis 7.0 (wrong: the bug this guards against); 0 once fixed
    assert (await q.stats()).waiting == 0
    # And the count follows real submits.
    for spec in [_spec() for _ in range(3)]:
        await q.submit(spec, now_ns(), max_active=100)
    assert (await q.stats()).waiting == 3


async def test_waiting_past_the_exact_bound_is_bounded_by_the_stream(
    q: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.queue.WAITING_EXACT_MAX", 4)
    for spec in [_spec() for _ in range(7)]:
        await q.submit(spec, now_ns(), max_active=100)
    assert (await q.stats()).waiting == 7  # lag is right here; it is used past the exact bound
    await q.read("c", count=2, block_ms=100)
    assert (await q.stats()).waiting == 5


async def test_the_redis_version_is_checked_with_a_message_that_says_what_to_do(q: JobQueue) -> None:
    from services.queue import check_redis_version

    await check_redis_version(q.r)  # the real redis-server here: 7.0 or newer

    class Old:
        async def info(self, section: str) -> dict[str, str]:
            return {"redis_version": "6.2.14"}

    with pytest.raises(
        RuntimeError, match=r"Redis 6\.2\.14 is too old: llmconsole needs Redis 7\.0 or newer"
    ):
        await check_redis_version(Old())  # type: ignore[arg-type]


async def test_accepted_jobs_move_on_past_maxmemory_and_new_ones_do_not(q: JobQueue) -> None:
    # The queue's scripts for accepted jobs run past Redis's maxmemory; the submit does not.
    spec = JobSpec(job_id=new_id("j"), input_tokens=10, output_tokens=2, prefix_share=0.5, seed=1)
    await q.submit(spec, now_ns(), max_active=100)
    used = int((await q.r.info("memory"))["used_memory"])
    before = (await q.r.config_get("maxmemory"))["maxmemory"]
    await q.r.config_set("maxmemory", used // 2)
    try:
        with pytest.raises(aioredis.ResponseError, match=r"maxmemory"):
            await q.submit(
                JobSpec(job_id=new_id("j"), input_tokens=10, output_tokens=2, prefix_share=0.5, seed=2),
                now_ns(),
                max_active=100,
            )
        await q.ensure_group()  # the group exists: no error, though Redis refuses the create
        entries = await q.read("c1", count=1, block_ms=100)
        d = await q.start(entries[0].entry_id, spec.job_id, "c1", new_id())
        assert d is not None
        assert await q.renew(d, "c1")
        assert await q.finish(d, JobState.SUCCEEDED, {"result": "{}"}, ttl_s=60)
        assert (await q.get_job(spec.job_id))["state"] == "succeeded"
    finally:
        await q.r.config_set("maxmemory", before)


async def test_run_results_reads_finished_jobs_after_an_id_with_their_hashes(q: JobQueue) -> None:
    # The results stream's one round trip: a run's done entries after an id (exclusive), each
    # with its job hash; a job retention removed comes with an empty hash; reads run past
    # maxmemory (a client following a run must not stall because Redis is full).
    specs = [_spec(run_id="r1") for _ in range(3)]
    for spec in specs:
        await q.submit(spec, now_ns(), max_active=10)
    for entry in await q.read("c1", count=10, block_ms=100):
        d = await q.start(entry.entry_id, entry.job_id, "c1")
        assert d is not None
        d.run_id = "r1"  # as the proxy worker sets it from the spec
        assert await q.finish(d, JobState.SUCCEEDED, {"result": "{}"}, ttl_s=60)
    got = await q.run_results("r1", "0", 10)
    assert [fields["job_id"] for _eid, fields, _h in got] == [s.job_id for s in specs]
    assert all(h["state"] == "succeeded" and h["spec"] for _eid, _f, h in got)
    after_first = await q.run_results("r1", got[0][0], 10)
    assert [eid for eid, _f, _h in after_first] == [eid for eid, _f, _h in got[1:]]
    assert len(await q.run_results("r1", "0", 1)) == 1
    assert await q.run_results("r1", got[-1][0], 10) == []
    assert await q.run_results("no-such-run", "0", 10) == []
    await q.r.delete(q.keys.job(specs[1].job_id))
    used = int((await q.r.info("memory"))["used_memory"])
    before = (await q.r.config_get("maxmemory"))["maxmemory"]
    await q.r.config_set("maxmemory", used // 2)
    try:
        again = await q.run_results("r1", "0", 10)
    finally:
        await q.r.config_set("maxmemory", before)
    assert [h != {} for _eid, _f, h in again] == [True, False, True]
    assert again[1][1]["job_id"] == specs[1].job_id

"""Shared node capacity (Lua on a real redis-server) and the node registry read from it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.contracts import (
    JOB_NODE_FIELD,
    JOB_POLICY_FIELD,
    JobSpec,
    JobState,
    Keys,
    NodeHeartbeat,
    NodeState,
    new_id,
    prefix_key,
)
from services.routing.capacity import Capacity, slot_member
from services.routing.registry import Registry, deregister, set_draining, static_node_id
from services.settings import Settings
from tests.stackutil import RedisServer


def client(srv: RedisServer) -> aioredis.Redis:
    """A client with its own connection pool (a proxy worker of its own)."""
    return aioredis.Redis(port=srv.port, password=srv.password or None, decode_responses=True)


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A Redis client for one test."""
    c = client(redis_server)
    yield c
    await c.aclose()


@pytest.fixture
def keys() -> Keys:
    """A key prefix of its own."""
    return Keys(f"t{new_id()[-10:]}:")


async def new_job(r: aioredis.Redis, keys: Keys, attempt: int = 1) -> str:
    """A running job hash at ``attempt``."""
    job_id = new_id("j")
    await r.hset(keys.job(job_id), mapping={"state": "running", "attempt": attempt})
    return job_id


async def take(cap: Capacity, r: aioredis.Redis, keys: Keys, node: str, capacity: int, **kw: Any) -> Any:
    """Acquire a slot for a new job."""
    job_id = await new_job(r, keys)
    got = await cap.acquire(
        node,
        capacity,
        job_id=job_id,
        attempt=1,
        lease_ms=kw.pop("lease_ms", 30_000),
        policy="least_loaded",
        **kw,
    )
    return job_id, got


async def test_acquire_stops_at_capacity_and_release_frees_a_slot(r: aioredis.Redis, keys: Keys) -> None:
    cap = Capacity(r, keys)
    held = []
    for i in range(3):
        job_id, got = await take(cap, r, keys, "a", 3)
        assert got.ok and got.in_flight == i + 1
        held.append(job_id)
    _job, got = await take(cap, r, keys, "a", 3)
    assert not got.ok and got.in_flight == 3
    assert await cap.release("a", held[0], 1)
    assert not await cap.release("a", held[0], 1)  # released once
    _job, got = await take(cap, r, keys, "a", 3)
    assert got.ok and got.in_flight == 3
    assert await cap.in_flight(["a", "b"]) == {"a": 3, "b": 0}


async def test_acquire_records_node_and_policy_and_is_fenced_by_the_attempt(
    r: aioredis.Redis, keys: Keys
) -> None:
    cap = Capacity(r, keys)
    job_id = await new_job(r, keys, attempt=2)
    got = await cap.acquire("a", 4, job_id=job_id, attempt=2, lease_ms=30_000, policy="prefix_affinity")
    assert got.ok
    h = await r.hgetall(keys.job(job_id))
    assert (h[JOB_NODE_FIELD], h[JOB_POLICY_FIELD]) == ("a", "prefix_affinity")
    stale = await cap.acquire("b", 4, job_id=job_id, attempt=1, lease_ms=30_000, policy="round_robin")
    assert stale.stale and not stale.ok
    assert await r.hget(keys.job(job_id), JOB_NODE_FIELD) == "a"
    assert await cap.in_flight(["b"]) == {"b": 0}


async def test_the_same_acquire_sent_again_holds_one_slot(r: aioredis.Redis, keys: Keys) -> None:
    cap = Capacity(r, keys)
    job_id = await new_job(r, keys)
    for _ in range(2):
        got = await cap.acquire("a", 1, job_id=job_id, attempt=1, lease_ms=30_000, policy="x")
        assert got.ok and got.in_flight == 1


async def test_slots_of_a_dead_holder_come_back_after_their_lease(r: aioredis.Redis, keys: Keys) -> None:
    cap = Capacity(r, keys)
    await take(cap, r, keys, "a", 1, lease_ms=200)  # its holder dies: never renewed, never released
    _job, got = await take(cap, r, keys, "a", 1)
    assert not got.ok
    deadline = asyncio.get_running_loop().time() + 10
    while not got.ok:
        assert asyncio.get_running_loop().time() < deadline, "the expired slot never came back"
        await asyncio.sleep(0.05)
        _job, got = await take(cap, r, keys, "a", 1)
    assert await cap.in_flight(["a"]) == {"a": 1}


async def test_renew_pushes_the_lease_of_held_slots_only(r: aioredis.Redis, keys: Keys) -> None:
    cap = Capacity(r, keys)
    job_id, _got = await take(cap, r, keys, "a", 4, lease_ms=1000)
    member = slot_member(job_id, 1)
    before = await r.zscore(keys.node_inflight("a"), member)
    assert await cap.renew({"a": [member, "gone:1"]}, 60_000) == 1
    after = await r.zscore(keys.node_inflight("a"), member)
    assert before is not None and after is not None and after >= before + 50_000
    assert await r.zscore(keys.node_inflight("a"), "gone:1") is None


async def test_two_proxies_racing_never_overfill_a_node(redis_server: RedisServer, keys: Keys) -> None:
    one, two = client(redis_server), client(redis_server)
    try:
        caps = [Capacity(one, keys), Capacity(two, keys)]
        jobs = [await new_job(one, keys) for _ in range(200)]

        async def grab(i: int, job_id: str) -> bool:
            got = await caps[i % 2].acquire("a", 37, job_id=job_id, attempt=1, lease_ms=30_000, policy="x")
            return got.ok

        results = await asyncio.gather(*(grab(i, j) for i, j in enumerate(jobs)))
        assert sum(results) == 37
        assert await one.zcard(keys.node_inflight("a")) == 37
        # Releases and acquires interleaved from both keep the count exact.
        won = [j for j, ok in zip(jobs, results, strict=True) if ok]
        await asyncio.gather(*(caps[i % 2].release("a", j, 1) for i, j in enumerate(won[:10])))
        losers = [j for j, ok in zip(jobs, results, strict=True) if not ok]
        again = await asyncio.gather(*(grab(i, j) for i, j in enumerate(losers)))
        assert sum(again) == 10
        assert await one.zcard(keys.node_inflight("a")) == 37
    finally:
        await one.aclose()
        await two.aclose()


def settings(**kw: Any) -> Settings:
    """Settings for a registry (no env file)."""
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


async def beat(r: aioredis.Redis, keys: Keys, node: str, ttl_ms: int = 10_000, **kw: Any) -> None:
    """Write a heartbeat as an inference worker does."""
    hb = NodeHeartbeat.model_validate(
        {"node": node, "url": f"http://{node}:1", "max_num_seqs": 4, "capacity": 8, "ready": True, **kw}
    )
    await r.sadd(keys.nodes, node)
    await r.hset(keys.node(node), mapping=hb.to_redis())
    await r.pexpire(keys.node(node), ttl_ms)


async def test_registry_routes_only_to_live_ready_nodes_that_are_up(r: aioredis.Redis, keys: Keys) -> None:
    await beat(r, keys, "up1", started=100)
    await beat(r, keys, "draining", state=NodeState.DRAINING)
    await beat(r, keys, "loading", ready=False)
    await r.sadd(keys.nodes, "lost")  # registered once, heartbeat expired
    reg = Registry(r, keys, settings())
    cap = Capacity(r, keys)
    job_id = await new_job(r, keys)
    await cap.acquire("up1", 8, job_id=job_id, attempt=1, lease_ms=30_000, policy="x")
    await reg.refresh()
    assert sorted(reg.nodes) == ["up1"]
    assert reg.total_capacity() == 8
    assert [(v.node, v.in_flight, v.capacity) for v in reg.views()] == [("up1", 1, 8)]
    reg.suspect("up1")
    assert reg.views() == []
    # A restarted worker (new start time) is trusted again at once.
    await beat(r, keys, "up1", started=123)
    await reg.refresh()
    assert [v.node for v in reg.views()] == ["up1"]


async def test_drain_and_deregister(r: aioredis.Redis, keys: Keys) -> None:
    await set_draining(r, keys, "n1")
    assert await r.exists(keys.node_drain("n1"))
    await set_draining(r, keys, "n1", False)
    assert not await r.exists(keys.node_drain("n1"))
    await beat(r, keys, "n1")
    await set_draining(r, keys, "n1")
    await deregister(r, keys, "n1")
    assert not await r.exists(keys.node("n1"), keys.node_drain("n1"))
    assert not await r.sismember(keys.nodes, "n1")


async def test_prefix_memory_is_shared_by_two_proxies(redis_server: RedisServer, keys: Keys) -> None:
    one, two = client(redis_server), client(redis_server)
    try:
        await beat(one, keys, "a")
        reg1, reg2 = Registry(one, keys, settings()), Registry(two, keys, settings())
        await reg1.refresh()
        mem_key = reg1.remember("pfx", ("a",))
        assert mem_key
        assert reg1.remember("pfx", ("a",)) == ""  # known and written this window: nothing to write
        job_id = await new_job(one, keys)
        got = await Capacity(one, keys).acquire(
            "a",
            8,
            job_id=job_id,
            attempt=1,
            lease_ms=30_000,
            policy="prefix_affinity",
            prefix="pfx",
            owners="a",
            prefixes_key=mem_key,
            prefixes_ttl_s=reg1.prefix_ttl_s,
        )
        assert got.ok
        await reg2.refresh()
        assert reg2.owners("pfx") == ("a",)
        assert [v.prefixes for v in reg2.views()] == [1]
        assert 0 < await two.ttl(mem_key) <= reg1.prefix_ttl_s
    finally:
        await one.aclose()
        await two.aclose()


async def test_static_worker_urls_need_no_heartbeat(r: aioredis.Redis, keys: Keys) -> None:
    s = settings(
        worker_urls="http://10.0.0.5:8001, http://10.0.0.6:8001", max_num_seqs=16, node_capacity_factor=1.5
    )
    reg = Registry(r, keys, s)
    await reg.refresh()
    assert {n.node: (n.url, n.capacity) for n in reg.nodes.values()} == {
        static_node_id("http://10.0.0.5:8001"): ("http://10.0.0.5:8001", 24),
        static_node_id("http://10.0.0.6:8001"): ("http://10.0.0.6:8001", 24),
    }


async def test_claim_and_slot_in_one_call_acts_once_and_finish_gives_the_slot_back(
    r: aioredis.Redis, keys: Keys
) -> None:
    # The proxy worker chooses a node from the stream entry's hints, then claims the job and
    # takes that node's slot in one script; sent again (a lost reply) it begins one attempt and
    # holds one slot; a full node leaves the job claimed but without a slot; the result's finish
    # gives the slot back in its own call.
    from services.queue import JobQueue

    q = JobQueue(r, keys)
    await q.ensure_group()
    cap = Capacity(r, keys)
    spec = JobSpec(job_id=new_id("j"), input_tokens=10, output_tokens=5, prefix_share=0.5, seed=1)
    await q.submit(spec, 1, max_active=10)
    (entry,) = await q.read("c", count=1, block_ms=100)
    assert entry.prefix == prefix_key(spec)
    slot_kw: dict[str, Any] = {"lease_ms": 30_000, "policy": "prefix_affinity", "prefix": entry.prefix}
    d, got = await cap.start_and_acquire(entry.entry_id, entry.job_id, "c", "n1", "a", 1, **slot_kw)
    assert d is not None and d.attempt == 1 and d.spec_json is not None
    assert got.ok and got.in_flight == 1
    h = await r.hgetall(keys.job(spec.job_id))
    assert h["state"] == "running" and h[JOB_NODE_FIELD] == "a" and h[JOB_POLICY_FIELD] == "prefix_affinity"
    again, got2 = await cap.start_and_acquire(entry.entry_id, entry.job_id, "c", "n1", "a", 1, **slot_kw)
    assert again is not None and again.attempt == 1 and got2.ok
    assert await cap.holders("a") == [slot_member(spec.job_id, 1)]

    # A second job on the full node: claimed (attempt 1), no slot; routed later by the proxy.
    spec2 = JobSpec(job_id=new_id("j"), input_tokens=10, output_tokens=5, prefix_share=0.5, seed=2)
    await q.submit(spec2, 1, max_active=10)
    (entry2,) = await q.read("c", count=1, block_ms=100)
    d2, full = await cap.start_and_acquire(entry2.entry_id, entry2.job_id, "c", "n2", "a", 1, **slot_kw)
    assert d2 is not None and d2.attempt == 1 and not full.ok and not full.stale and full.in_flight == 1
    assert (await r.hget(keys.job(spec2.job_id), "state")) == "running"

    # A job already final is not claimed, and takes no slot.
    slot = (keys.node_inflight("a"), slot_member(spec.job_id, 1))
    assert await q.finish(d, JobState.SUCCEEDED, {"result": "{}"}, ttl_s=60, slot=slot)
    assert await cap.holders("a") == []
    gone, none = await cap.start_and_acquire(entry.entry_id, entry.job_id, "c", "n3", "a", 1, **slot_kw)
    assert gone is None and not none.ok and await cap.holders("a") == []

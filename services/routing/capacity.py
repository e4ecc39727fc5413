"""Per-node job slots shared by every proxy worker, in Redis, changed atomically (Lua).

A node's slots are a sorted set (:meth:`services.contracts.Keys.node_inflight`): one member
``job_id:attempt`` per job in flight, scored by its lease expiry in ms on Redis's clock. Every
acquire first drops the members whose lease ran out, then adds one only while fewer than the
node's capacity remain. So any number of proxy workers never overfill a node, never drift apart
(there is one count, in Redis), and the slots of a proxy worker killed while holding them come
back by themselves one lease later, when its jobs are reclaimed too.

The acquire also records the node and the policy on the job hash (fenced by the attempt) and
the prefix's owners in the routing memory: one round trip per routed job. Holders renew their
slots' leases in one batch per node (:meth:`Capacity.renew`), not per job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.contracts import JOB_GROUP, JOB_NODE_FIELD, JOB_POLICY_FIELD, Keys, now_ns
from services.queue import ALLOW_OOM, START_LUA, Delivery, ScriptBatcher

#: Takes one slot of a node (a Lua function: the plain acquire and the claim-and-slot script share it).
ACQUIRE_LUA = """
local function acquire(inflight, job, prefixes, member, capacity, lease_ms, node, policy, attempt, prefix,
                       owners, prefixes_ttl_s, node_field, policy_field)
  if redis.call('HGET', job, 'attempt') ~= attempt then return {-1, 0} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
  local n = redis.call('ZCARD', inflight)
  if not redis.call('ZSCORE', inflight, member) then
    -- (a member already there is this very call sent again: it holds its slot already)
    if n >= tonumber(capacity) then return {0, n} end
    n = n + 1
  end
  redis.call('ZADD', inflight, now + tonumber(lease_ms), member)
  redis.call('HSET', job, node_field, node, policy_field, policy)
  if prefixes ~= '' then
    redis.call('HSET', prefixes, prefix, owners)
    redis.call('EXPIRE', prefixes, tonumber(prefixes_ttl_s))
  end
  return {1, n}
end
"""

_ACQUIRE = (
    ALLOW_OOM
    + ACQUIRE_LUA
    + """
-- KEYS: inflight (zset), job (hash), prefixes (hash, '' = none)
-- ARGV: member, attempt, then the slot's (Capacity._slot_argv): capacity, lease_ms, node, policy,
--       prefix, owners, prefixes_ttl_s, node field, policy field
return acquire(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[2], ARGV[7],
  ARGV[8], ARGV[9], ARGV[10], ARGV[11])
"""
)

#: Claims a job (the queue's START) and, when that began an attempt, takes a slot of the node
#: the proxy worker chose from the stream entry's hints: one round trip where there were two.
_START_ACQUIRE = (
    ALLOW_OOM
    + START_LUA
    + ACQUIRE_LUA
    + """
-- KEYS: job, stream, stats, inflight (zset), prefixes (hash, '' = none)
-- ARGV: entry, consumer, t_dequeued, group, channel, nonce (START's), then the slot's
--       (Capacity._slot_argv): capacity, lease_ms, node, policy, prefix, owners, prefixes_ttl_s,
--       node field, policy field.
-- Returns START's reply with the slot's outcome after its first two items: {ok, in flight}.
local r = start(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
local got = {-1, 0}
if r[1] >= 1 then
  -- The member is services.routing.capacity.slot_member(job_id, attempt).
  local member = redis.call('HGET', KEYS[1], 'job_id') .. ':' .. r[1]
  got = acquire(KEYS[4], KEYS[1], KEYS[5], member, ARGV[7], ARGV[8], ARGV[9], ARGV[10], tostring(r[1]),
    ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15])
end
table.insert(r, 3, got[2])
table.insert(r, 3, got[1])
return r
"""
)

_RENEW = (
    ALLOW_OOM
    + """
-- KEYS: inflight (zset) ; ARGV: lease_ms, members... Only members still held are renewed.
local t = redis.call('TIME')
local exp = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', exp, ARGV[i])
end
return renewed
"""
)

_COUNT = (
    ALLOW_OOM
    + """
-- KEYS: inflight zsets ; returns the unexpired members of each (expired ones are dropped)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  out[i] = redis.call('ZCARD', KEYS[i])
end
return out
"""
)


def slot_member(job_id: str, attempt: int) -> str:
    """The in-flight set member of one attempt of a job."""
    return f"{job_id}:{attempt}"


@dataclass(frozen=True, slots=True)
class Acquired:
    """Outcome of :meth:`Capacity.acquire`."""

    #: True if the slot is held now.
    ok: bool
    #: The node's jobs in flight after the call (including this one when ok).
    in_flight: int
    #: True when the attempt is no longer current (another consumer took the job over).
    stale: bool = False


def _slot_argv(
    node: str, capacity: int, lease_ms: int, policy: str, prefix: str, owners: str, prefixes_ttl_s: int
) -> list[Any]:
    """The arguments of the Lua ``acquire`` that both scripts pass, in their order."""
    return [
        capacity,
        lease_ms,
        node,
        policy,
        prefix,
        owners,
        prefixes_ttl_s,
        JOB_NODE_FIELD,
        JOB_POLICY_FIELD,
    ]


class Capacity:
    """Atomic per-node slot operations on one Redis."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.r = redis
        self.keys = keys
        # Jobs are routed concurrently: their acquires share pipelined round trips.
        self._acquire = ScriptBatcher(redis, redis.register_script(_ACQUIRE))
        self._start_acquire = ScriptBatcher(redis, redis.register_script(_START_ACQUIRE))
        self._renew = redis.register_script(_RENEW)
        self._count = redis.register_script(_COUNT)

    async def acquire(
        self,
        node: str,
        capacity: int,
        *,
        job_id: str,
        attempt: int,
        lease_ms: int,
        policy: str,
        prefix: str = "",
        owners: str = "",
        prefixes_key: str = "",
        prefixes_ttl_s: int = 0,
    ) -> Acquired:
        """Take one slot on ``node`` if fewer than ``capacity`` are held; record node and policy.

        With ``prefixes_key``, the prefix's owners (text) are written to the routing memory too.
        """
        ok, n = await self._acquire(
            [self.keys.node_inflight(node), self.keys.job(job_id), prefixes_key],
            [
                slot_member(job_id, attempt),
                attempt,
                *_slot_argv(node, capacity, lease_ms, policy, prefix, owners, prefixes_ttl_s),
            ],
        )
        return Acquired(int(ok) == 1, int(n), stale=int(ok) == -1)

    async def start_and_acquire(
        self,
        entry_id: str,
        job_id: str,
        consumer: str,
        nonce: str,
        node: str,
        capacity: int,
        *,
        lease_ms: int,
        policy: str,
        prefix: str = "",
        owners: str = "",
        prefixes_key: str = "",
        prefixes_ttl_s: int = 0,
        group: str = JOB_GROUP,
    ) -> tuple[Delivery | None, Acquired]:
        """Claim a delivered entry (:meth:`services.queue.JobQueue.start`, same script code) and,
        if that began an attempt, take one slot on ``node`` for it; one round trip.

        Calls with the same ``nonce`` begin one attempt and hold one slot (safe to send again).
        """
        keys = self.keys
        reply = await self._start_acquire(
            [keys.job(job_id), keys.stream, keys.stats, keys.node_inflight(node), prefixes_key],
            [
                entry_id,
                consumer,
                now_ns(),
                group,
                keys.events,
                nonce,
                *_slot_argv(node, capacity, lease_ms, policy, prefix, owners, prefixes_ttl_s),
            ],
        )
        ok, n = int(reply[2]), int(reply[3])
        d = Delivery.from_start(entry_id, job_id, [reply[0], reply[1], *reply[4:]])
        return d, Acquired(ok == 1, n, stale=ok == -1)

    async def release(self, node: str, job_id: str, attempt: int) -> bool:
        """Give the slot back; False if it was not held (expired, or released already)."""
        return bool(await self.r.zrem(self.keys.node_inflight(node), slot_member(job_id, attempt)))

    async def renew(self, held: dict[str, Iterable[str]], lease_ms: int) -> int:
        """Push the lease of every held member (``node → members``) out by ``lease_ms``.

        One pipelined round trip for all nodes; returns how many members were still held.
        """
        items = [(node, list(members)) for node, members in held.items()]
        items = [(node, members) for node, members in items if members]
        if not items:
            return 0
        async with self.r.pipeline(transaction=False) as p:
            for node, members in items:
                await self._renew(keys=[self.keys.node_inflight(node)], args=[lease_ms, *members], client=p)
            res = await p.execute()
        return sum(int(x) for x in res)

    async def in_flight(self, nodes: list[str]) -> dict[str, int]:
        """Unexpired jobs in flight per node (dropping expired members on the way)."""
        if not nodes:
            return {}
        counts = await self._count(keys=[self.keys.node_inflight(n) for n in nodes])
        return {n: int(c) for n, c in zip(nodes, counts, strict=True)}

    async def queue_count(self, pipe: Any, nodes: list[str]) -> None:
        """Queue the in-flight count of ``nodes`` on a pipeline (its result: a list of counts)."""
        await self._count(keys=[self.keys.node_inflight(n) for n in nodes], client=pipe)

    async def holders(self, node: str) -> list[str]:
        """Members (``job_id:attempt``) holding slots on ``node`` now (expired ones included)."""
        return [str(m) for m in await self.r.zrange(self.keys.node_inflight(node), 0, -1)]

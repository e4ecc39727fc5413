"""Redis Streams job queue: submit, claim, renew, reclaim, finish (fenced), trim.

The job hash is the truth; the stream entry carries only the job id. Every
state change after submit is a Lua script, so it is checked and written
atomically:

* ``submit`` refuses above the active-job bound and honours idempotency keys.
* ``start`` raises the job's attempt number on every delivery (the fencing token).
* ``renew`` resets the entry's idle time only while the caller's attempt is current.
* ``finish`` writes a result only for the current attempt, then acks, so a
  frozen worker that wakes up late cannot overwrite or duplicate a result.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.contracts import (
    JOB_GROUP,
    RECENT_JOBS_MAX,
    RUN_DONE_MAXLEN,
    RUN_DONE_TTL_S,
    STREAM_FIELD,
    STREAM_PREFIX_FIELD,
    STREAM_ROUTING_FIELD,
    JobSpec,
    JobState,
    Keys,
    new_id,
    now_ns,
    prefix_key,
)
from services.settings import Settings

#: Errors that mean "Redis is not reachable right now".
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that redis-py swallowed.

    redis-py can complete a command even though its task was cancelled meanwhile
    (redis/redis-py#2028); loops call this after each command so they still stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


#: XAUTOCLAIM calls one reclaim pass may make (each examines up to ten entries per claimable one).
_RECLAIM_CALLS_PER_PASS = 16

#: TCP keepalive: first probe after 10 s idle, then every 5 s, dead after 3 misses; unacknowledged
#: data for 25 s also ends the connection (Linux names).
_KEEPALIVE = {
    getattr(socket, name): value
    # TCP_USER_TIMEOUT: keepalive probes only an idle connection; a command sent after the peer
    # vanished would wait on retransmissions (about 15 minutes) without it.
    for name, value in (
        ("TCP_KEEPIDLE", 10),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 25_000),
    )
    if hasattr(socket, name)
}


def redis_client(settings: Settings, *, blocking: bool = False) -> aioredis.Redis:
    """An asyncio Redis client that fails fast when Redis is down.

    ``blocking`` clients serve XREADGROUP BLOCK, so their read timeout must
    exceed the block time; others time out quickly so ingestion answers 503
    instead of hanging.
    """
    return aioredis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        db=settings.redis_db,
        password=settings.redis_password.get_secret_value() or None,
        decode_responses=True,
        socket_connect_timeout=0.5,
        socket_timeout=None if blocking else 2.0,
        # Without a read timeout, a half-open connection (Redis's host gone, no reset) would hang
        # a blocking client for ever: TCP keepalive notices it within about 25 s.
        socket_keepalive=True,
        socket_keepalive_options=_KEEPALIVE,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 1),
        retry_on_error=[RedisConnectionError],
        health_check_interval=15,
        client_name="llmconsole",
    )


#: First line of every script that carries an accepted job on (claim, lease renewal, finish, hand-
#: back, try count, node slots, the node heartbeat): Redis runs it even past its maxmemory (script
#: flags, Redis 7.0). Only a new job is refused for memory: ingestion refuses from
#: REDIS_MEMORY_REFUSE_PCT of maxmemory, reading Redis's memory every 200 ms, so a burst of submits
#: between two readings can take Redis past the limit. Were these scripts refused then, no accepted
#: job could start or finish, and retention, which frees memory by pruning finished jobs, would
#: have nothing to prune: every job would wait for ever. What they add is bounded by the jobs
#: already accepted, and a finished job soon gives its memory back to retention.
ALLOW_OOM = "#!lua flags=allow-oom\n"

#: The oldest Redis the project's scripts run on (script flags).
MIN_REDIS = (7, 0)


async def check_redis_version(r: aioredis.Redis) -> None:
    """Raise RuntimeError, saying what to do, when Redis is older than :data:`MIN_REDIS`."""
    version = str((await r.info("server")).get("redis_version", "0"))
    got = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if got < MIN_REDIS:
        raise RuntimeError(
            f"Redis {version} is too old: llmconsole needs Redis {'.'.join(map(str, MIN_REDIS))} or newer "
            "(its queue scripts use script flags); Debian 12's redis-server is 7.0"
        )


def field_args(fields: Mapping[str, Any]) -> list[Any]:
    """A hash's fields as a script's ARGV tail: name, value, name, value... (None left out; what is
    not a string or a number as JSON)."""
    flat: list[Any] = []
    for k, v in fields.items():
        if v is not None:
            flat.extend([k, v if isinstance(v, str | int | float) else json.dumps(v)])
    return flat


_SUBMIT = """
-- KEYS: job, stream, active, stats, recent, idem ('' = none)
-- ARGV: job_id, spec, t_received, request fingerprint, max_active, idem_ttl, channel, run_id, label,
--       recent_max, group, then the entry's routing hints: prefix key, routing policy.
-- The idempotency key stores "job_id|fingerprint".
-- Job ids are new per request: an existing hash means this very call was sent again (redis-py
-- re-sends a command that timed out or lost its connection) after it had already run.
if redis.call('EXISTS', KEYS[1]) == 1 then return {'ok', ARGV[1]} end
if KEYS[6] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then
    local sep = string.find(existing, '|', 1, true)
    if not sep then return {'dup', existing} end
    local id, fp = string.sub(existing, 1, sep - 1), string.sub(existing, sep + 1)
    if fp ~= '' and ARGV[4] ~= '' and fp ~= ARGV[4] then return {'conflict', id} end
    return {'dup', id}
  end
end
local active = tonumber(redis.call('GET', KEYS[3]) or '0')
if active >= tonumber(ARGV[5]) then
  redis.call('HINCRBY', KEYS[4], 'refused', 1)
  return {'busy', tostring(active)}
end
-- t_enqueued is the moment of this write, on Redis's clock (where the event happens).
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'state', 'queued', 'attempt', 0, 'tries', 0,
  'spec', ARGV[2], 't_received', ARGV[3], 't_enqueued', now[1] .. string.format('%06d', now[2]) .. '000',
  'run_id', ARGV[8], 'label', ARGV[9])
-- The stream and its consumer group come into being with the first job (and again after a wipe),
-- inside this one call: no extra round trip per submit to make sure of them.
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[11], '0', 'MKSTREAM')
end
local entry = redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1], 'prefix', ARGV[12], 'routing', ARGV[13])
redis.call('HSET', KEYS[1], 'entry', entry)
redis.call('INCR', KEYS[3])
redis.call('HINCRBY', KEYS[4], 'submitted', 1)
if KEYS[6] ~= '' then redis.call('SET', KEYS[6], ARGV[1] .. '|' .. ARGV[4], 'EX', ARGV[6]) end
redis.call('LPUSH', KEYS[5], ARGV[1])
redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[10]) - 1)
redis.call('PUBLISH', ARGV[7], cjson.encode({job_id=ARGV[1], state='queued'}))
return {'ok', ARGV[1]}
"""

#: Begins an attempt (a Lua function, so that services.routing.capacity's claim-and-slot script
#: runs the very same code). Both "running" answers carry what the worker needs next (spec,
#: handbacks, tries, the early timestamps): no HGETALL per job.
START_LUA = """
local function start(job, stream, stats, entry, consumer, t_dequeued, group, channel, nonce)
  local st = redis.call('HGET', job, 'state')
  -- The same call sent again (a retry after a timeout): the attempt it already began.
  if st == 'running' and redis.call('HGET', job, 'start_nonce') == nonce then
    return {tonumber(redis.call('HGET', job, 'attempt')), 'running',
      unpack(redis.call('HMGET', job, 'spec', 'handbacks', 'tries', 't_received', 't_enqueued', 't_dequeued'))}
  end
  if not st then
    redis.call('XACK', stream, group, entry)
    return {-1, 'missing'}
  end
  if st == 'succeeded' or st == 'failed' or st == 'dead' then
    redis.call('XACK', stream, group, entry)
    return {-2, st}
  end
  local attempt = redis.call('HINCRBY', job, 'attempt', 1)
  if attempt > 1 then redis.call('HINCRBY', stats, 'redelivered', 1) end
  redis.call('HDEL', job, 't_dispatched', 't_worker_received', 't_engine_start', 't_first_token',
    't_engine_end', 't_result_received', 't_finished')
  redis.call('HSET', job, 'state', 'running', 't_dequeued', t_dequeued, 'worker', consumer, 'entry', entry,
    'start_nonce', nonce)
  redis.call('PUBLISH', channel, cjson.encode({job_id=redis.call('HGET', job, 'job_id'), state='running',
    attempt=attempt}))
  return {attempt, 'running',
    unpack(redis.call('HMGET', job, 'spec', 'handbacks', 'tries', 't_received', 't_enqueued', 't_dequeued'))}
end
"""

_START = (
    ALLOW_OOM
    + START_LUA
    + """
-- KEYS: job, stream, stats ; ARGV: entry, consumer, t_dequeued, group, channel, nonce
return start(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
"""
)

_RENEW = (
    ALLOW_OOM
    + """
-- KEYS: job, stream ; ARGV: attempt, group, consumer
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, entry, 'JUSTID')
return 1
"""
)

_FINISH = (
    ALLOW_OOM
    + """
-- KEYS: job, stream, active, stats, dead, finished (retention index), run's done stream ('' = none),
--       the node's slot set ('' = none)
-- ARGV: attempt, state, group, ttl, channel, job_id, reason, run_done_maxlen, run_done_ttl,
--       slot member, then field/value pairs
-- The attempt's node slot is given back whatever the outcome (a superseded attempt holds it too):
-- in this same round trip rather than one more per job.
if KEYS[8] ~= '' then redis.call('ZREM', KEYS[8], ARGV[10]) end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
local st = redis.call('HGET', KEYS[1], 'state')
-- Already finished by this very attempt: the same call sent again after a timeout.
if st == ARGV[2] and redis.call('HEXISTS', KEYS[1], 't_finished') == 1 then return 1 end
if st ~= 'running' then return 0 end
for i = 11, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
-- t_finished is the moment of this write, on Redis's clock (where the event happens).
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'state', ARGV[2], 't_finished', now[1] .. string.format('%06d', now[2]) .. '000')
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then redis.call('XACK', KEYS[2], ARGV[3], entry) end
if tonumber(redis.call('DECR', KEYS[3])) < 0 then redis.call('SET', KEYS[3], 0) end
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
if ARGV[2] == 'dead' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'job_id', ARGV[6], 'reason', ARGV[7],
    'attempt', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
-- The retention index (services/retention.py prunes the oldest final jobs by age, count, bytes).
redis.call('ZADD', KEYS[6], tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[6])
redis.call('PUBLISH', ARGV[5], cjson.encode({job_id=ARGV[6], state=ARGV[2]}))
-- One entry per finished job of a run: clients follow a whole run over one stream.
if KEYS[7] ~= '' then
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[8], '*', 'job_id', ARGV[6], 'state', ARGV[2])
  redis.call('EXPIRE', KEYS[7], tonumber(ARGV[9]))
end
return 1
"""
)

_RELEASE = (
    ALLOW_OOM
    + """
-- KEYS: job ; ARGV: attempt, channel. A stopping worker gives back an unfinished attempt:
-- the job shows as queued again, and the hand-back is counted so it is not taken for a crash.
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued')
redis.call('HINCRBY', KEYS[1], 'handbacks', 1)
redis.call('HDEL', KEYS[1], 'worker')
redis.call('PUBLISH', ARGV[2], cjson.encode({job_id=redis.call('HGET', KEYS[1], 'job_id'), state='queued'}))
return 1
"""
)

_BUMP = (
    ALLOW_OOM
    + """
-- KEYS: job ; ARGV: attempt, field, amount, nonce. Fenced HINCRBY (e.g. tries); the same call
-- sent again (a retry after a timeout) returns the value it already made.
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return -1 end
local nonce_field = 'bump_nonce:' .. ARGV[2]
if redis.call('HGET', KEYS[1], nonce_field) == ARGV[4] then
  return tonumber(redis.call('HGET', KEYS[1], ARGV[2]))
end
redis.call('HSET', KEYS[1], nonce_field, ARGV[4])
return redis.call('HINCRBY', KEYS[1], ARGV[2], tonumber(ARGV[3]))
"""
)


@dataclass
class SubmitOutcome:
    """Result of a submit: ``ok``, ``dup`` (idempotency hit), ``conflict`` (the key was used with
    another request) or ``busy`` (over the bound)."""

    status: str
    job_id: str
    active: int | None = None


@dataclass
class Delivery:
    """A job delivered to this consumer: its stream entry and attempt number."""

    entry_id: str
    job_id: str
    attempt: int
    #: The job's run, once its spec was read: its finish is also announced on the run's stream.
    run_id: str | None = None
    #: Read by the START script with the claim itself: the spec's JSON, graceful hand-backs and
    #: tries so far (None when the hash lacks them).
    spec_json: str | None = None
    handbacks: int = 0
    tries: int = 0
    #: The job's earlier timestamps (t_received, t_enqueued, t_dequeued), for the stage metrics.
    stamps: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_start(cls, entry_id: str, job_id: str, reply: list[Any]) -> Delivery | None:
        """The delivery a START reply describes ({attempt, state, spec, handbacks, tries,
        t_received, t_enqueued, t_dequeued}); None when the job is gone or already final."""
        if int(reply[0]) < 1:
            return None
        spec, handbacks, tries, *times = (list(reply[2:]) + [None] * 6)[:6]
        stamps = {k: v for k, v in zip(("t_received", "t_enqueued", "t_dequeued"), times, strict=True) if v}
        return cls(entry_id, job_id, int(reply[0]), None, spec, int(handbacks or 0), int(tries or 0), stamps)


class Entry(NamedTuple):
    """A job stream entry as read: its id, its job, and the routing hints written at submit."""

    entry_id: str
    job_id: str
    #: The job's prefix key ("" = shares none); None on an entry without hints (written by an
    #: older build): its job is routed from the spec, after the claim.
    prefix: str | None = None
    #: Its routing policy ("" = the proxy worker's default).
    routing: str = ""

    @classmethod
    def of(cls, entry_id: str, fields: dict[str, str]) -> Entry:
        """An entry from its stream fields."""
        return cls(
            entry_id,
            fields.get(STREAM_FIELD, ""),
            fields.get(STREAM_PREFIX_FIELD),
            fields.get(STREAM_ROUTING_FIELD, ""),
        )


@dataclass
class QueueStats:
    """Depth and counters for the console and for backpressure."""

    waiting: int
    in_flight: int
    active: int
    stream_len: int
    consumers: int
    counters: dict[str, int]
    #: Redis ``used_memory`` and ``maxmemory`` (0 = no limit), bytes.
    redis_used: int | None = None
    redis_limit: int | None = None
    #: Final jobs in the retention index, and when the oldest of them finished (unix s).
    retained: int | None = None
    oldest_finished: float | None = None


class ScriptBatcher:
    """Runs one Lua script for many concurrent callers in one pipelined round trip.

    The first caller of an event-loop iteration leads: it yields once, so that every other
    request handled in the same iteration joins its batch, then sends the batch as one pipeline
    of EVALSHAs (no MULTI: each script is atomic on its own) and hands each caller its own reply
    or error. Under load this turns N submits into one socket write and one read; alone, a caller
    pays one extra loop iteration. A py-spy profile of ingestion under wrk had a fifth of its
    samples in the per-submit Redis call (pool checkout, command packing, send, parse).
    """

    def __init__(self, redis: aioredis.Redis, script: AsyncScript) -> None:
        self.r = redis
        self.script = script
        self._batch: list[tuple[list[Any], list[Any], asyncio.Future[Any] | None]] | None = None

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        """The script's reply for ``keys``/``args``; raises what Redis raised for this call."""
        if self._batch is not None:  # a leader is collecting this iteration's calls
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._batch.append((keys, args, fut))
            return await fut
        batch: list[tuple[list[Any], list[Any], asyncio.Future[Any] | None]] = [(keys, args, None)]
        self._batch = batch
        try:
            try:
                await asyncio.sleep(0)
            finally:
                self._batch = None
            replies = await self._execute(batch)
        except BaseException as e:
            # Every follower gets an answer: the same error (a cancelled leader reads as Redis
            # being unavailable to them, so their clients hear 503 and retry).
            for _k, _a, f in batch[1:]:
                if f is not None and not f.done():
                    f.set_exception(e if isinstance(e, Exception) else RedisConnectionError(str(e)))
            raise
        for (_k, _a, f), reply in zip(batch[1:], replies[1:], strict=True):
            if f is None or f.done():
                continue
            if isinstance(reply, Exception):
                f.set_exception(reply)
            else:
                f.set_result(reply)
        if isinstance(replies[0], Exception):
            raise replies[0]
        return replies[0]

    async def _execute(
        self, batch: list[tuple[list[Any], list[Any], asyncio.Future[Any] | None]]
    ) -> list[Any]:
        if len(batch) == 1:
            k, a, _ = batch[0]
            try:
                return [await self.script(keys=k, args=a)]
            except ResponseError as e:  # e.g. OOM: this call's own error
                return [e]
        async with self.r.pipeline(transaction=False) as pipe:
            for k, a, _ in batch:
                pipe.execute_command("EVALSHA", self.script.sha, len(k), *k, *a)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        if any(isinstance(x, NoScriptError) for x in replies):
            # Redis restarted and lost its script cache: load it once, rerun the missing ones.
            await self.r.script_load(self.script.script)
            for i, (k, a, _) in enumerate(batch):
                if isinstance(replies[i], NoScriptError):
                    try:
                        replies[i] = await self.script(keys=k, args=a)
                    except ResponseError as e:
                        replies[i] = e
        return replies


#: A run's finished jobs after an entry id, each with its job hash, in one round trip (the results
#: stream: before, an XREAD and then a pipelined HGETALL per batch, two round trips that a wave of
#: results waited behind). Reads only: it runs past maxmemory and on replicas. The job hashes'
#: names are built from ARGV[3], the prefix from :meth:`Keys.job`: fine on one Redis, which is what
#: this project runs (a cluster would need them declared).
_RUN_RESULTS = """#!lua flags=no-writes
-- KEYS: the run's done stream ; ARGV: after (entry id, exclusive), count, job key prefix
local out = {}
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])) do
  local f, id = e[2], ''
  for i = 1, #f, 2 do
    if f[i] == 'job_id' then id = f[i + 1] end
  end
  out[#out + 1] = {e[1], f, redis.call('HGETALL', ARGV[3] .. id)}
end
return out
"""


class JobQueue:
    """Job queue operations on one Redis, under one key prefix."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, group: str = JOB_GROUP) -> None:
        self.r = redis
        self.keys = keys
        self.group = group
        self._reclaim_cursor = "0-0"
        # Submits arrive concurrently from many clients: they share pipelined round trips.
        self._submit = ScriptBatcher(redis, redis.register_script(_SUBMIT))
        self._start = ScriptBatcher(redis, redis.register_script(_START))
        self._renew = redis.register_script(_RENEW)
        self._finish = ScriptBatcher(redis, redis.register_script(_FINISH))
        self._bump = redis.register_script(_BUMP)
        self._release = redis.register_script(_RELEASE)
        self._run_results = redis.register_script(_RUN_RESULTS)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (idempotent)."""
        try:
            await self.r.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except OutOfMemoryError:
            # Redis past its maxmemory refuses the create even when there is nothing to create: a
            # worker (re)starting then must still find its group and carry accepted jobs on.
            if not any(g.get("name") == self.group for g in await self.r.xinfo_groups(self.keys.stream)):
                raise
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def submit(
        self,
        spec: JobSpec,
        t_received: int,
        *,
        max_active: int,
        idempotency_key: str | None = None,
        idempotency_ttl_s: int = 86400,
        fingerprint: str = "",
    ) -> SubmitOutcome:
        """Write the job hash and its stream entry atomically (or refuse).

        ``fingerprint`` identifies the request behind an idempotency key: the same key with
        another fingerprint is a ``conflict``, not a duplicate.
        """
        keys = [
            self.keys.job(spec.job_id),
            self.keys.stream,
            self.keys.active,
            self.keys.stats,
            self.keys.recent,
            self.keys.idempotency(idempotency_key) if idempotency_key else "",
        ]
        args = [
            spec.job_id,
            spec.model_dump_json(),
            t_received,
            fingerprint.replace("|", ""),
            max_active,
            idempotency_ttl_s,
            self.keys.events,
            spec.run_id or "",
            spec.label or "",
            RECENT_JOBS_MAX,
            self.group,
            prefix_key(spec),
            spec.routing or "",
        ]
        status, value = await self._submit(keys, args)
        if status == "busy":
            return SubmitOutcome("busy", "", int(value))
        return SubmitOutcome(status, value)

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Blocking read of new entries for ``consumer``."""
        resp = await self.r.xreadgroup(
            self.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        return [Entry.of(entry_id, fields) for _stream, entries in resp or [] for entry_id, fields in entries]

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int = 32) -> list[Entry]:
        """Take over up to ``count`` entries idle longer than the lease from stopped consumers.

        XAUTOCLAIM looks at no more than ten entries per one it may claim, so a small ``count``
        would only ever see the oldest pending entries (live jobs of other workers): the scan
        goes on from where the last pass stopped, for a bounded number of calls per pass.
        """
        out: list[Entry] = []
        for _ in range(_RECLAIM_CALLS_PER_PASS):
            resp = await self.r.xautoclaim(
                self.keys.stream,
                self.group,
                consumer,
                min_idle_ms,
                self._reclaim_cursor,
                count=count - len(out),
            )
            self._reclaim_cursor = str(resp[0]) if resp else "0-0"
            for entry_id, fields in resp[1] if len(resp) > 1 else []:
                if fields is None:  # entry trimmed away: nothing to redeliver
                    continue
                out.append(Entry.of(entry_id, fields))
            if len(out) >= count or self._reclaim_cursor == "0-0":
                break
        return out

    async def start(
        self, entry_id: str, job_id: str, consumer: str, nonce: str | None = None
    ) -> Delivery | None:
        """Begin an attempt for a delivered entry; None if the job is gone or already final.

        Calls with the same ``nonce`` begin one attempt (pass one when the call may be re-sent).
        """
        reply = await self._start(
            [self.keys.job(job_id), self.keys.stream, self.keys.stats],
            [entry_id, consumer, now_ns(), self.group, self.keys.events, nonce or new_id()],
        )
        return Delivery.from_start(entry_id, job_id, reply)

    async def renew(self, d: Delivery, consumer: str) -> bool:
        """Renew this consumer's lease on the job; False if the attempt is no longer current."""
        ok = await self._renew(
            keys=[self.keys.job(d.job_id), self.keys.stream], args=[d.attempt, self.group, consumer]
        )
        return bool(ok)

    async def run_results(
        self, run_id: str, after: str, count: int
    ) -> list[tuple[str, dict[str, str], dict[str, str]]]:
        """Up to ``count`` entries of the run's done stream after ``after`` (an entry id, or '0'),
        each as (entry id, its fields, its job's hash: empty once retention removed the job)."""
        got = await self._run_results(
            keys=[self.keys.run_done(run_id)], args=[after, count, self.keys.job("")]
        )
        return [(eid, _pairs(fields), _pairs(h)) for eid, fields, h in got]

    async def release(self, d: Delivery) -> bool:
        """Give back an unfinished attempt (state back to queued); False if it is not current."""
        return bool(await self._release(keys=[self.keys.job(d.job_id)], args=[d.attempt, self.keys.events]))

    async def bump(self, d: Delivery, field: str, amount: int = 1, nonce: str | None = None) -> int:
        """Fenced HINCRBY on the job hash (returns -1 if the attempt is stale).

        Calls with the same ``nonce`` count once (pass one when the call may be re-sent).
        """
        args = [d.attempt, field, amount, nonce or new_id()]
        return int(await self._bump(keys=[self.keys.job(d.job_id)], args=args))

    async def finish(
        self,
        d: Delivery,
        state: JobState,
        fields: dict[str, Any],
        *,
        ttl_s: int,
        reason: str = "",
        slot: tuple[str, str] | None = None,
    ) -> bool:
        """Write the final state and fields if ``d.attempt`` is current; ack the entry.

        ``slot`` (the node's slot set, the member) is given back in the same call, in any case.
        Returns False (and writes nothing else) when the attempt was superseded.
        """
        flat = field_args(fields)
        ok = await self._finish(
            [
                self.keys.job(d.job_id),
                self.keys.stream,
                self.keys.active,
                self.keys.stats,
                self.keys.dead,
                self.keys.finished,
                self.keys.run_done(d.run_id) if d.run_id else "",
                slot[0] if slot else "",
            ],
            [
                d.attempt,
                state.value,
                self.group,
                ttl_s,
                self.keys.events,
                d.job_id,
                reason,
                RUN_DONE_MAXLEN,
                RUN_DONE_TTL_S,
                slot[1] if slot else "",
                *flat,
            ],
        )
        return bool(ok)

    async def get_job(self, job_id: str) -> dict[str, str]:
        """The raw job hash (empty dict if unknown or expired)."""
        return await self.r.hgetall(self.keys.job(job_id))

    async def _waiting(self, last_delivered: str | None, lag: int | None, stream_len: int) -> int:
        """Entries after the group's last delivered one: counted from the stream up to
        :data:`WAITING_EXACT_MAX`, past that Redis's ``lag``, bounded by the stream's length.

        Not ``lag`` alone: Redis keeps it as a running count that can drift from the stream
        (redis/redis#13957 is one way, on Redis 7.0, Debian's: a read after a trim has passed the
        group). On this project's own long-lived stack Redis it read 15,737 with nothing
        undelivered (cause not found), so the queue depth the console showed was off by that much.
        """
        if last_delivered is None:
            return 0
        after = await self.r.xrange(self.keys.stream, min=f"({last_delivered}", count=WAITING_EXACT_MAX + 1)
        if len(after) <= WAITING_EXACT_MAX:
            return len(after)
        return max(len(after), min(lag if lag is not None else stream_len, stream_len))

    async def trim(self) -> int:
        """Trim entries that every consumer has acked; pending entries are never dropped."""
        try:
            groups = await self.r.xinfo_groups(self.keys.stream)
        except ResponseError:
            return 0
        bounds: list[str] = []
        for g in groups:
            pend = await self.r.xpending(self.keys.stream, g["name"])
            if pend and pend.get("pending"):
                bounds.append(pend["min"])
            else:
                bounds.append(g["last-delivered-id"])
        if not bounds:
            return 0
        minid = min(bounds, key=_entry_key)
        if minid == "0-0":
            return 0
        return int(await self.r.xtrim(self.keys.stream, minid=minid, approximate=False))

    async def prune_consumers(self, min_idle_ms: int = 600_000) -> list[str]:
        """Remove consumers that left: nothing pending, idle this long, no live heartbeat.

        Every proxy worker process is a consumer of its own name, so restarts would
        otherwise pile up names in the group (and in the console's consumer count).
        """
        removed: list[str] = []
        try:
            consumers = await self.r.xinfo_consumers(self.keys.stream, self.group)
        except ResponseError:
            return removed
        for c in consumers:
            if int(c.get("pending") or 0) or int(c.get("idle") or 0) < min_idle_ms:
                continue
            if await self.r.exists(self.keys.consumer_heartbeat(c["name"])):
                continue
            await self.r.xgroup_delconsumer(self.keys.stream, self.group, c["name"])
            removed.append(c["name"])
        return removed

    async def stats(self) -> QueueStats:
        """Waiting (not yet delivered), in flight (pending), active and lifetime counters."""
        in_flight = consumers = 0
        lag: int | None = None
        last_delivered: str | None = None
        try:
            for g in await self.r.xinfo_groups(self.keys.stream):
                if g["name"] != self.group:
                    continue
                in_flight = int(g.get("pending") or 0)
                consumers = int(g.get("consumers") or 0)
                lag = int(g["lag"]) if g.get("lag") is not None else None
                last_delivered = g.get("last-delivered-id")
        except ResponseError:
            pass
        stream_len = int(await self.r.xlen(self.keys.stream))
        waiting = await self._waiting(last_delivered, lag, stream_len)
        active = int(await self.r.get(self.keys.active) or 0)
        counters = {k: int(v) for k, v in (await self.r.hgetall(self.keys.stats)).items()}
        memory = await self.r.info("memory")
        async with self.r.pipeline(transaction=False) as p:
            p.zcard(self.keys.finished)
            p.zrange(self.keys.finished, 0, 0, withscores=True)
            retained, oldest = await p.execute()
        return QueueStats(
            waiting,
            in_flight,
            active,
            stream_len,
            consumers,
            counters,
            redis_used=int(memory.get("used_memory", 0)),
            redis_limit=int(memory.get("maxmemory", 0)),
            retained=int(retained),
            oldest_finished=float(oldest[0][1]) if oldest else None,
        )


#: Up to this many undelivered entries are counted from the stream itself (see ``_waiting``).
WAITING_EXACT_MAX = 1000


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _pairs(flat: list[str]) -> dict[str, str]:
    """A flat [name, value, ...] reply (HGETALL or stream fields in a script) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))

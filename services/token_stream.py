"""A job's token stream: inference worker → Redis → ingestion, for the OpenAI door.

The inference worker forwards each token chunk of an OpenAI-door job as it arrives from the
engine, on a short-lived Redis stream of the job (``Keys.token_stream``, with a TTL). The cost is
bounded: one XADD per chunk at most, and chunks that arrive while the previous write is still on
its way go out together in the next one (so chunks less than a write apart, well under a
millisecond on loopback, share a write); no other per-token work. Ingestion reads the stream
with a blocking XREAD and relays it as server-sent events.

Entries (field names in :mod:`services.contracts`): ``c`` a JSON list of chunk texts, ``f`` the
finish reason of the last of them, ``u`` the usage (the stream's end), ``e`` an error (its end
after a failure). A cancel is a key (for jobs not started yet) and a pub/sub message on
``Keys.cancels`` (for running ones): :class:`CancelWatcher` cancels the job's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.contracts import CHUNK_ERROR, CHUNK_FINISH, CHUNK_TEXTS, CHUNK_USAGE, Keys
from services.queue import ALLOW_OOM, REDIS_DOWN, field_args, redis_client
from services.settings import Settings

log = logging.getLogger("llmconsole.token_stream")


#: One flush of a token stream; it runs past Redis's maxmemory (``queue.ALLOW_OOM``) as every step of
#: an accepted job does: refused, the client's stream would stop short while its job finished.
_WRITE = (
    ALLOW_OOM
    + """
-- KEYS: the token stream ; ARGV: its TTL in ms ('' = leave it), then the entry's field/value pairs
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
if ARGV[1] ~= '' then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""
)


class TokenSink:
    """Writes one job's token chunks to its token stream: one XADD per flush, one flush in flight.

    :meth:`push` is synchronous (called from the engine stream loop); a background task writes
    what gathered since its last write. ``started`` is true once a chunk was pushed: it is written
    (and may reach the client) before anything else, so from then on the job must not be restarted.
    """

    def __init__(self, r: aioredis.Redis, keys: Keys, job_id: str, ttl_s: int) -> None:
        self.r = r
        self.key = keys.token_stream(job_id)
        self.ttl_ms = ttl_s * 1000
        self._texts: list[str] = []
        self._finish: str | None = None
        self._end: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._write = r.register_script(_WRITE)
        self.writes = 0
        self.pushed = 0
        self._task = asyncio.create_task(self._run())

    def push(self, text: str, finish_reason: str | None = None) -> None:
        """Queue one chunk (its text may be empty: a token with no text of its own)."""
        self._texts.append(text)
        self.pushed += 1
        if finish_reason:
            self._finish = finish_reason
        self._wake.set()

    def end(self, usage: dict[str, Any]) -> None:
        """Queue the stream's end: the usage."""
        self._end = {CHUNK_USAGE: json.dumps(usage, separators=(",", ":"))}
        self._wake.set()

    def fail(self, message: str) -> None:
        """Queue the stream's end after a failure: the error message."""
        self._end = {CHUNK_ERROR: message[:1000]}
        self._wake.set()

    async def close(self) -> None:
        """Write whatever is queued, then stop (errors writing are logged, not raised)."""
        self._closed = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError, *REDIS_DOWN):
            await self._task

    def abort(self) -> None:
        """Stop without writing (the job was cancelled)."""
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            if not self._texts and not self._end:
                if self._closed:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            fields: dict[str, str] = {}
            if self._texts:
                fields[CHUNK_TEXTS] = json.dumps(self._texts, separators=(",", ":"))
                if self._finish:
                    fields[CHUNK_FINISH] = self._finish
                self._texts, self._finish = [], None
            last = bool(self._end)
            fields.update(self._end)
            self._end = {}
            first = self.writes == 0
            try:
                # The TTL is renewed at the first write and the last.
                ttl = self.ttl_ms if first or last else ""
                await self._write(keys=[self.key], args=[ttl, *field_args(fields)])
            except (*REDIS_DOWN, RedisError) as e:
                log.warning("token stream %s: write failed (%s)", self.key, e.__class__.__name__)
            self.writes += 1

    @property
    def started(self) -> bool:
        """True once a chunk was pushed (the client may see it)."""
        return self.pushed > 0


async def prior(r: aioredis.Redis, keys: Keys, job_id: str) -> tuple[bool, int]:
    """Before an attempt: (the client cancelled the job, entries already on its token stream)."""
    async with r.pipeline(transaction=False) as p:
        p.exists(keys.cancelled(job_id))
        p.xlen(keys.token_stream(job_id))
        cancelled, entries = await p.execute()
    return bool(cancelled), int(entries)


async def cancel(r: aioredis.Redis, keys: Keys, job_id: str, ttl_s: int) -> None:
    """Cancel a job whose client went away: mark it (not started yet) and tell the workers."""
    async with r.pipeline(transaction=False) as p:
        p.set(keys.cancelled(job_id), "1", ex=ttl_s)
        p.publish(keys.cancels, job_id)
        await p.execute()


class CancelWatcher:
    """In an inference worker: one subscription to ``Keys.cancels`` cancels the running job's task."""

    def __init__(self, settings: Settings, keys: Keys) -> None:
        self.settings = settings
        self.keys = keys
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        #: Job ids cancelled by their client (the task learns why it was cancelled).
        self.cancelled: set[str] = set()

    def register(self, job_id: str, task: asyncio.Task[Any]) -> None:
        """Follow ``task`` as the one serving ``job_id``."""
        self.tasks[job_id] = task

    def unregister(self, job_id: str) -> bool:
        """Forget the job; True if its client cancelled it."""
        self.tasks.pop(job_id, None)
        if job_id in self.cancelled:
            self.cancelled.discard(job_id)
            return True
        return False

    def cancel(self, job_id: str) -> None:
        """Cancel the job's task, if this worker runs it."""
        task = self.tasks.get(job_id)
        if task is not None and not task.done():
            self.cancelled.add(job_id)
            task.cancel()

    async def run(self) -> None:
        """Listen forever (reconnecting after Redis trouble)."""
        while True:
            r = redis_client(self.settings, blocking=True)
            try:
                async with r.pubsub() as ps:
                    await ps.subscribe(self.keys.cancels)
                    async for msg in ps.listen():
                        if msg.get("type") == "message":
                            self.cancel(str(msg["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("cancel subscription lost (%s); retrying", e.__class__.__name__)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await r.aclose()

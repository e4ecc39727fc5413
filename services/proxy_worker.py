"""Proxy worker: consume → dispatch → finish.

Reads jobs from the Redis stream with a blocking XREADGROUP (no polling),
forwards each to an inference worker over pooled async HTTP with a bounded
number in flight, and writes the result with the fenced ``finish``.

Reliability, in short:

* While a job runs its lease is renewed (``renew``); a consumer that stops
  renewing (killed, frozen) has its jobs reclaimed by any other consumer with
  XAUTOCLAIM, which raises the job's attempt, so the late one is refused.
* Engine 5xx, timeouts and connection errors are retried with jittered
  exponential backoff; after ``max_attempts`` tries the job is ``dead`` (and in
  the dead-letter stream). An overloaded engine (503/429) is backpressure: it
  waits without using up an attempt. A 4xx from the engine is a final ``failed``.
* SIGTERM: stop reading, give running jobs ``shutdown_grace_s`` to finish, then
  hand the rest back (their idle time is set past the lease so the next
  consumer takes them at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import OutOfMemoryError

from services import procstats, prom, runtime, stream_http
from services.contracts import (
    InferRequest,
    InferResult,
    JobSpec,
    JobState,
    Keys,
    encode_result,
    new_id,
    now_ns,
)
from services.queue import (
    REDIS_DOWN,
    Delivery,
    Entry,
    JobQueue,
    check_redis_version,
    raise_if_cancelling,
    redis_client,
)
from services.retention import Retention
from services.routing.capacity import Acquired, Capacity, slot_member
from services.routing.policies import Guards, JobInfo, choose
from services.routing.registry import Registry, encode_owners
from services.settings import Settings, get_settings

T = TypeVar("T")

log = logging.getLogger("llmconsole.proxy_worker")


@dataclass(frozen=True, slots=True)
class _Choice:
    """A node chosen for a job, and what taking one of its slots writes (routing memory)."""

    node: str
    url: str
    capacity: int
    slot_args: dict[str, Any]


class Superseded(Exception):
    """This attempt was reclaimed by another consumer; stop working on it."""


class Slots:
    """Jobs this proxy worker may hold at once; the limit follows the live nodes' capacity."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Event()

    def free(self) -> int:
        """Slots free now."""
        return max(self.limit - self.used, 0)

    async def acquire(self) -> None:
        """Wait for a free slot and take it."""
        while self.used >= self.limit:
            self._changed.clear()
            await self._changed.wait()
        self.used += 1

    def take(self) -> None:
        """Take a slot without waiting (for entries already claimed: they must start now)."""
        self.used += 1

    def release(self) -> None:
        """Give a slot back."""
        self.used -= 1
        self._changed.set()

    def set_limit(self, limit: int) -> None:
        """Change the limit (waiters re-check)."""
        if limit != self.limit:
            self.limit = limit
            self._changed.set()


class ProxyWorker:
    """One consumer of the job stream."""

    def __init__(self, settings: Settings, consumer: str | None = None) -> None:
        self.s = settings
        self.keys = Keys(settings.redis_prefix)
        self.consumer = consumer or f"{socket.gethostname()[:40]}-{os.getpid()}"
        self.r = redis_client(settings, blocking=True)
        self.q = JobQueue(self.r, self.keys)
        #: The hop to the inference workers: keep-alive connections per worker URL, over
        #: services.stream_http. httpx was about 60 % of this process's CPU in a py-spy profile of
        #: a run at concurrency 32 (its pool scans every open connection per request); aiohttp,
        #: next, 80-130 µs of this process's CPU a request, stream_http 35-44 (scripts/hop_client.py).
        self._pools: dict[str, stream_http.StreamPool] = {}
        self._worker_headers: dict[str, str] = {}
        if settings.effective_worker_api_key:
            self._worker_headers["Authorization"] = f"Bearer {settings.effective_worker_api_key}"
        # The limit follows the live nodes' capacity (PROXY_CONCURRENCY, if set, bounds it).
        self.slots = Slots(0)
        self.cap = Capacity(self.r, self.keys)
        self.registry = Registry(self.r, self.keys, settings, self.cap)
        self.guards = Guards(
            settings.routing_balance_abs,
            settings.routing_balance_rel,
            settings.routing_fair_share,
            settings.routing_fair_share_abs,
            settings.routing_spill_load or min(1.0, 1 / settings.node_capacity_factor),
        )
        #: node → slot members this proxy holds there (their leases are renewed in one batch).
        self.held: dict[str, set[str]] = {}
        #: Set when this proxy gives a node slot back (a job waiting for room looks again).
        self._freed = asyncio.Event()
        self.running: dict[str, tuple[Delivery, asyncio.Task[None]]] = {}
        #: Every launched job task, from launch (before its attempt starts) to its end.
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        #: Turn counter of round robin (and of tie breaks between equally loaded nodes).
        self._turn = 0
        #: Slot releases still being written to Redis.
        self._releases: set[asyncio.Task[None]] = set()
        #: Loop time before which no reclaim pass runs (set when Redis stops answering).
        self._hold_reclaim_until = 0.0

    # --- main loops -------------------------------------------------------
    async def run(self) -> None:
        """Consume until :meth:`stop`; then drain within the grace period."""
        await self._wait_for_redis()
        prom.track(prom.PROXY_IN_FLIGHT, lambda: len(self.running))
        # Read from the metrics thread: len() of the dict the loop replaces whole at each refresh.
        prom.track(prom.PROXY_NODES, lambda: len(self.registry.nodes))
        metrics_server = prom.serve(self.s.proxy_metrics_host, self.s.proxy_metrics_port)
        loops = [
            asyncio.create_task(self._trim_loop()),
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._registry_loop()),
            asyncio.create_task(Retention(self.r, self.keys, self.s).run_forever(self.stopping)),
            asyncio.create_task(
                procstats.publish_forever(self.r, self.keys, "proxy_worker", self.s.effective_node_id)
            ),
        ]
        consume = asyncio.create_task(self._consume_loop())
        try:
            await asyncio.wait(
                [consume, asyncio.create_task(self.stopping.wait())], return_when="FIRST_COMPLETED"
            )
        finally:
            consume.cancel()
            for t in loops:
                t.cancel()
            await asyncio.gather(consume, *loops, return_exceptions=True)
            await self._drain()
            for pool in self._pools.values():
                await pool.aclose()
            await self.r.aclose()
            if metrics_server is not None:
                # shutdown() waits for the server thread's poll (up to 0.5 s): not on the loop.
                await asyncio.to_thread(metrics_server.shutdown)
                metrics_server.server_close()

    def stop(self) -> None:
        """Stop taking jobs (called from the SIGTERM handler)."""
        self.stopping.set()

    async def _wait_for_redis(self) -> None:
        while not self.stopping.is_set():
            try:
                await check_redis_version(self.r)
                await self.q.ensure_group()
                log.info("consumer %s ready", self.consumer)
                return
            except REDIS_DOWN:
                log.info("waiting for Redis at %s:%s", self.s.redis_host, self.s.redis_port)
                await asyncio.sleep(0.5)

    async def _consume_loop(self) -> None:
        # One loop takes all work, and only for free slots: reclaimed entries (a stopped
        # consumer's, or handed back) at every pass, then new ones. Whatever is taken is launched
        # at once, so no entry sits claimed but unstarted (its lease would run out unrenewed),
        # and a reclaim pass can never be starved by the blocking read holding the last slot.
        interval = min(max(self.s.lease_ms / 2000, 0.05), 5.0)
        block_ms = int(min(max(interval * 1000, 50), 1000))
        loop = asyncio.get_running_loop()
        next_reclaim = 0.0  # the first pass runs at start
        while not self.stopping.is_set():
            await self.slots.acquire()
            free = min(1 + self.slots.free(), 64)
            entries: list[Entry] = []
            try:
                if loop.time() >= max(next_reclaim, self._hold_reclaim_until):
                    next_reclaim = loop.time() + interval
                    entries = await self._reclaim(free)
                if not entries:
                    entries = await self.q.read(self.consumer, count=free, block_ms=block_ms)
                raise_if_cancelling()
            except REDIS_DOWN:
                entries = []
                self._redis_trouble()
                await asyncio.sleep(0.5)
            except Exception as e:  # NOGROUP after a Redis wipe, etc.
                log.warning("read failed: %s", e)
                entries = []
                with contextlib.suppress(*REDIS_DOWN):
                    await self.q.ensure_group()
                await asyncio.sleep(0.5)
            if not entries:
                self.slots.release()
                continue
            self._launch(entries[0])
            for entry in entries[1:]:
                self.slots.take()  # claimed already: it starts now, whatever the limit
                self._launch(entry)

    async def _reclaim(self, count: int) -> list[Entry]:
        """Up to ``count`` entries whose consumer stopped renewing (or handed them back)."""
        taken = []
        for entry in await self.q.reclaim(self.consumer, self.s.lease_ms, count=count):
            if entry.job_id in self.running:
                # Our own live job, idle only because renewals could not reach Redis for a while:
                # the claim just renewed it, and its task goes on.
                continue
            log.info("reclaimed %s (entry %s) from a stopped consumer", entry.job_id, entry.entry_id)
            taken.append(entry)
        if taken:
            prom.JOBS_RECLAIMED.inc(len(taken))
            with contextlib.suppress(*REDIS_DOWN):
                await self.r.hincrby(self.keys.stats, "reclaimed", len(taken))
        return taken

    async def _trim_loop(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self.s.stream_trim_interval_s)
            with contextlib.suppress(*REDIS_DOWN):
                await self.q.trim()
                await self.q.prune_consumers()
            raise_if_cancelling()

    async def _heartbeat_loop(self) -> None:
        key = self.keys.consumer_heartbeat(self.consumer)
        while not self.stopping.is_set():
            # Past its maxmemory Redis refuses the beat (a new write): skipped, not the loop's end.
            with contextlib.suppress(*REDIS_DOWN, OutOfMemoryError):
                await self.r.set(key, json.dumps({"in_flight": len(self.running), "t": now_ns()}), ex=15)
            raise_if_cancelling()
            await asyncio.sleep(5)

    async def _registry_loop(self) -> None:
        """Re-read the live nodes, follow their capacity, renew this proxy's node slots."""
        renew_every = max(self.s.lease_ms / 3000, 0.05)
        loop = asyncio.get_running_loop()
        next_renew = loop.time() + renew_every
        while not self.stopping.is_set():
            try:
                await self.registry.refresh()
                await self._drop_departed_pools()
                total = self.registry.total_capacity()
                pc = self.s.proxy_concurrency
                self.slots.set_limit(min(pc, total) if pc else total)
                self._freed.set()  # counts changed: jobs waiting for room look again
                if loop.time() >= next_renew:
                    next_renew = loop.time() + renew_every
                    await self.cap.renew(self.held, self.s.lease_ms)
                raise_if_cancelling()
            except REDIS_DOWN:
                self._redis_trouble()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node registry refresh failed")
            await asyncio.sleep(self.s.registry_refresh_s)

    def _decide(self, policy: str, job: JobInfo) -> _Choice | None:
        """A node for the job by ``policy`` now, with what taking its slot writes; None if none."""
        self._turn += 1
        dec = choose(policy, job, self.registry.views(), self._turn, self.guards)
        node = self.registry.nodes.get(dec.node) if dec else None
        if dec is None or node is None:
            return None
        slot_args: dict[str, Any] = {
            "lease_ms": self.s.lease_ms,
            "policy": policy,
            "prefix": job.prefix,
            "owners": encode_owners(dec.owners),
            "prefixes_key": self.registry.remember(job.prefix, dec.owners),
            "prefixes_ttl_s": self.registry.prefix_ttl_s,
        }
        return _Choice(dec.node, node.url, node.capacity, slot_args)

    def _took(self, choice: _Choice, policy: str, d: Delivery, got: Acquired) -> bool:
        """Note the outcome of taking a slot on the chosen node; True if it is held now."""
        self.registry.in_flight[choice.node] = got.in_flight if got.ok else choice.capacity
        if got.ok:
            self.held.setdefault(choice.node, set()).add(slot_member(d.job_id, d.attempt))
            prom.ROUTING_DECISIONS.labels(choice.node, policy).inc()
        return got.ok

    async def _start(self, entry: Entry) -> tuple[Delivery | None, tuple[str, str] | None]:
        """Claim a read entry: (delivery or None, (node, worker URL) when a slot was taken too).

        The entry's routing hints let the node be chosen before the claim, so the claim takes
        its slot in the same round trip; an entry without hints (or no node to choose now) is
        claimed alone and routed from its spec afterwards (:meth:`_route`).
        """
        # Sent again after a lost reply, the claim returns the attempt it already began (same
        # nonce) and holds the one slot (same node: the choice is made once, here).
        nonce = new_id()
        what = f"start {entry.job_id}"
        policy = entry.routing or self.s.routing
        choice = (
            self._decide(policy, self.registry.prefix_info(entry.prefix, policy))
            if entry.prefix is not None
            else None
        )
        if choice is None:
            call = functools.partial(self.q.start, entry.entry_id, entry.job_id, self.consumer, nonce)
            return await self._until_redis_answers(what, call), None
        d, got = await self._until_redis_answers(
            what,
            functools.partial(
                self.cap.start_and_acquire,
                entry.entry_id,
                entry.job_id,
                self.consumer,
                nonce,
                choice.node,
                choice.capacity,
                group=self.q.group,
                **choice.slot_args,
            ),
        )
        if d is None or not self._took(choice, policy, d, got):
            return d, None
        return d, (choice.node, choice.url)

    async def _route(self, d: Delivery, spec: JobSpec, deadline: float) -> tuple[str, str] | None:
        """Pick a node by policy and take one of its slots: (node, worker URL).

        Waits while every node is full; None once ``deadline`` (loop time) passed.
        """
        policy = spec.routing or self.s.routing
        loop = asyncio.get_running_loop()
        while True:
            choice = self._decide(policy, self.registry.job_info(spec, policy))
            if choice is not None:
                got = await self._until_redis_answers(
                    f"acquire a slot for {d.job_id}",
                    functools.partial(
                        self.cap.acquire,
                        choice.node,
                        choice.capacity,
                        job_id=d.job_id,
                        attempt=d.attempt,
                        **choice.slot_args,
                    ),
                )
                if got.stale:
                    raise Superseded(d.job_id)
                if self._took(choice, policy, d, got):
                    return choice.node, choice.url
                continue  # full meanwhile (another proxy took the room): choose again
            if loop.time() >= deadline:
                return None
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), self.s.registry_refresh_s)

    def _release_slot(self, node: str, d: Delivery, *, in_redis: bool = True) -> bool:
        """Give the node slot of this attempt back; False if it was not held.

        Here at once; in Redis in the background (nothing waits on it), or, with ``in_redis``
        False, by the caller (a result's finish gives it back in its own round trip).
        """
        member = slot_member(d.job_id, d.attempt)
        held = self.held.get(node)
        if held is None or member not in held:
            return False
        held.discard(member)
        self.registry.adjust(node, -1)
        self._freed.set()
        if not in_redis:
            return True
        task = asyncio.create_task(self._release_in_redis(node, d))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return True

    async def _release_in_redis(self, node: str, d: Delivery) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            await self.cap.release(node, d.job_id, d.attempt)

    async def _drain(self) -> None:
        """Let running jobs finish within the grace period, then hand the rest back."""
        if self.tasks:
            log.info(
                "stopping: %d job(s) in flight, waiting up to %.0f s",
                len(self.tasks),
                self.s.shutdown_grace_s,
            )
            tasks = set(self.tasks)
            _done, pending = await asyncio.wait(tasks, timeout=self.s.shutdown_grace_s)
            unfinished = [d for d, t in self.running.values() if t in pending]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for d in unfinished:
                with contextlib.suppress(*REDIS_DOWN):
                    await self.q.release(d)
        await self._hand_back_all()

    async def _hand_back_all(self) -> None:
        """Make every entry still pending on this consumer reclaimable at once by others."""
        with contextlib.suppress(*REDIS_DOWN):
            pending = await self.r.xpending_range(
                self.keys.stream, self.q.group, min="-", max="+", count=10_000, consumername=self.consumer
            )
            ids = [p["message_id"] for p in pending]
            if ids:
                await self.r.xclaim(
                    self.keys.stream,
                    self.q.group,
                    self.consumer,
                    0,
                    ids,
                    idle=self.s.lease_ms * 10,
                    justid=True,
                )
                log.info("handed back %d unfinished job(s)", len(ids))

    # --- one job ----------------------------------------------------------
    def _launch(self, entry: Entry) -> None:
        task = asyncio.create_task(self._process(entry))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda _t: self.slots.release())

    async def _process(self, entry: Entry) -> None:
        job_id = entry.job_id
        d, routed = await self._start(entry)
        if d is None:
            return
        task = asyncio.current_task()
        assert task is not None
        self.running[job_id] = (d, task)
        renewer = asyncio.create_task(self._renew_loop(d, task))
        try:
            await self._run_attempt(d, routed)
        except Superseded:
            log.info("job %s attempt %d was reclaimed elsewhere; dropped here", job_id, d.attempt)
        except asyncio.CancelledError:
            pass  # shutting down (handed back) or superseded
        except REDIS_DOWN:
            log.warning("Redis down while finishing %s; it stays pending and will be redelivered", job_id)
        except Exception:
            log.exception("unexpected error on job %s", job_id)
            with contextlib.suppress(Exception):
                await self._finish(
                    d, JobState.DEAD, {"error": "internal error in proxy worker"}, "internal error"
                )
        finally:
            renewer.cancel()
            self.running.pop(job_id, None)
            if routed is not None:
                # The slot taken with the claim, should the attempt have ended before its hop
                # (cancelled, superseded, a spec that does not parse): not held, nor renewed, on.
                # A no-op once the hop gave it back.
                self._release_slot(routed[0], d)

    async def _renew_loop(self, d: Delivery, task: asyncio.Task[None]) -> None:
        interval = max(self.s.lease_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                renewed = await self.q.renew(d, self.consumer)
                raise_if_cancelling()
                if not renewed:
                    log.info("lost lease on %s (attempt %d)", d.job_id, d.attempt)
                    task.cancel()
                    return
            except REDIS_DOWN:
                self._redis_trouble()
                continue

    def _redis_trouble(self) -> None:
        """Note that Redis failed to answer: no reclaim pass for one lease from now.

        After an outage every running job looks idle past its lease until its renewer gets through
        again (within a third of a lease): reclaiming before that would take live jobs away from
        healthy workers, redo their engine work and count a crash against them.
        """
        self._hold_reclaim_until = asyncio.get_running_loop().time() + self.s.lease_ms / 1000

    async def _until_redis_answers(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` again until Redis answers (a restart or a stall), while this attempt lasts.

        Giving up would leave the entry pending, to be redelivered after the lease as if this
        worker had died on it: the engine's work redone, a delivery counted as a crash. The
        renewer keeps the lease meanwhile; shutdown or a lost lease cancels the task. The queue's
        scripts act once when re-sent, so a call that ran before its reply was lost is harmless.
        """
        delay = 0.1
        while True:
            try:
                return await call()
            except (*REDIS_DOWN, OutOfMemoryError) as e:
                # OOM: Redis at its maxmemory refuses writes until retention frees space; the
                # result waits here instead of being lost (ingestion stops accepting before that).
                self._redis_trouble()
                if delay == 0.1:
                    log.warning("Redis did not answer (%s: %s); retrying until it does", what, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _finish(
        self,
        d: Delivery,
        state: JobState,
        fields: dict[str, Any],
        reason: str = "",
        slot: tuple[str, str] | None = None,
    ) -> None:
        ok = await self._until_redis_answers(
            f"finish {d.job_id}",
            lambda: self.q.finish(d, state, fields, ttl_s=self.s.result_ttl_s, reason=reason, slot=slot),
        )
        if not ok:
            raise Superseded(d.job_id)
        prom.JOBS.labels(state.value).inc()

    def _backoff(self, n: int) -> float:
        base = self.s.retry_base_ms / 1000 * (2 ** max(n - 1, 0))
        return random.uniform(0, min(base, self.s.retry_max_ms / 1000)) + 0.01

    def _pool(self, url: str) -> stream_http.StreamPool:
        pool = self._pools.get(url)
        if pool is None:
            # No cap on connections of our own: the node slots already bound what is in flight.
            # The worker answers once, at the job's end: the read timeout is the job's.
            pool = stream_http.StreamPool(
                url, self._worker_headers, connect_timeout_s=3.0, read_timeout_s=self.s.job_timeout_s
            )
            self._pools[url] = pool
        return pool

    async def _drop_departed_pools(self) -> None:
        """Close the idle connections to workers no live node has any more (a node that left, or
        came back at another address), once nothing is open on them: a churn of nodes leaves no
        sockets or pools behind. A node that comes back gets a new pool on its first job."""
        live = {n.url for n in self.registry.nodes.values()}
        for url in [u for u, p in self._pools.items() if u not in live and not p.in_use]:
            await self._pools.pop(url).aclose()

    async def _post_infer(self, url: str, body: bytes) -> tuple[int, bytes]:
        """POST one attempt to a node's inference worker: (status, body)."""
        return await stream_http.post_read(self._pool(url), "/v1/infer", body)

    async def _run_attempt(self, d: Delivery, routed_at_claim: tuple[str, str] | None = None) -> None:
        if d.spec_json is None:  # a hash without its spec: nothing to run
            await self._finish(d, JobState.DEAD, {"error": "job has no spec"}, "no spec")
            return
        spec = JobSpec.model_validate_json(d.spec_json)
        d.run_id = spec.run_id
        # Deliveries that ended in a crash (not a graceful hand-back) count against the job.
        crashed = d.attempt - 1 - d.handbacks
        if crashed >= self.s.max_attempts:
            reason = f"delivered {d.attempt} times; {crashed} workers died on it without a result"
            await self._finish(d, JobState.DEAD, {"error": reason}, reason)
            return
        tries = d.tries
        overload_waits = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.job_timeout_s
        body = InferRequest(spec=spec, attempt=d.attempt).model_dump_json().encode()
        while True:
            # The first try goes where the claim took a slot (if it did); any later one is routed anew.
            routed = routed_at_claim or await self._route(d, spec, deadline)
            routed_at_claim = None
            t_dispatched = now_ns()
            status: int | None = None
            resp: bytes | None = None
            t_result_received = 0  # set when the worker's answer arrives (status and resp with it)
            # A result's finish gives the node slot back in Redis (one round trip for both);
            # otherwise it goes back in the background. (Should that finish never run, the
            # slot's lease runs out: it is no longer renewed.)
            slot: tuple[str, str] | None = None
            if routed is None:
                status, resp, err = None, None, "no node had room before the job's timeout"
            else:
                node, url = routed
                try:
                    status, resp = await self._post_infer(url, body)
                    # Stamped here, before the result is validated and encoded: that work is the
                    # result write's, not the hop's.
                    t_result_received = now_ns()
                except stream_http.ConnectFailed as e:
                    # Nobody listens (worker restarting, or its node gone): like an overloaded
                    # engine this is backpressure, not the job's fault, so no attempt is used up;
                    # the node gets no new job for a while.
                    self.registry.suspect(node)
                    status, resp, err = 503, None, f"inference worker {url} unreachable: {e!r}"
                except (TimeoutError, stream_http.StreamHttpError) as e:
                    if not isinstance(e, TimeoutError | stream_http.ReadTimeout):
                        self.registry.suspect(node)  # the connection broke: the worker died
                    status, resp, err = None, None, f"inference worker {url} failed mid-request: {e!r}"
                finally:
                    if status == 200 and resp is not None:
                        if self._release_slot(node, d, in_redis=False):
                            slot = (self.keys.node_inflight(node), slot_member(d.job_id, d.attempt))
                    else:
                        self._release_slot(node, d)
            if status == 200 and resp is not None:
                result = InferResult.model_validate_json(resp)
                fields = {
                    "result": encode_result(result),
                    "t_dispatched": t_dispatched,
                    "t_worker_received": result.t_worker_received,
                    "t_engine_start": result.t_engine_start,
                    "t_first_token": result.t_first_token,
                    "t_engine_end": result.t_engine_end,
                    "t_result_received": t_result_received,
                }
                await self._finish(d, JobState.SUCCEEDED, fields, slot=slot)
                prom.observe_job({**d.stamps, **fields, "t_finished": now_ns()}, result.node)
                return
            if resp is not None:
                text = resp.decode("utf-8", "replace")
                try:
                    err = str(json.loads(resp).get("detail", text))[:1000]
                except (ValueError, AttributeError):
                    err = text[:1000]
            if status in (401, 403) and routed is not None:
                # The node refused our worker key: its configuration, not the job, is wrong. It gets
                # no jobs for a while; this one goes elsewhere without using up an attempt.
                log.warning("node %s refused the worker key (%s): %s", routed[0], status, err)
                self.registry.suspect(routed[0])
                status = 503
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                # The engine (or worker) refused the request itself: retrying cannot help.
                await self._finish(
                    d,
                    JobState.FAILED,
                    {"error": f"{status}: {err}", "t_dispatched": t_dispatched},
                )
                return
            if status == 503 and loop.time() < deadline:
                # Engine overloaded or still loading: backpressure, not a used-up attempt.
                overload_waits += 1
                if overload_waits in (1, 10, 100) or overload_waits % 500 == 0:
                    log.info("job %s waits: %s", d.job_id, err)
                await asyncio.sleep(self._backoff(min(overload_waits, 4)))
                continue
            nonce = new_id()  # one try, however often the call must be sent
            tries = await self._until_redis_answers(
                f"count a try of {d.job_id}", functools.partial(self.q.bump, d, "tries", nonce=nonce)
            )
            if tries < 0:
                raise Superseded(d.job_id)
            log.info("job %s try %d failed: %s", d.job_id, tries, err)
            prom.JOB_RETRIES.inc()
            with contextlib.suppress(*REDIS_DOWN):
                await self.r.hincrby(self.keys.stats, "retried", 1)
            if tries >= self.s.max_attempts or loop.time() >= deadline:
                reason = f"gave up after {tries} tries: {err}"
                await self._finish(
                    d,
                    JobState.DEAD,
                    {"error": reason, "t_dispatched": t_dispatched},
                    reason,
                )
                return
            await asyncio.sleep(self._backoff(tries))


async def amain(settings: Settings | None = None) -> None:
    """Run one proxy worker until SIGTERM/SIGINT."""
    s = settings or get_settings()
    worker = ProxyWorker(s)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def main() -> None:
    """Entry point: ``python -m services.proxy_worker``."""
    runtime.setup_logging()
    runtime.freeze_startup_heap()
    runtime.run(amain())


if __name__ == "__main__":
    main()

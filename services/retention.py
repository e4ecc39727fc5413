"""Retention: Redis stays inside its budgets, and says so before it is full.

Two parts:

* :class:`Retention` (run by every proxy worker, every ``RETENTION_INTERVAL_S``) prunes, oldest
  first, the final jobs in the retention index ``Keys.finished`` (written by the queue's fenced
  finish, so indexing costs no round trip) beyond any of their budgets: age (``RESULT_TTL_S``),
  count (``JOB_RETENTION_MAX``), bytes (``JOB_RETENTION_MB``, estimated from a sample of
  ``MEMORY USAGE``) and, when Redis nears its maxmemory, as many as bring it back under the
  refusal level with room to spare. Benchmark runs (hash + index entry; their records live in
  their folders) are pruned by age and count, dead nodes beyond a few with their GPU samples.
* :class:`MemoryGauge` (run by ingestion) reads ``used_memory`` and ``maxmemory`` with one
  ``INFO memory`` every 200 ms in a background task, so a submit checks a number in memory, not
  Redis. Ingestion refuses new jobs (503) at ``REDIS_MEMORY_REFUSE_PCT`` of maxmemory: the rest
  is headroom for the results of jobs already accepted. The gauge is at most one interval stale;
  at 1,000 submits/s that is about 500 KB of job hashes, far inside the headroom of any
  maxmemory above a few MB.

Deleting frees memory even when Redis refuses writes (``DEL`` is allowed under ``noeviction``),
so a full Redis recovers without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.contracts import Keys
from services.queue import REDIS_DOWN
from services.settings import Settings

log = logging.getLogger("llmconsole.retention")

MIB = 1024 * 1024
#: Jobs deleted per round trip.
_BATCH = 500
#: Most jobs one pass deletes (the next pass, a second later, goes on).
_MAX_PER_PASS = 20_000
#: Under memory pressure, prune down to this many percentage points below the refusal level.
PRESSURE_MARGIN_PCT = 10.0
#: Size assumed for a job before any could be sampled.
_DEFAULT_JOB_BYTES = 4096
#: Jobs sampled with MEMORY USAGE to estimate the average size; re-sampled every this many passes.
_SAMPLE = 8
_SAMPLE_EVERY = 30
#: Nodes whose heartbeat expired that are kept (with their GPU samples) for the console.
DEAD_NODES_KEPT = 32
#: How often ingestion's gauge reads Redis's memory.
GAUGE_INTERVAL_S = 0.2
#: Steady pruning is logged at most this often.
_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class MemoryInfo:
    """Redis's memory now: ``used_memory`` and ``maxmemory`` (0 = no limit)."""

    used: int
    limit: int

    def share_pct(self) -> float | None:
        """Used memory as a percentage of the limit (None without a limit)."""
        return 100.0 * self.used / self.limit if self.limit else None


async def read_memory(r: aioredis.Redis) -> MemoryInfo:
    """One ``INFO memory``: used and max memory in bytes."""
    info = await r.info("memory")
    return MemoryInfo(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))


def mb(n: int) -> str:
    """Bytes as MiB for messages, e.g. ``'92.4 MiB'``."""
    return f"{n / MIB:.1f} MiB"


class MemoryGauge:
    """Redis's memory, refreshed by a background task; submits read :meth:`refusal` for free."""

    def __init__(self, r: aioredis.Redis, settings: Settings, interval_s: float = GAUGE_INTERVAL_S) -> None:
        self.r = r
        self.s = settings
        self.interval_s = interval_s
        self.last: MemoryInfo | None = None

    async def refresh(self) -> MemoryInfo:
        """Read Redis's memory now."""
        self.last = await read_memory(self.r)
        return self.last

    async def run_forever(self) -> None:
        """Refresh every interval until cancelled; a Redis outage only pauses it."""
        while True:
            try:
                await self.refresh()
            except (*REDIS_DOWN, RedisError):
                pass  # submits meet the outage themselves (503)
            await asyncio.sleep(self.interval_s)

    def refusal(self, redis_refused: bool = False) -> str | None:
        """The sentence a refused submit gets, or None while Redis has room.

        ``redis_refused``: Redis itself refused the write (OOM) before the gauge saw it full.
        """
        m = self.last
        pct = self.s.redis_memory_refuse_pct
        if not redis_refused and (m is None or not m.limit or m.used < m.limit * pct / 100):
            return None
        state = (
            f"{mb(m.used)} used of its {mb(m.limit)} limit" if m is not None and m.limit else "at its limit"
        )
        return (
            f"Redis is nearly full: {state} (maxmemory, REDIS_MAXMEMORY_MB); new jobs are refused "
            f"above {pct:g} % so that jobs already accepted can still write their results. Retention "
            "frees space by pruning the oldest finished jobs (JOB_RETENTION_MAX, JOB_RETENTION_MB, "
            "RESULT_TTL_S): retry shortly, or raise REDIS_MAXMEMORY_MB."
        )


@dataclass
class RetentionReport:
    """What one pass pruned, and why."""

    jobs: int = 0
    runs: int = 0
    nodes: int = 0
    reasons: list[str] = field(default_factory=list)


class Retention:
    """Prunes final jobs, runs and dead nodes beyond their budgets, oldest first."""

    def __init__(self, r: aioredis.Redis, keys: Keys, settings: Settings) -> None:
        self.r = r
        self.keys = keys
        self.s = settings
        self._avg_job_bytes: float | None = None
        self._passes = 0

    async def run_forever(self, stopping: asyncio.Event | None = None) -> None:
        """A pass every ``RETENTION_INTERVAL_S`` until cancelled (or ``stopping`` is set)."""
        loop = asyncio.get_running_loop()
        total = RetentionReport()
        next_log = loop.time() + _LOG_EVERY_S
        while stopping is None or not stopping.is_set():
            try:
                report = await self.run_pass()
                total.jobs += report.jobs
                total.runs += report.runs
                total.nodes += report.nodes
                total.reasons = list(dict.fromkeys([*total.reasons, *report.reasons]))[-4:]
                pressure = any("maxmemory" in r for r in report.reasons)
                # Steady pruning at the budget is one line a minute; memory pressure is said at once.
                if (total.jobs or total.runs or total.nodes) and (pressure or loop.time() >= next_log):
                    log.info(
                        "retention pruned %d job(s), %d run(s), %d node(s): %s",
                        total.jobs,
                        total.runs,
                        total.nodes,
                        "; ".join(total.reasons),
                    )
                    total = RetentionReport()
                    next_log = loop.time() + _LOG_EVERY_S
            except (*REDIS_DOWN, RedisError) as e:
                log.debug("retention pass skipped: %s", e)
            await asyncio.sleep(self.s.retention_interval_s)

    async def run_pass(self, now: float | None = None) -> RetentionReport:
        """One pass over every budget; returns what it pruned."""
        now = time.time() if now is None else now
        report = RetentionReport()
        mem = await read_memory(self.r)
        await self._prune_jobs(now, mem, report)
        await self._prune_runs(now, report)
        await self._prune_nodes(report)
        self._passes += 1
        return report

    async def job_bytes(self, refresh: bool = False) -> float:
        """Average ``MEMORY USAGE`` of a sample of retained jobs (a default before any exist)."""
        if self._avg_job_bytes is not None and not refresh and self._passes % _SAMPLE_EVERY:
            return self._avg_job_bytes
        ids = await self.r.zrandmember(self.keys.finished, _SAMPLE) or []
        sizes = []
        for job_id in ids:
            n = await self.r.memory_usage(self.keys.job(job_id), samples=0)
            if n:
                sizes.append(int(n))
        if sizes:
            self._avg_job_bytes = sum(sizes) / len(sizes)
        return self._avg_job_bytes or _DEFAULT_JOB_BYTES

    def job_budget_bytes(self, mem: MemoryInfo) -> int:
        """Bytes final jobs may take: ``JOB_RETENTION_MB``, else half of maxmemory (0 = none)."""
        if self.s.job_retention_mb:
            return self.s.job_retention_mb * MIB
        return mem.limit // 2

    async def _prune_jobs(self, now: float, mem: MemoryInfo, report: RetentionReport) -> None:
        total = int(await self.r.zcard(self.keys.finished))
        if not total:
            return
        drop = 0
        expired = int(await self.r.zcount(self.keys.finished, "-inf", now - self.s.result_ttl_s))
        if expired:
            drop = expired
            report.reasons.append(f"{expired} older than {self.s.result_ttl_s} s")
        if total - self.s.job_retention_max > drop:
            drop = total - self.s.job_retention_max
            report.reasons.append(f"over {self.s.job_retention_max} jobs")
        avg = await self.job_bytes()
        budget = self.job_budget_bytes(mem)
        if budget:
            over = total - int(budget // avg)
            if over > drop:
                drop = over
                report.reasons.append(f"over the {mb(budget)} job budget (~{avg:.0f} B a job)")
        pct = self.s.redis_memory_refuse_pct
        if mem.limit and mem.used >= mem.limit * pct / 100:
            target = mem.limit * max(pct - PRESSURE_MARGIN_PCT, pct / 2) / 100
            need = math.ceil((mem.used - target) / avg)
            if need > drop:
                drop = need
                report.reasons.append(f"Redis at {mem.share_pct():.0f} % of its {mb(mem.limit)} maxmemory")
        drop = min(drop, total, _MAX_PER_PASS)
        while drop > 0:
            popped = await self.r.zpopmin(self.keys.finished, min(drop, _BATCH))
            if not popped:
                break
            async with self.r.pipeline(transaction=False) as p:
                for job_id, _score in popped:
                    p.delete(self.keys.job(job_id))
                await p.execute()
            report.jobs += len(popped)
            drop -= len(popped)

    async def _prune_runs(self, now: float, report: RetentionReport) -> None:
        total = int(await self.r.zcard(self.keys.runs))
        if not total:
            return
        old = await self.r.zrangebyscore(self.keys.runs, "-inf", now - self.s.run_retention_s)
        excess = total - self.s.run_retention_max
        extra = await self.r.zrange(self.keys.runs, 0, excess - 1) if excess > 0 else []
        doomed = list(dict.fromkeys([*old, *extra]))
        if not doomed:
            return
        async with self.r.pipeline(transaction=False) as p:
            for run_id in doomed:
                p.delete(self.keys.run(run_id), self.keys.run_jobs(run_id))
            p.zrem(self.keys.runs, *doomed)
            await p.execute()
        report.runs += len(doomed)
        report.reasons.append(
            f"{len(doomed)} run(s) older than {self.s.run_retention_s} s or over {self.s.run_retention_max}"
        )

    async def _prune_nodes(self, report: RetentionReport) -> None:
        names = sorted(await self.r.smembers(self.keys.nodes))
        if len(names) <= DEAD_NODES_KEPT:
            return
        async with self.r.pipeline(transaction=False) as p:
            for n in names:
                p.exists(self.keys.node(n))
                p.xrevrange(self.keys.gpu_samples(n), count=1)
            answers = await p.execute()
        dead: list[tuple[int, str]] = []
        for i, n in enumerate(names):
            alive, last = answers[2 * i], answers[2 * i + 1]
            if not alive:
                last_ms = int(str(last[0][0]).split("-")[0]) if last else 0
                dead.append((last_ms, n))
        dead.sort()
        doomed = [n for _t, n in dead[: max(len(dead) - DEAD_NODES_KEPT, 0)]]
        if not doomed:
            return
        async with self.r.pipeline(transaction=False) as p:
            for n in doomed:
                p.delete(self.keys.gpu_samples(n))
            p.srem(self.keys.nodes, *doomed)
            await p.execute()
        report.nodes += len(doomed)
        report.reasons.append(f"{len(doomed)} dead node(s) beyond {DEAD_NODES_KEPT}")


async def retention_status(r: aioredis.Redis, keys: Keys) -> tuple[MemoryInfo, int, float | None]:
    """Redis memory, final jobs retained and the oldest one's finish time (s), for the console."""
    mem = await read_memory(r)
    async with r.pipeline(transaction=False) as p:
        p.zcard(keys.finished)
        p.zrange(keys.finished, 0, 0, withscores=True)
        count, oldest = await p.execute()
    return mem, int(count), float(oldest[0][1]) if oldest else None

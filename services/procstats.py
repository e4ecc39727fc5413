"""The pipeline's own cost: CPU seconds and memory of its processes.

Every pipeline process (ingestion, proxy worker, inference worker; not the
engine) publishes its cumulative CPU seconds and RSS into one Redis hash every
second, so a benchmark can charge the pipeline's CPU to the jobs it ran, on
one host or many. Where the reader shares the process's host and pid
namespace it reads ``/proc`` directly instead, which is exact at any instant;
a process on another host is read from its last report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from services.contracts import Keys, now_ns

#: How often each process reports.
PUBLISH_INTERVAL_S = 1.0
#: Reports older than this are dropped from the hash (a process that stopped long ago).
STALE_AFTER_S = 300.0

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _host_identity() -> str:
    """Boot id + pid namespace: two processes with the same identity can read each other's /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return socket.gethostname()
    return f"{boot}/{ns}"


HOST_IDENTITY = _host_identity()


def self_cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    t = os.times()
    return t.user + t.system


def self_rss_bytes() -> int:
    """Resident memory of this process now (falls back to the peak where /proc is absent)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_proc(pid: int) -> tuple[float, int, int] | None:
    """(CPU seconds, RSS bytes, start time in clock ticks) of a local process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    utime, stime, start, rss_pages = int(fields[11]), int(fields[12]), int(fields[19]), int(fields[21])
    return (utime + stime) / _CLK_TCK, rss_pages * _PAGE, start


def _self_start_ticks() -> int:
    got = read_proc(os.getpid())
    return got[2] if got else 0


@dataclass(frozen=True)
class ProcReport:
    """One process's latest figures."""

    role: str
    node: str
    pid: int
    host: str
    start: int
    cpu_s: float
    rss_bytes: int
    t: int  # ns wall clock of the report

    @property
    def source_is_report(self) -> bool:
        """True when the figures come from the process's report, not from /proc now."""
        return self.host != HOST_IDENTITY or self.t <= 0 or not Path(f"/proc/{self.pid}").exists()

    @property
    def field(self) -> str:
        """Its field in the hash."""
        return f"{self.role}:{self.node}:{self.pid}"

    def local_now(self) -> ProcReport | None:
        """The same figures read from /proc now, if the process runs on this host; else None."""
        if self.host != HOST_IDENTITY:
            return None
        got = read_proc(self.pid)
        if got is None or got[2] != self.start:  # gone, or the pid was reused
            return None
        return ProcReport(self.role, self.node, self.pid, self.host, self.start, got[0], got[1], now_ns())


def _report(role: str, node: str) -> ProcReport:
    return ProcReport(
        role, node, os.getpid(), HOST_IDENTITY, _START, self_cpu_s(), self_rss_bytes(), now_ns()
    )


_START = _self_start_ticks()


async def publish_forever(r: aioredis.Redis, keys: Keys, role: str, node: str) -> None:
    """Report this process's CPU and RSS every second until cancelled (Redis outages are waited out)."""
    first = True
    while True:
        rep = _report(role, node)
        try:
            await r.hset(keys.procs, rep.field, json.dumps(rep.__dict__))
            if first:
                await prune(r, keys)
                first = False
        except (OSError, ConnectionError, aioredis.RedisError):
            pass
        await asyncio.sleep(PUBLISH_INTERVAL_S)


async def prune(r: aioredis.Redis, keys: Keys) -> None:
    """Drop reports older than :data:`STALE_AFTER_S` (the hash stays as small as the live processes)."""
    cutoff = now_ns() - int(STALE_AFTER_S * 1e9)
    stale = []
    for f, v in (await r.hgetall(keys.procs)).items():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if int(json.loads(v)["t"]) >= cutoff:
                continue
        stale.append(f)
    if stale:
        await r.hdel(keys.procs, *stale)


async def snapshot(r: aioredis.Redis, keys: Keys) -> dict[str, ProcReport]:
    """Every pipeline process's figures now: exact for local ones, last report for remote ones."""
    out: dict[str, ProcReport] = {}
    cutoff = now_ns() - int(STALE_AFTER_S * 1e9)
    for f, v in (await r.hgetall(keys.procs)).items():
        try:
            d: dict[str, Any] = json.loads(v)
            rep = ProcReport(**d)
        except (ValueError, TypeError):
            continue
        if rep.t < cutoff:
            continue
        out[f] = rep.local_now() or rep
    return out


def cpu_between(before: dict[str, ProcReport], after: dict[str, ProcReport]) -> dict[str, Any]:
    """CPU seconds each process used between two snapshots, and their sum.

    A process that started in between counts from zero; one that vanished counts
    up to its last report (``stopped``), so a restart mid-run is still charged.
    """
    procs: list[dict[str, Any]] = []
    total = 0.0
    for f in sorted(set(before) | set(after)):
        a, b = before.get(f), after.get(f)
        if b is None or (a is not None and b.t == a.t and b.source_is_report):
            # gone, or no report since the first snapshot (it stopped before the window): nothing
            # it did in the window is known, and it did nothing after its last report
            continue
        used = b.cpu_s - (a.cpu_s if a is not None else 0.0)
        total += used
        procs.append(
            {
                "role": b.role,
                "node": b.node,
                "pid": b.pid,
                "cpu_s": round(used, 3),
                "rss_bytes": b.rss_bytes,
                "source": "proc" if b.host == HOST_IDENTITY else "report",
            }
        )
    return {"cpu_s": round(total, 3), "processes": procs}

"""Builds one :class:`~console.model.Snapshot` per refresh from the sources.

Every source is read concurrently and fails on its own: a down source turns
into its panel's ``error`` and the other panels keep their data. Rates
(jobs/s, tokens/s, prefix-cache hit rate) are counter deltas between two
refreshes, so the collector keeps the previous counters.

:class:`BackgroundLoop` runs collection on an event loop in its own thread,
so Redis/HTTP/XML-RPC work and decoding never run on the UI's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from console.model import (
    EngineView,
    GpuProcess,
    GpusView,
    GpuView,
    JobsView,
    NodeView,
    QueueView,
    ServicesView,
    ServiceView,
    Snapshot,
)
from console.sources import LocalGpuReading, NodeInfo, SourceDown, Sources
from console.supervisor import ProcessInfo
from services.contracts import GpuSample, JobState, JobView, VllmMetric
from services.engine_client import Sample, metric_sum

log = logging.getLogger("llmconsole.console")

T = TypeVar("T")

#: Rates (jobs/s, tokens/s, prefix hits) are taken over about this many seconds.
RATE_WINDOW_S = 5.0
#: No single source may hold a refresh longer than this.
SOURCE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Counters:
    t: float
    values: dict[str, float | None]


class _Window:
    """Recent counter readings; rates are taken against the oldest one within ``seconds``.

    A window of a few seconds keeps jobs/s and tokens/s readable when work finishes in
    bursts, while still following a change of load within seconds.
    """

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds
        self._readings: deque[_Counters] = deque()

    def base(self, t: float) -> _Counters | None:
        """The oldest reading at most ``seconds`` before ``t`` (the latest one if all are older)."""
        while len(self._readings) > 1 and t - self._readings[0].t > self.seconds:
            self._readings.popleft()
        return self._readings[0] if self._readings else None

    def push(self, reading: _Counters) -> None:
        """Keep a reading."""
        self._readings.append(reading)

    def clear(self) -> None:
        """Forget everything (the source restarted or went away)."""
        self._readings.clear()


def _delta_rate(prev: _Counters | None, t: float, key: str, value: float | None) -> float | None:
    """(value - previous value) / elapsed, or None without a previous reading or on a counter reset."""
    if prev is None or value is None:
        return None
    before = prev.values.get(key)
    dt = t - prev.t
    if before is None or dt <= 0 or value < before:
        return None
    return (value - before) / dt


async def _guard(coro: Awaitable[T], what: str) -> T | str:
    """Await ``coro``; a failure becomes a sentence for the panel instead of an exception."""
    try:
        return await asyncio.wait_for(coro, SOURCE_TIMEOUT_S)
    except SourceDown as e:
        return str(e)
    except TimeoutError:
        return f"{what} did not answer within {SOURCE_TIMEOUT_S:.0f}s"
    except Exception as e:  # a bug in one source must not blank the whole console
        log.exception("collecting %s failed", what)
        return f"{what}: {type(e).__name__}: {e}"


class Collector:
    """Reads every source once per :meth:`collect` and keeps what rates need."""

    def __init__(
        self,
        sources: Sources,
        *,
        job_limit: int = 100,
        history: int = 120,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sources = sources
        self.job_limit = job_limit
        self.clock = clock
        self.wall = wall
        self.depth_history: deque[float] = deque(maxlen=history)
        self._seq = 0
        self._queue_rates = _Window(RATE_WINDOW_S)
        self._engine_rates = _Window(RATE_WINDOW_S)
        self._event_rates = _Window(RATE_WINDOW_S)

    async def collect(self) -> Snapshot:
        """One refresh: every source concurrently, then the derived figures."""
        t0 = time.perf_counter()
        s = self.sources
        queue_r, engine_r, procs_r, jobs_r, events_r, local_r, nodes_r = await asyncio.gather(
            _guard(s.queue.queue_stats(), "queue"),
            _guard(s.engine.metrics(), "engine"),
            _guard(s.supervisor.processes(), "supervisor"),
            _guard(s.jobs.recent_jobs(self.job_limit), "jobs"),
            _guard(s.jobs.event_count(), "events"),
            _guard(s.local_gpu.read(), "NVML"),
            _guard(self._nodes_with_samples(), "nodes"),
        )
        t = self.clock()
        services = self._services(procs_r)
        gpus = await self._gpus(local_r, nodes_r, services)
        if not isinstance(jobs_r, str):
            gpus = replace(gpus, nodes=node_job_figures(gpus.nodes, jobs_r))
        self._seq += 1
        events_per_s = None
        if isinstance(events_r, int):
            events_per_s = _delta_rate(self._event_rates.base(t), t, "events", float(events_r))
            self._event_rates.push(_Counters(t, {"events": float(events_r)}))
        jobs = (
            JobsView(error=jobs_r)
            if isinstance(jobs_r, str)
            else JobsView(jobs=tuple(jobs_r), events_per_s=events_per_s)
        )
        return Snapshot(
            seq=self._seq,
            taken_at=self.wall(),
            queue=self._queue(queue_r, t),
            engine=self._engine(engine_r, t),
            gpus=gpus,
            services=services,
            jobs=jobs,
            collect_s=time.perf_counter() - t0,
        )

    # -- queue -------------------------------------------------------------
    def _queue(self, r: Any, t: float) -> QueueView:
        if isinstance(r, str):
            return QueueView(error=r, depth_history=tuple(self.depth_history))
        c = r.counters
        done = float(c.get("succeeded", 0) + c.get("failed", 0) + c.get("dead", 0))
        submitted = float(c.get("submitted", 0))
        base = self._queue_rates.base(t)
        done_per_s = _delta_rate(base, t, "done", done)
        sub_per_s = _delta_rate(base, t, "submitted", submitted)
        self._queue_rates.push(_Counters(t, {"done": done, "submitted": submitted}))
        self.depth_history.append(float(r.waiting))
        return QueueView(
            waiting=r.waiting,
            in_flight=r.in_flight,
            active=r.active,
            consumers=r.consumers,
            submitted=c.get("submitted", 0),
            succeeded=c.get("succeeded", 0),
            failed=c.get("failed", 0),
            dead=c.get("dead", 0),
            refused=c.get("refused", 0),
            redelivered=c.get("redelivered", 0),
            done_per_s=done_per_s,
            submitted_per_s=sub_per_s,
            depth_history=tuple(self.depth_history),
            redis_used=r.redis_used,
            redis_limit=r.redis_limit,
            retained=r.retained,
            oldest_age_s=max(time.time() - r.oldest_finished, 0.0) if r.oldest_finished else None,
        )

    # -- engine ------------------------------------------------------------
    def _engine(self, r: Any, t: float) -> EngineView:
        url = self.sources.engine.url
        if isinstance(r, str):
            self._engine_rates.clear()
            return EngineView(url=url, error=r)
        samples: list[Sample] = r
        values = {
            "prompt": metric_sum(samples, VllmMetric.PROMPT_TOKENS),
            "gen": metric_sum(samples, VllmMetric.GENERATION_TOKENS),
            "hits": metric_sum(samples, VllmMetric.PREFIX_HITS),
            "queries": metric_sum(samples, VllmMetric.PREFIX_QUERIES),
        }
        prev = self._engine_rates.base(t)
        hit_rate: float | None = None
        if prev is not None and values["hits"] is not None and values["queries"] is not None:
            dq = values["queries"] - (prev.values.get("queries") or 0.0)
            dh = values["hits"] - (prev.values.get("hits") or 0.0)
            if dq > 0 and dh >= 0:
                hit_rate = dh / dq
        if hit_rate is None and values["queries"]:
            # Nothing new since the last scrape: show the lifetime rate instead of a gap.
            hit_rate = (values["hits"] or 0.0) / values["queries"]
        view = EngineView(
            url=url,
            running=metric_sum(samples, VllmMetric.RUNNING),
            waiting=metric_sum(samples, VllmMetric.WAITING),
            kv_usage=metric_sum(samples, VllmMetric.KV_CACHE_USAGE),
            prefix_hit_rate=hit_rate,
            prompt_tps=_delta_rate(prev, t, "prompt", values["prompt"]),
            generation_tps=_delta_rate(prev, t, "gen", values["gen"]),
            requests_total=metric_sum(samples, VllmMetric.REQUEST_SUCCESS),
            preemptions=metric_sum(samples, VllmMetric.PREEMPTIONS),
        )
        self._engine_rates.push(_Counters(t, values))
        return view

    # -- services ------------------------------------------------------------
    @staticmethod
    def _services(r: Any) -> ServicesView:
        if isinstance(r, str):
            return ServicesView(error=r)
        procs: list[ProcessInfo] = r
        return ServicesView(
            services=tuple(
                ServiceView(p.name, p.group, p.state, p.pid, p.uptime_s, p.description)
                for p in sorted(procs, key=lambda p: p.full_name)
            )
        )

    # -- GPUs ----------------------------------------------------------------
    async def _nodes_with_samples(self) -> list[tuple[NodeInfo, list[GpuSample]]]:
        nodes = await self.sources.nodes.nodes()
        samples = await asyncio.gather(
            *(self.sources.nodes.latest_gpu_samples(n.node) for n in nodes if n.alive)
        )
        alive = iter(samples)
        return [(n, next(alive) if n.alive else []) for n in nodes]

    async def _gpus(self, local_r: Any, nodes_r: Any, services: ServicesView) -> GpusView:
        local_node = self.sources.local_gpu.node
        now_ns = int(self.wall() * 1e9)
        # reason → where it holds ("this host", node names), so one cause is said once.
        reasons: dict[str, list[str]] = {}
        local: LocalGpuReading | None = None
        if isinstance(local_r, str):
            reasons.setdefault(local_r, []).append("this host")
        else:
            local = local_r
            if local.reason:
                reasons.setdefault(local.reason, []).append("this host")
        # Local samples first (freshest, and their pids are ours to attribute).
        tagged: list[tuple[str, GpuSample, bool]] = []
        if local is not None:
            tagged += [(local_node, s, True) for s in local.samples]
        nodes: list[NodeView] = []
        error: str | None = None
        if isinstance(nodes_r, str):
            error = nodes_r
        else:
            for info, samples in nodes_r:
                nodes.append(_node_view(info, now_ns))
                if info.node == local_node and local is not None and local.samples:
                    continue  # the same GPUs, already read through NVML
                tagged += [(info.node, s, info.node == local_node) for s in samples]
                gpu_field = info.fields.get("gpu", "")
                if info.alive and not samples and gpu_field.startswith("no"):
                    why = gpu_field.removeprefix("no:").strip() or "no GPU"
                    reasons.setdefault(why, []).append(info.node)
        owners: dict[int, str] = {}
        local_pids = {pid for _n, s, is_local in tagged if is_local for pid in s.processes}
        if local_pids and services.services:
            roots = {sv.pid: sv.name for sv in services.services if sv.pid > 0}
            owned = await _guard(self.sources.procs.owners(roots), "process tree")
            if isinstance(owned, dict):
                owners = owned
        gpus = tuple(
            GpuView(
                node=node,
                index=s.index,
                name=s.name,
                util_pct=s.util_pct,
                vram_used_bytes=s.vram_used_bytes,
                vram_total_bytes=s.vram_total_bytes,
                temp_c=s.temp_c,
                power_w=s.power_w,
                processes=tuple(
                    GpuProcess(pid, owners.get(pid, "") if is_local else "", used)
                    for pid, used in sorted(s.processes.items(), key=lambda kv: -kv[1])
                ),
                age_s=max(0.0, (now_ns - s.t) / 1e9) if s.t else None,
            )
            for node, s, is_local in tagged
        )
        reason = None
        if not gpus:
            reason = "; ".join(f"{why} ({', '.join(where)})" for why, where in reasons.items())
            reason = reason or "no GPU samples from any node"
        return GpusView(gpus=gpus, nodes=tuple(nodes), no_gpu_reason=reason, error=error)


def _node_view(info: NodeInfo, now_ns: int) -> NodeView:
    f = info.fields
    age: float | None = None
    if f.get("t", "").isdigit():
        age = max(0.0, (now_ns - int(f["t"])) / 1e9)
    # The heartbeat hash expires after NODE_TTL_S: its presence is the liveness
    # (comparing clocks across hosts would add skew to it).
    if not info.alive:
        state = "lost"
    elif info.draining or f.get("state") == "draining":
        state = "draining"
    else:
        state = "up"
    return NodeView(
        node=info.node,
        engine=f.get("engine", ""),
        model=f.get("model", ""),
        gpu=f.get("gpu", ""),
        in_flight=_int(f.get("in_flight")),
        alive=info.alive,
        age_s=age,
        gpus=f.get("gpus", ""),
        capacity=_int(f.get("capacity")),
        state=state,
    )


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def node_job_figures(nodes: tuple[NodeView, ...], jobs: list[JobView]) -> tuple[NodeView, ...]:
    """Each node's share of the recent succeeded jobs and its prefix-cache hit rate over them."""
    done: dict[str, list[JobView]] = {}
    for j in jobs:
        if j.state == JobState.SUCCEEDED and j.result is not None:
            done.setdefault(j.node or j.result.node, []).append(j)
    total = sum(len(v) for v in done.values())
    out = []
    for n in nodes:
        mine = done.get(n.node, [])
        if not mine:
            out.append(n)
            continue
        prompt = sum(j.result.prompt_tokens for j in mine if j.result is not None)
        cached = sum(j.result.cached_tokens or 0 for j in mine if j.result is not None)
        out.append(replace(n, share=len(mine) / total, hit_rate=cached / prompt if prompt else None))
    return tuple(out)


class BackgroundLoop:
    """An asyncio loop in a daemon thread: the console's I/O runs here, never on the UI loop."""

    def __init__(self, name: str = "llmconsole-collector") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the background loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` run on the background loop, from another loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def close(self, final: Coroutine[Any, Any, Any] | None = None, timeout: float = 3.0) -> None:
        """Run ``final`` (e.g. closing clients), then stop the loop and join the thread."""
        if final is not None:
            try:
                self.submit(final).result(timeout)
            except Exception:  # closing must not raise on the way out
                log.debug("closing the collector's clients failed", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

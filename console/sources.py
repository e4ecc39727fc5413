"""Where the console's data comes from: small Protocols and their real implementations.

Each panel reads one kind of source; each source is a Protocol with a real
implementation here and a fake in :mod:`console.fakes`, so tests and
``--demo`` run the same app on fixed data. Every method is async and runs on
the collector's background event loop (never the UI's); blocking calls
(supervisord's XML-RPC, NVML, ``/proc``) go to a thread.

A source that cannot reach its backend raises :class:`SourceDown` with a
sentence for the panel to show; the other panels keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
from redis.exceptions import RedisError

from bench.config import BenchConfig, ProgressEvent
from bench.runner import RunResult
from console.supervisor import LogChunk, ProcessInfo, SupervisorClient, SupervisorError
from services.contracts import GpuSample, JobState, JobView, Keys, job_hash_to_view
from services.engine_client import Sample, parse_prometheus
from services.queue import REDIS_DOWN, JobQueue, QueueStats, redis_client
from services.routing.registry import set_draining
from services.settings import Settings
from services.telemetry import make_backend, read_gpu_samples


class SourceDown(Exception):
    """A source's backend is unreachable; the message is shown in its panel."""


# ---------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------


@runtime_checkable
class QueueSource(Protocol):
    """Queue depth and lifetime counters."""

    async def queue_stats(self) -> QueueStats:
        """Current :class:`QueueStats`."""
        ...


@runtime_checkable
class JobSource(Protocol):
    """Recent jobs and the job event channel."""

    async def recent_jobs(self, limit: int) -> list[JobView]:
        """Up to ``limit`` most recent jobs, newest first."""
        ...

    async def job(self, job_id: str) -> JobView | None:
        """One job, fresh from its hash (None if unknown or expired)."""
        ...

    async def event_count(self) -> int:
        """Job events seen on the events channel since this source started."""
        ...


@dataclass(frozen=True)
class NodeInfo:
    """A registered inference worker node and its heartbeat fields."""

    node: str
    fields: dict[str, str]
    #: False once the heartbeat hash expired (the node stopped beating).
    alive: bool
    #: An operator asked it to drain (the flag ``install.sh --leave`` and the console set).
    draining: bool = False


@runtime_checkable
class NodeSource(Protocol):
    """Inference worker nodes and the GPU samples they publish."""

    async def nodes(self) -> list[NodeInfo]:
        """Every node that ever registered, with its heartbeat if still alive."""
        ...

    async def latest_gpu_samples(self, node: str) -> list[GpuSample]:
        """The newest sample of each GPU of ``node`` (empty if it publishes none)."""
        ...

    async def drain(self, node: str) -> None:
        """Ask ``node`` to drain: it finishes its running jobs and takes no new ones."""
        ...


@dataclass(frozen=True)
class LocalGpuReading:
    """This host's GPUs read through NVML, or why there are none."""

    samples: tuple[GpuSample, ...] = ()
    reason: str | None = None


@runtime_checkable
class LocalGpuSource(Protocol):
    """NVML on this host."""

    node: str

    async def read(self) -> LocalGpuReading:
        """Sample every local GPU once."""
        ...


@runtime_checkable
class EngineSource(Protocol):
    """The engine's Prometheus ``/metrics``."""

    url: str

    async def metrics(self) -> list[Sample]:
        """Parsed samples of one scrape."""
        ...


@runtime_checkable
class SupervisorSource(Protocol):
    """supervisord: program states, control and logs."""

    async def processes(self) -> list[ProcessInfo]:
        """Every program with its state."""
        ...

    async def start(self, name: str) -> None:
        """Start a program (waits until it runs)."""
        ...

    async def stop(self, name: str) -> None:
        """Stop a program (waits until it stopped)."""
        ...

    async def restart(self, name: str) -> None:
        """Restart a program."""
        ...

    async def tail(self, name: str, offset: int, length: int) -> LogChunk:
        """A slice of the program's stdout log."""
        ...


@runtime_checkable
class ProcessTreeSource(Protocol):
    """Which processes descend from which (to attribute GPU memory to services)."""

    async def owners(self, roots: dict[int, str]) -> dict[int, str]:
        """Map every descendant pid of each root pid (and the root itself) to the root's label."""
        ...


@dataclass(frozen=True)
class RunRow:
    """One benchmark run in the runs list (from Redis and/or its results folder)."""

    run_id: str
    state: str
    date: str
    label: str
    path: str
    completed: int | None
    failed: int | None
    request_throughput: float | None
    output_throughput: float | None
    #: Live progress of a running run, e.g. "run 40/100".
    progress: str = ""
    out_dir: str = ""


@runtime_checkable
class BenchSource(Protocol):
    """The benchmark library: run, list and load runs."""

    async def run(self, config: BenchConfig, progress: Callable[[ProgressEvent], None]) -> RunResult:
        """Run a benchmark to the end (``progress`` is called as it goes)."""
        ...

    async def runs(self, limit: int = 100) -> list[RunRow]:
        """Known runs, newest first."""
        ...

    async def load(self, run_id: str) -> RunResult:
        """A run's summary and records (raises SourceDown if it cannot be found)."""
        ...


@dataclass
class Sources:
    """The set of sources one console uses."""

    queue: QueueSource
    jobs: JobSource
    nodes: NodeSource
    local_gpu: LocalGpuSource
    engine: EngineSource
    supervisor: SupervisorSource
    procs: ProcessTreeSource
    #: Things to close when the console ends (clients, subscriptions).
    closers: list[Any] = field(default_factory=list)

    async def aclose(self) -> None:
        """Close every client this set opened."""
        for c in self.closers:
            with contextlib.suppress(Exception):
                await c.aclose()


# ---------------------------------------------------------------------------
# Redis: queue, jobs, nodes
# ---------------------------------------------------------------------------

_REDIS_ERRORS = (*REDIS_DOWN, RedisError)


def _redis_down(settings: Settings, e: BaseException) -> SourceDown:
    kind = type(e).__name__
    if "auth" in str(e).lower() or "NOAUTH" in str(e) or "WRONGPASS" in str(e):
        return SourceDown(
            f"Redis at {settings.redis_host}:{settings.redis_port} refused the password ({kind})"
        )
    return SourceDown(f"Redis down at {settings.redis_host}:{settings.redis_port} ({kind})")


class RedisStack:
    """Queue, jobs and nodes, read from the stack's Redis (implements three Protocols).

    Final jobs never change, so their decoded views are cached and only
    queued/running jobs are read again on each refresh.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.r = redis_client(settings)
        self.queue = JobQueue(self.r, self.keys)
        self._final: dict[str, JobView] = {}
        self._events = 0
        self._listener: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        """Stop the event listener and close the connection pool."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        await self.r.aclose()

    # QueueSource
    async def queue_stats(self) -> QueueStats:
        """Depth and counters via :meth:`JobQueue.stats`."""
        try:
            return await self.queue.stats()
        except _REDIS_ERRORS as e:
            raise _redis_down(self.settings, e) from e

    # JobSource
    async def recent_jobs(self, limit: int) -> list[JobView]:
        """LRANGE the recent list, then HGETALL the jobs not known to be final."""
        try:
            ids = await self.r.lrange(self.keys.recent, 0, max(limit, 1) - 1)
            todo = [i for i in ids if i not in self._final]
            hashes: list[dict[str, str]] = []
            if todo:
                async with self.r.pipeline(transaction=False) as p:
                    for job_id in todo:
                        p.hgetall(self.keys.job(job_id))
                    hashes = await p.execute()
        except _REDIS_ERRORS as e:
            raise _redis_down(self.settings, e) from e
        fresh: dict[str, JobView] = {}
        for job_id, h in zip(todo, hashes, strict=True):
            view = _decode_job(job_id, h)
            if view is None:
                continue
            fresh[job_id] = view
            if view.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD):
                self._final[job_id] = view
        # Forget final jobs that fell off the recent list, so the cache stays bounded.
        keep = set(ids)
        for job_id in [k for k in self._final if k not in keep]:
            del self._final[job_id]
        out: list[JobView] = []
        for job_id in ids:
            v = self._final.get(job_id) or fresh.get(job_id)
            if v is not None:
                out.append(v)
        return out

    async def job(self, job_id: str) -> JobView | None:
        """One job's current view."""
        try:
            h = await self.r.hgetall(self.keys.job(job_id))
        except _REDIS_ERRORS as e:
            raise _redis_down(self.settings, e) from e
        return _decode_job(job_id, h)

    async def event_count(self) -> int:
        """Events seen so far; starts the listener on first use."""
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        return self._events

    async def _listen(self) -> None:
        """Count job events on the pub/sub channel; reconnect when Redis comes back."""
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.events)
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is not None and msg.get("type") == "message":
                        self._events += 1
            except _REDIS_ERRORS:
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # NodeSource
    async def nodes(self) -> list[NodeInfo]:
        """SMEMBERS nodes, then each heartbeat hash and drain flag (one pipelined round trip)."""
        try:
            names = sorted(await self.r.smembers(self.keys.nodes))
            async with self.r.pipeline(transaction=False) as p:
                for n in names:
                    p.hgetall(self.keys.node(n))
                    p.exists(self.keys.node_drain(n))
                res = await p.execute() if names else []
        except _REDIS_ERRORS as e:
            raise _redis_down(self.settings, e) from e
        return [
            NodeInfo(n, dict(h), bool(h), bool(flag))
            for n, h, flag in zip(names, res[0::2], res[1::2], strict=True)
        ]

    async def drain(self, node: str) -> None:
        """Set the node's drain flag (as ``install.sh --leave`` does); its worker reports it."""
        try:
            await set_draining(self.r, self.keys, node)
        except _REDIS_ERRORS as e:
            raise _redis_down(self.settings, e) from e

    async def latest_gpu_samples(self, node: str) -> list[GpuSample]:
        """The node's newest tick of GPU samples (one entry holds every GPU of the node)."""
        try:
            ticks = await read_gpu_samples(self.r, self.keys, node, count=1)
        except _REDIS_ERRORS as e:
            raise _redis_down(self.settings, e) from e
        except ValueError:
            return []  # an undecodable entry: show no GPU rather than crash the panel
        return sorted(ticks[-1], key=lambda s: s.index) if ticks else []


def _decode_job(job_id: str, h: dict[str, str]) -> JobView | None:
    """A job hash → JobView; None for an expired job; a bare view for an undecodable one."""
    if not h:
        return None
    try:
        return job_hash_to_view(h)
    except ValueError as e:
        # Shown, not hidden: a job the console cannot read is worth seeing.
        return JobView(
            job_id=job_id, state=JobState.FAILED, timestamps={}, stages_s={}, error=f"unreadable: {e}"
        )


# ---------------------------------------------------------------------------
# Engine /metrics
# ---------------------------------------------------------------------------


class HttpEngine:
    """Scrapes the engine's ``/metrics`` over HTTP."""

    def __init__(self, settings: Settings, timeout_s: float = 2.0) -> None:
        self.url = settings.engine_url
        key = settings.engine_api_key.get_secret_value()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=1.0),
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def metrics(self) -> list[Sample]:
        """GET /metrics and parse it."""
        try:
            resp = await self._client.get(f"{self.url}/metrics")
        except httpx.HTTPError as e:
            raise SourceDown(f"engine down at {self.url} ({type(e).__name__})") from e
        if resp.status_code != 200:
            raise SourceDown(f"engine at {self.url} answered {resp.status_code} on /metrics")
        return parse_prometheus(resp.text)


# ---------------------------------------------------------------------------
# supervisord
# ---------------------------------------------------------------------------


class XmlRpcSupervisor:
    """supervisord over XML-RPC on its unix socket (blocking calls run in a thread)."""

    def __init__(self, socket_path: Path | str) -> None:
        self.client = SupervisorClient(socket_path)

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except SupervisorError as e:
            raise SourceDown(str(e)) from e

    async def processes(self) -> list[ProcessInfo]:
        """getAllProcessInfo."""
        return await self._run(self.client.processes)

    async def start(self, name: str) -> None:
        """startProcess."""
        await self._run(self.client.start, name)

    async def stop(self, name: str) -> None:
        """stopProcess."""
        await self._run(self.client.stop, name)

    async def restart(self, name: str) -> None:
        """stopProcess then startProcess."""
        await self._run(self.client.restart, name)

    async def tail(self, name: str, offset: int, length: int) -> LogChunk:
        """tailProcessStdoutLog."""
        return await self._run(self.client.tail, name, offset, length)


# ---------------------------------------------------------------------------
# /proc: which pids belong to which supervised program
# ---------------------------------------------------------------------------


def _parent_map(proc: Path) -> dict[int, int]:
    """pid → parent pid for every process visible in ``proc``."""
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) >= 2:
            parents[int(entry.name)] = int(rest[1])
    return parents


def owners_from_parents(parents: dict[int, int], roots: dict[int, str]) -> dict[int, str]:
    """Label each pid that is a root or descends from one with that root's label."""
    out: dict[int, str] = {}
    for pid in parents:
        seen = 0
        p = pid
        while p and seen < 64:  # bounded walk: pid reuse could make a loop
            if p in roots:
                out[pid] = roots[p]
                break
            p = parents.get(p, 0)
            seen += 1
    for pid, label in roots.items():
        out.setdefault(pid, label)
    return out


class ProcTree:
    """Reads ``/proc`` to find the children of supervised programs (vLLM's engine core is a child)."""

    def __init__(self, proc: Path | str = "/proc") -> None:
        self.proc = Path(proc)

    async def owners(self, roots: dict[int, str]) -> dict[int, str]:
        """Map descendants of ``roots`` to their root's label."""
        if not roots:
            return {}
        parents = await asyncio.to_thread(_parent_map, self.proc)
        return owners_from_parents(parents, roots)


# ---------------------------------------------------------------------------
# NVML on this host (through services.telemetry)
# ---------------------------------------------------------------------------


class NvmlGpu:
    """This host's GPUs through :mod:`services.telemetry`'s backend (NVML, or none)."""

    def __init__(self, settings: Settings, backend: Any = None) -> None:
        self.node = settings.effective_node_id
        self._backend = backend
        self._reason: str | None = None

    def _get_backend(self) -> Any:
        if self._backend is None and self._reason is None:
            try:
                self._backend = make_backend()
            except Exception as e:  # NVML failing in an unforeseen way still means "no GPU here"
                self._reason = f"GPU telemetry unavailable ({type(e).__name__}: {e})"
        return self._backend

    def _read(self) -> LocalGpuReading:
        backend = self._get_backend()
        if backend is None:
            return LocalGpuReading(reason=self._reason)
        if not backend.available():
            return LocalGpuReading(reason=str(getattr(backend, "reason", "") or "no GPU"))
        return LocalGpuReading(samples=tuple(backend.sample()))

    async def read(self) -> LocalGpuReading:
        """Sample every local GPU once (NVML calls run in a thread)."""
        return await asyncio.to_thread(self._read)


# ---------------------------------------------------------------------------
# Benchmarks (the bench library)
# ---------------------------------------------------------------------------


def _ns_date(value: str) -> str:
    """Wall-clock ns → the summaries' date format (local time, like ``bench``'s own)."""
    try:
        return datetime.fromtimestamp(int(value) / 1e9).strftime("%Y%m%d-%H%M%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


class LibraryBench:
    """Runs benchmarks in-process with :func:`bench.runner.run_benchmark`; lists runs from Redis and disk."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self, config: BenchConfig, progress: Callable[[ProgressEvent], None]) -> RunResult:
        """:func:`bench.runner.run_benchmark` with this stack's settings."""
        from bench.runner import run_benchmark

        return await run_benchmark(config, progress, settings=self.settings)

    async def runs(self, limit: int = 100) -> list[RunRow]:
        """Runs in Redis (with live progress) merged with run folders on disk."""
        from bench.report import list_runs
        from bench.store import list_stored_runs

        rows: dict[str, RunRow] = {}
        for info in await asyncio.to_thread(list_runs, self.settings.results_dir):
            rows[info.run_id] = RunRow(
                run_id=info.run_id,
                state="finished",
                date=info.date,
                label=info.label or "",
                path=info.path,
                completed=info.completed,
                failed=info.failed,
                request_throughput=info.request_throughput,
                output_throughput=info.output_throughput,
                out_dir=str(info.out_dir),
            )
        try:
            stored = await list_stored_runs(self.settings, limit)
        except _REDIS_ERRORS:
            stored = []  # the folders still list; Redis adds only live state
        for h in stored:
            run_id = h.get("run_id", "")
            disk = rows.get(run_id)
            state = h.get("state", "")
            progress = ""
            if state == "running":
                progress = f"{h.get('phase', '')} {h.get('done', '0')}/{h.get('total', '?')}".strip()
            elif state == "failed":
                progress = str(h.get("error", ""))[:60]
            rows[run_id] = RunRow(
                run_id=run_id,
                state=state or (disk.state if disk else ""),
                date=disk.date if disk else _ns_date(h.get("t_start", "")),
                label=h.get("label") or (disk.label if disk else ""),
                path=h.get("path") or (disk.path if disk else ""),
                completed=disk.completed if disk else _int_or_none(h.get("done")),
                failed=disk.failed if disk else _int_or_none(h.get("failed")),
                request_throughput=disk.request_throughput if disk else None,
                output_throughput=disk.output_throughput if disk else None,
                progress=progress,
                out_dir=h.get("out_dir") or (disk.out_dir if disk else ""),
            )
        return sorted(rows.values(), key=lambda r: (r.date, r.run_id), reverse=True)[:limit]

    async def load(self, run_id: str) -> RunResult:
        """The run's folder if it is here, else its summary and records from Redis."""
        from bench.report import load_run
        from bench.store import load_stored_run

        folder = Path(self.settings.results_dir) / run_id
        stored: tuple[dict[str, Any], list[Any]] | None = None
        if not (folder / "summary.json").is_file():
            try:
                stored = await load_stored_run(self.settings, run_id)
            except _REDIS_ERRORS as e:
                raise _redis_down(self.settings, e) from e
            if stored is not None and stored[0].get("out_dir"):
                folder = Path(stored[0]["out_dir"])
        if (folder / "summary.json").is_file():
            try:
                return await asyncio.to_thread(load_run, folder)
            except ValueError as e:
                raise SourceDown(str(e)) from e
        if stored is None:
            raise SourceDown(
                f"run {run_id} not found (no folder under {self.settings.results_dir}, not in Redis)"
            )
        h, records = stored
        summary = h.get("summary")
        if not isinstance(summary, dict):
            raise SourceDown(f"run {run_id} has no summary yet (state {h.get('state', '?')})")
        try:
            config = BenchConfig.model_validate(h.get("params") or {})
        except ValueError:
            config = BenchConfig()
        notes = [h["records_missing"]] if h.get("records_missing") else []
        return RunResult(run_id, config, summary, records, None, warnings=notes)


# ---------------------------------------------------------------------------
# Building the real set
# ---------------------------------------------------------------------------


def real_sources(settings: Settings) -> Sources:
    """Sources reading the stack described by ``settings``."""
    stack = RedisStack(settings)
    engine = HttpEngine(settings)
    return Sources(
        queue=stack,
        jobs=stack,
        nodes=stack,
        local_gpu=NvmlGpu(settings),
        engine=engine,
        supervisor=XmlRpcSupervisor(settings.supervisor_socket),
        procs=ProcTree(),
        closers=[stack, engine],
    )

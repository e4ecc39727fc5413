"""Drives a benchmark run: warm-up, load shapes, sweep steps, metrics, results.

Load shapes
    * **concurrency** (closed loop, no rate): ``c`` workers each send their next
      request as soon as their previous one finishes. A request's intended send
      time is the moment its worker became free; its ``client_queue_s`` is its
      wait since the run started, as vLLM's semaphore measures it.
    * **rate** (open loop): arrival times from :func:`bench.arrivals.arrival_offsets`
      (Poisson/gamma); each request is sent at its arrival time, or when a
      concurrency slot frees if a concurrency limit is also set. Its intended
      send time is its arrival time, so a saturated system that holds sends
      back shows up as schedule lag instead of vanishing from the latencies
      (coordinated omission made visible).
    * **sweep**: the same workload at each load level, until the knee.

``--path both`` sends each item on both paths in one schedule (pairs in random
order), sharing the concurrency limit and the arrival process, so both paths
see the same engine load at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from bench import gpu as gpu_window
from bench.arrivals import arrival_offsets
from bench.config import BenchConfig, ProgressEvent
from bench.datasets import load_prompts
from bench.metrics import (
    find_knee,
    overhead,
    paired_e2el,
    path_metrics,
    pipeline_cpu,
    prefix_cache_delta,
    routing_metrics,
)
from bench.paths import DirectPath, OpenAIPipelinePath, PipelinePath, StepClock
from bench.records import RequestRecord
from bench.store import RunStore
from bench.workload import DatasetPrompt, WorkItem, build_workload, derive_seed, interleave
from services import procstats
from services.contracts import Keys, RunState, new_id, now_ns
from services.engine_client import EngineClient, EngineError, Sample, parse_prometheus
from services.queue import REDIS_DOWN, raise_if_cancelling, redis_client
from services.runtime import cancel_and_wait
from services.runtime import run as run_loop
from services.settings import Settings, get_settings

ProgressCallback = Callable[[ProgressEvent], None]

#: Stall notices kept in a run's summary warnings (the first ones; later ones are only printed).
_MAX_STALL_WARNINGS = 5


class BenchError(Exception):
    """A run could not start or went wrong in a way the user can fix (message says how)."""


class _Path(Protocol):
    name: str

    async def prepare(self, items: list[WorkItem]) -> None: ...

    def forget(self) -> None: ...

    async def send(self, item: WorkItem, rec: RequestRecord, clock: StepClock, deadline_s: float) -> None: ...


@dataclass
class RunResult:
    """A finished (or loaded) run: its summary, its per-request records and where they were written."""

    run_id: str
    config: BenchConfig
    summary: dict[str, Any]
    records: list[RequestRecord]
    out_dir: Path | None = None
    state: RunState = RunState.FINISHED
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Load:
    """The load of one step."""

    concurrency: int | None
    rate: float | None
    value: float | None = None  # the swept value, if a sweep

    def describe(self) -> str:
        """e.g. 'concurrency 16' or 'rate 4 req/s, concurrency 8'."""
        parts = []
        if self.rate is not None:
            parts.append(f"rate {self.rate:g} req/s")
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        return ", ".join(parts) or "all at once"


def step_loads(cfg: BenchConfig) -> list[Load]:
    """The load of every step of a resolved config (one step unless it sweeps)."""
    if cfg.sweep is None:
        return [Load(cfg.concurrency, cfg.rate)]
    if cfg.sweep.param == "concurrency":
        return [Load(int(v), cfg.rate, v) for v in cfg.sweep.values]
    return [Load(cfg.concurrency, v, v) for v in cfg.sweep.values]


class _Progress:
    """Counts finished requests, calls the caller's callback, mirrors progress into Redis."""

    def __init__(self, run_id: str, cb: ProgressCallback | None, store: RunStore, steps: int) -> None:
        self.run_id, self.cb, self.store, self.steps = run_id, cb, store, steps
        self.phase: str = "prepare"
        self.done = self.failed = self.total = 0
        self.step = 0
        self.load = ""
        self.t0 = time.perf_counter()
        #: Requests sent in this phase, and when one last finished (or the phase began).
        self.sent = 0
        self.last_change = self.t0
        self._dirty = True

    def emit(self, phase: str, message: str = "", warning: str = "") -> None:
        self.phase = phase
        self._dirty = True
        if self.cb is not None:
            self.cb(
                ProgressEvent(
                    run_id=self.run_id,
                    phase=phase,  # type: ignore[arg-type]
                    done=self.done,
                    total=self.total,
                    failed=self.failed,
                    elapsed_s=time.perf_counter() - self.t0,
                    step=self.step,
                    steps=self.steps,
                    load=self.load,
                    message=message,
                    warning=warning,
                )
            )

    def begin(self, phase: str, total: int, step: int, load: str, message: str = "") -> None:
        self.done = self.failed = self.sent = 0
        self.total, self.step, self.load = total, step, load
        self.t0 = self.last_change = time.perf_counter()
        self.emit(phase, message)

    def sent_one(self) -> None:
        self.sent += 1

    def record(self, rec: RequestRecord) -> None:
        self.last_change = time.perf_counter()
        self.done += 1
        self.failed += 0 if rec.success else 1
        self.emit(self.phase if self.phase in ("warmup", "run") else "run")

    async def mirror(self) -> None:
        """Write progress to the run hash about twice a second (for the console)."""
        while True:
            if self._dirty:
                self._dirty = False
                await self.store.progress(
                    self.run_id,
                    {
                        "phase": self.phase,
                        "done": self.done,
                        "failed": self.failed,
                        "total": self.total,
                        "step": self.step,
                        "steps": self.steps,
                        "load": self.load,
                    },
                )
                # redis-py can finish a command whose task was cancelled meanwhile and swallow the
                # cancel (redis/redis-py#2028): without this, the run's teardown, which cancels
                # this loop and waits for it, would wait forever.
                raise_if_cancelling()
            await asyncio.sleep(0.5)


async def watch_stalls(
    prog: _Progress,
    diagnose: Callable[[], Awaitable[str]],
    notes: list[str],
    stall_s: float,
) -> None:
    """Say so when no request has finished for ``stall_s`` while some are in flight, and again after
    each further such period: a benchmark that waits on a stopped proxy worker or a hung engine
    otherwise sits silent until its per-request timeout (30 minutes by default).

    Each notice goes to the progress callback (``ProgressEvent.warning``) with what ``diagnose``
    finds (the queue's state), and the first few to ``notes`` (the run's summary warnings).
    """
    said_at = 0.0
    while True:
        await asyncio.sleep(min(5.0, stall_s / 4))
        now = time.perf_counter()
        in_flight = prog.sent - prog.done
        if prog.phase not in ("warmup", "run") or in_flight <= 0:
            continue
        if now - max(prog.last_change, said_at) < stall_s:
            continue
        said_at = now
        text = f"no request has finished in the last {now - prog.last_change:.0f} s ({in_flight} in flight)"
        why = await diagnose()
        if why:
            text += f"; {why}"
        prog.emit(prog.phase, warning=text)
        if len(notes) < _MAX_STALL_WARNINGS:
            notes.append(f"{datetime.now().strftime('%H:%M:%S')} {text}")


async def _pipeline_stall(settings: Settings) -> str:
    """What ingestion's queue figures say about a stall of the pipeline path."""
    key = settings.api_key.get_secret_value()
    try:
        async with httpx.AsyncClient(
            timeout=5.0, headers={"Authorization": f"Bearer {key}"} if key else {}
        ) as c:
            resp = await c.get(f"{settings.ingestion_url}/v1/queue")
        q = resp.json() if resp.status_code == 200 else None
        waiting, running = int(q["waiting"]), int(q["in_flight"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        return f"ingestion's queue figures are not readable ({e.__class__.__name__})"
    if running == 0 and waiting > 0:
        return (
            f"{waiting} job(s) wait in the queue and none is running: is a proxy worker up? "
            "(supervisorctl status proxy_worker; its log, var/log/proxy_worker.log)"
        )
    if running > 0:
        return (
            f"{running} job(s) running, {waiting} waiting: long jobs on a slow engine take this long; "
            "if it lasts, check the engine and the inference workers (supervisorctl status; var/log/)"
        )
    return "the queue holds none of them: their results may not be reaching this client"


async def _engine_stall(settings: Settings) -> str:
    return f"the engine at {settings.engine_url} has not finished a request meanwhile"


async def drive(
    sends: list[tuple[WorkItem, str]],
    paths: dict[str, _Path],
    load: Load,
    *,
    burstiness: float,
    seed: int,
    timeout_s: float,
    step: int = 0,
    on_record: Callable[[RequestRecord], None] | None = None,
    on_send: Callable[[], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Send every (item, path) under ``load``; return the records (in send order) and the duration.

    The duration runs from the first dispatch to the last completion, as
    ``vllm bench serve`` measures it.
    """
    n = len(sends)
    records: list[RequestRecord | None] = [None] * n
    clock = StepClock()

    async def do(i: int, intended: float, queued_since: float) -> None:
        item, pname = sends[i]
        rec = RequestRecord(index=item.index, path=pname, step=step, load=load.value, intended_s=intended)
        rec.sent_s = clock.now()
        rec.start_ns = now_ns()
        rec.schedule_lag_s = rec.sent_s - intended
        rec.client_queue_s = rec.sent_s - queued_since
        if on_send is not None:
            on_send()
        try:
            await paths[pname].send(item, rec, clock, rec.sent_s + timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an unexpected answer must not sink the whole run
            rec.success = False
            rec.error = f"client error: {e.__class__.__name__}: {e}"[:500]
            if rec.latency_s is None:
                rec.latency_s = clock.now() - rec.sent_s
        records[i] = rec
        if on_record is not None:
            on_record(rec)

    if load.rate is None and load.concurrency is not None:
        nxt = iter(range(n))

        async def worker() -> None:
            free_at = 0.0
            for i in nxt:  # a shared iterator: each index goes to exactly one worker
                # vLLM's client queue time: every request "arrived" at 0 and waited for a slot.
                await do(i, intended=free_at, queued_since=0.0)
                free_at = clock.now()

        await asyncio.gather(*(worker() for _ in range(min(load.concurrency, n))))
    elif load.rate is None:
        await asyncio.gather(*(do(i, 0.0, 0.0) for i in range(n)))
    else:
        offsets = arrival_offsets(n, load.rate, burstiness, seed)
        sem = asyncio.Semaphore(load.concurrency) if load.concurrency else None

        async def arrive(i: int, at: float) -> None:
            if sem is None:
                await do(i, at, clock.now())
                return
            t_wait = clock.now()
            async with sem:
                await do(i, at, t_wait)

        tasks: list[asyncio.Task[None]] = []
        try:
            for i, at in enumerate(offsets):
                delay = at - clock.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(arrive(i, at)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    duration = clock.now()
    return [r for r in records if r is not None], duration


async def _scrape(engine: EngineClient) -> list[Sample] | None:
    try:
        return parse_prometheus(await engine.metrics_text())
    except EngineError:
        return None


async def _cpu_snapshot(settings: Settings) -> dict[str, procstats.ProcReport] | None:
    """CPU seconds of every pipeline process now (None if Redis cannot be read)."""
    r = redis_client(settings)
    try:
        return await procstats.snapshot(r, Keys(settings.redis_prefix)) or None
    except REDIS_DOWN:
        return None
    finally:
        await r.aclose()


async def _live_nodes(settings: Settings) -> list[str] | None:
    """Nodes with a live heartbeat that take jobs (``up``) now; None if Redis cannot be read."""
    keys = Keys(settings.redis_prefix)
    r = redis_client(settings)
    try:
        names = sorted(await r.smembers(keys.nodes))
        states = [await r.hget(keys.node(n), "state") for n in names]
        return [n for n, st in zip(names, states, strict=True) if st is not None and st != "draining"]
    except REDIS_DOWN:
        return None
    finally:
        await r.aclose()


async def _check_pipeline(settings: Settings) -> None:
    url = f"{settings.ingestion_url}/readyz"
    try:
        async with httpx.AsyncClient(timeout=5.0) as c:
            resp = await c.get(url)
    except httpx.HTTPError as e:
        raise BenchError(
            f"ingestion is not reachable at {settings.ingestion_url} ({e.__class__.__name__}); "
            "is the stack running? (supervisorctl status, or use --path direct)"
        ) from None
    if resp.status_code != 200:
        raise BenchError(
            f"ingestion at {settings.ingestion_url} is not ready ({resp.status_code}: {resp.text[:200]})"
        )


async def _describe_engine(engine: EngineClient) -> tuple[str, str]:
    """The served model and an engine name worded as the inference worker words it."""
    models = await engine.models()
    first = models[0] if models else {}
    if not first:
        raise EngineError("engine serves no model")
    version = await engine.version()
    if first.get("owned_by") == "llmconsole-simulator" or first.get("simulator"):
        return str(first["id"]), f"sim (llmconsole simulator {version})"
    return str(first["id"]), f"vllm {version}".strip()


async def run_benchmark(
    config: BenchConfig,
    progress: ProgressCallback | None = None,
    *,
    settings: Settings | None = None,
) -> RunResult:
    """Run a benchmark (or sweep) as ``config`` says; write its folder; store it in Redis.

    ``progress`` is called on the event loop after every request and phase
    change. Raises :class:`BenchError` for problems the user can fix (nothing
    listening, a bad dataset); a cancelled run is marked failed in Redis.
    """
    s = settings or get_settings()
    cfg = config.resolved(s)
    run_id = cfg.run_id or new_id("run-")
    cfg = cfg.model_copy(update={"run_id": run_id})
    out_dir = Path(cfg.out) if cfg.out else Path(s.results_dir) / run_id
    try:  # literal prompts (custom, sharegpt, prefix_repetition); None: synthetic
        dataset = await load_prompts(config, s, cfg.requests + cfg.warmup)
    except ValueError as e:
        raise BenchError(str(e)) from None
    try:  # fail before the run, not after it, when the folder cannot be written
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot create the results folder {out_dir}: {e}") from None
    loads = step_loads(cfg)
    pnames = cfg.paths
    engine = EngineClient(s.engine_url, s.engine_api_key.get_secret_value(), timeout_s=cfg.timeout_s)
    pipeline: PipelinePath | OpenAIPipelinePath | None = (
        OpenAIPipelinePath(s, engine, run_id, cfg.timeout_s)
        if "pipeline" in pnames and cfg.pipeline_api == "openai"
        else PipelinePath(
            s,
            run_id,
            cfg.label,
            poll_wait_s=cfg.poll_wait_s,
            # each job in flight holds a connection for its long poll; open loops get a wide pool
            max_connections=(
                1024
                if any(ld.concurrency is None for ld in loads)
                else 2 * max(ld.concurrency or 0 for ld in loads) + 16
            ),
            routing=cfg.routing,
        )
        if "pipeline" in pnames
        else None
    )
    store = RunStore(s, enabled=cfg.store)
    prog = _Progress(run_id, progress, store, len(loads))
    mirror: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    warnings: list[str] = []
    started = finished = False
    try:
        model_id, engine_name = "", ""
        try:
            model_id, engine_name = await _describe_engine(engine)
        except EngineError as e:
            if "direct" in pnames:
                raise BenchError(f"the engine is not reachable for the direct path: {e}") from None
            # pipeline only: the engine may sit on another host; only /metrics figures are lost
            warnings.append(f"engine /metrics not readable at {s.engine_url}: {e}")
        if pipeline is not None:
            await _check_pipeline(s)
        paths: dict[str, _Path] = {}
        if pipeline is not None:
            paths["pipeline"] = pipeline
        if "direct" in pnames:
            paths["direct"] = DirectPath(engine, run_id)

        params = cfg.model_dump(mode="json")
        started = await store.start(run_id, params, str(out_dir), cfg.requests * len(pnames) * len(loads))
        mirror = asyncio.create_task(prog.mirror())
        stalls: list[str] = []
        diagnose = (lambda: _pipeline_stall(s)) if pipeline is not None else (lambda: _engine_stall(s))
        watcher = asyncio.create_task(watch_stalls(prog, diagnose, stalls, cfg.stall_notice_s))

        if cfg.warmup:
            await _phase(cfg, paths, loads[0], "warmup", cfg.warmup, "warmup", dataset, prog, 0)

        cpu_before = await _cpu_snapshot(s) if pipeline is not None else None
        live_nodes = await _live_nodes(s) if pipeline is not None else None
        before = await _scrape(engine)
        t_start_ns = now_ns()
        steps: list[dict[str, Any]] = []
        all_records: list[RequestRecord] = []
        knee: dict[str, Any] | None = None
        for i, load in enumerate(loads):
            records, duration = await _phase(
                cfg, paths, load, f"step{i}", cfg.requests, "run", dataset, prog, i
            )
            all_records.extend(records)
            steps.append(step_summary(cfg, load, i, records, duration))
            prog.emit("step", f"step {i + 1}/{len(loads)} done ({load.describe()})")
            if cfg.sweep is not None and len(steps) >= 2:
                knee = sweep_knee(cfg, steps)
                if knee["saturated"] and cfg.sweep.stop_at_knee:
                    break
        t_end_ns = now_ns()
        cpu_after = await _cpu_snapshot(s) if cpu_before is not None else None
        after = await _scrape(engine)
        gpu = await gpu_window.run_window(s, t_start_ns, t_end_ns, sum(r.output_len for r in all_records))

        engine_name = next((r.engine for r in all_records if r.engine), None) or engine_name or None
        model_id = next((r.model for r in all_records if r.model), None) or model_id
        summary = build_summary(
            cfg,
            steps,
            knee,
            prefix_cache_delta(before, after),
            gpu,
            engine=engine_name,
            model_id=model_id,
            t_start_ns=t_start_ns,
            t_end_ns=t_end_ns,
            settings=s,
        )
        summary["pipeline_cpu"] = pipeline_cpu(
            procstats.cpu_between(cpu_before, cpu_after) if cpu_before and cpu_after else None,
            all_records,
            (t_end_ns - t_start_ns) / 1e9,
        )
        summary["routing"] = routing_metrics(
            all_records, live_nodes, policy=cfg.routing, prefix_groups=cfg.prefix_groups
        )
        if pipeline is not None and summary["pipeline_cpu"] is None:
            warnings.append("the pipeline's CPU was not measured: no process reported it in Redis")
        if stalls:
            warnings.extend(f"stalled: {note}" for note in stalls)
        if store.warning:
            warnings.append(store.warning)
        summary["warnings"] = warnings
        result = RunResult(run_id, cfg, summary, all_records, out_dir, RunState.FINISHED, warnings)
        from bench.report import write_run  # matplotlib is imported only here

        try:
            await asyncio.to_thread(write_run, out_dir, summary, all_records, cfg.plots)
        except OSError as e:
            raise BenchError(f"cannot write the results to {out_dir}: {e}") from None
        await store.add_records(run_id, all_records)
        await store.finish(run_id, summary)
        prog.emit("done", f"results in {out_dir}")
        finished = True
        return result
    except asyncio.CancelledError:
        if started:
            await asyncio.shield(store.fail(run_id, "cancelled"))
        raise
    except BaseException as e:
        if started:
            await store.fail(run_id, f"{e.__class__.__name__}: {e}")
        raise
    finally:
        if watcher is not None:
            await cancel_and_wait(watcher)
        if mirror is not None:
            await cancel_and_wait(mirror)
        if pipeline is not None:
            await pipeline.aclose()
        await engine.aclose()
        await store.aclose()
        if not finished:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty: leave no hollow run folders behind


async def _phase(
    cfg: BenchConfig,
    paths: dict[str, _Path],
    load: Load,
    namespace: str,
    n: int,
    phase: str,
    dataset: list[DatasetPrompt] | None,
    prog: _Progress,
    step: int,
) -> tuple[list[RequestRecord], float]:
    items = build_workload(cfg, n, namespace, dataset)
    sends = interleave(items, list(paths), derive_seed(cfg.seed, namespace, "order"))
    prog.begin("prepare", len(sends), step, load.describe(), f"building {namespace} prompts")
    try:
        await asyncio.gather(*(p.prepare(items) for p in paths.values()))
    except (EngineError, ValueError) as e:
        # Prompts are built through the engine's /tokenize before the clock starts.
        raise BenchError(f"could not build the {namespace} prompts: {e}") from e
    prog.begin(phase, len(sends), step, load.describe())
    try:
        return await drive(
            sends,
            paths,
            load,
            burstiness=cfg.burstiness,
            seed=derive_seed(cfg.seed, namespace, "arrivals"),
            timeout_s=cfg.timeout_s,
            step=step,
            on_record=prog.record,
            on_send=prog.sent_one,
        )
    finally:
        for p in paths.values():
            p.forget()


def step_summary(
    cfg: BenchConfig, load: Load, index: int, records: list[RequestRecord], duration: float
) -> dict[str, Any]:
    """One step's figures: per path (same duration for both: they share the schedule) and the overhead."""
    per_path: dict[str, Any] = {}
    for pname in cfg.paths:
        recs = [r for r in records if r.path == pname]
        per_path[pname] = path_metrics(
            recs,
            duration,
            cfg.percentiles,
            cfg.goodput or None,
            max_concurrency=load.concurrency,
            rate=load.rate,
        )
    step: dict[str, Any] = {
        "index": index,
        "load": load.value,
        "max_concurrency": load.concurrency,
        "request_rate": load.rate if load.rate is not None else "inf",
        "duration": duration,
        "paths": per_path,
    }
    if "pipeline" in per_path and "direct" in per_path:
        step["overhead"] = overhead(per_path["pipeline"], per_path["direct"], cfg.percentiles)
        step["paired_e2el"] = paired_e2el(records, cfg.percentiles)
    return step


def primary_path(cfg: BenchConfig) -> str:
    """The path whose figures a summary's top-level vLLM keys carry (pipeline if it ran)."""
    return "pipeline" if "pipeline" in cfg.paths else "direct"


def sweep_knee(cfg: BenchConfig, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The knee of the sweep steps so far (on the primary path's output throughput and median TTFT)."""
    assert cfg.sweep is not None
    p = primary_path(cfg)
    return find_knee(
        [float(st["load"]) for st in steps],
        [st["paths"][p]["output_throughput"] for st in steps],
        [st["paths"][p]["median_ttft_ms"] for st in steps],
        cfg.sweep.min_gain,
        cfg.sweep.latency_factor,
    )


def build_summary(
    cfg: BenchConfig,
    steps: list[dict[str, Any]],
    knee: dict[str, Any] | None,
    prefix_cache: dict[str, Any] | None,
    gpu: dict[str, Any] | None,
    *,
    engine: str | None,
    model_id: str | None,
    t_start_ns: int,
    t_end_ns: int,
    settings: Settings,
) -> dict[str, Any]:
    """The run's summary (summary.json): vLLM's keys for the primary path at top level.

    For a sweep the top level carries the knee step's figures and ``sweep``
    holds every step.
    """
    chosen = steps[knee["knee_index"]] if knee and knee.get("knee_index") is not None else steps[-1]
    primary = primary_path(cfg)
    rate = chosen["request_rate"]
    out: dict[str, Any] = {
        "run_id": cfg.run_id,
        "label": cfg.label,
        "date": datetime.fromtimestamp(t_start_ns / 1e9).strftime("%Y%m%d-%H%M%S"),
        "state": RunState.FINISHED.value,
        "backend": "llmconsole-pipeline" if primary == "pipeline" else "openai",
        "model_id": model_id,
        "engine": engine,
        "path": cfg.path,
        "primary_path": primary,
        "num_prompts": cfg.requests,
        "request_rate": rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": chosen["max_concurrency"],
        "input_tokens": cfg.input_tokens,
        "output_tokens": cfg.output_tokens,
        "prefix_share": cfg.prefix_share,
        "range_ratio": cfg.range_ratio,
        "dataset": cfg.dataset,
        "prefix_groups": cfg.prefix_groups,
        "routing_policy": cfg.routing,
        "seed": cfg.seed,
        "warmup": cfg.warmup,
        "goodput_slo_ms": cfg.goodput or None,
        "percentiles": cfg.percentiles,
    }
    out.update({k: v for k, v in chosen["paths"][primary].items()})
    out["duration"] = chosen["duration"]
    out["paths"] = chosen["paths"]
    if "overhead" in chosen:
        out["overhead"] = chosen["overhead"]
        out["paired_e2el"] = chosen.get("paired_e2el")
    out["prefix_cache"] = prefix_cache
    out["gpu"] = gpu
    if cfg.sweep is not None:
        out["sweep"] = {
            "param": cfg.sweep.param,
            "values": cfg.sweep.values,
            "steps": steps,
            "knee": knee,
            "min_gain": cfg.sweep.min_gain,
            "latency_factor": cfg.sweep.latency_factor,
        }
    out["t_start_ns"] = t_start_ns
    out["t_end_ns"] = t_end_ns
    out["engine_url"] = settings.engine_url
    out["ingestion_url"] = settings.ingestion_url if "pipeline" in cfg.paths else None
    out["config"] = cfg.model_dump(mode="json")
    return out


def run_sync(
    config: BenchConfig, progress: ProgressCallback | None = None, *, settings: Settings | None = None
) -> RunResult:
    """:func:`run_benchmark` from synchronous code."""
    return run_loop(run_benchmark(config, progress, settings=settings))

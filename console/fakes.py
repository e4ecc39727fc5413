"""Fake sources with fixed, deterministic data, for tests and ``llmconsole --demo``.

Each fake implements the same Protocol as its real source in
:mod:`console.sources`. Values change only with the number of calls (never
with the clock), so a test that collects N times always sees the same screen.
Switches cover the plain-failure cases: no GPU, supervisor down, Redis down,
engine down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.config import BenchConfig, ProgressEvent
from bench.metrics import path_metrics
from bench.records import RequestRecord
from bench.runner import BenchError, RunResult
from console.sources import LocalGpuReading, NodeInfo, RunRow, SourceDown, Sources, owners_from_parents
from console.supervisor import LogChunk, ProcessInfo
from services.contracts import (
    STAGES,
    TIMESTAMPS,
    GpuJobStats,
    GpuSample,
    InferResult,
    JobSpec,
    JobState,
    JobView,
    VllmMetric,
    stage_durations,
)
from services.engine_client import Sample
from services.queue import QueueStats

#: A fixed wall-clock origin for fake timestamps (2026-12-01 12:00:00 UTC), in ns.
T0_NS = 1_764_590_400_000_000_000
#: The fake node's name.
FAKE_NODE = "gpu-node-1"
#: The nodes of the fake cluster (``fake_sources(cluster=True)``): up, up, draining, lost.
CLUSTER_NODES = ("sim-node-a", "sim-node-b", "sim-node-c", "sim-node-d")
#: A wave the fake queue depth follows, one value per call.
DEPTH_WAVE = (3, 5, 8, 12, 18, 25, 31, 28, 22, 17, 12, 9, 6, 4, 2, 1, 2, 4, 7, 11)


class FakeClock:
    """A monotonic clock that advances by ``step`` seconds on every reading (one per refresh)."""

    def __init__(self, step: float = 1.0) -> None:
        self.step = step
        self._reads = 0

    def __call__(self) -> float:
        """The next reading."""
        self._reads += 1
        return 1000.0 + self.step * self._reads


def fixed_wall() -> float:
    """A wall clock stuck at :data:`T0_NS` (so snapshots never show the real time)."""
    return T0_NS / 1e9


def make_job(
    n: int,
    state: JobState = JobState.SUCCEEDED,
    *,
    input_tokens: int = 512,
    output_tokens: int = 128,
    run_id: str | None = "run-demo",
    node: str = FAKE_NODE,
    cached_share: float = 0.5,
) -> JobView:
    """A complete fake job number ``n`` with plausible per-stage timestamps (run on ``node``)."""
    job_id = f"job{n:04d}demo"
    # Stage lengths in ms, varied a little by n (deterministic).
    ms = {
        "ingest": 1.2,
        "queue_wait": 40.0 + 15 * (n % 5),
        "dispatch": 2.5,
        "prompt_build": 6.0,
        "engine_ttft": 80.0 + 10 * (n % 3),
        "decode": 900.0 + 50 * (n % 4),
        "return": 1.5,
        "result_write": 0.8,
    }
    ts: dict[str, int | None] = {}
    t = T0_NS + n * 250_000_000
    ts["t_received"] = t
    for st in STAGES:
        t += int(ms[st.name] * 1e6)
        ts[st.end] = t
    ts["t_dispatched"] = (ts["t_dequeued"] or 0) + 1_000_000
    # Cut the timeline where the state says the job stopped.
    if state == JobState.QUEUED:
        keep = 2
    elif state == JobState.RUNNING:
        keep = 7
    else:
        keep = len(TIMESTAMPS)
    for name in TIMESTAMPS[keep:]:
        ts[name] = None
    result = None
    error = None
    if state == JobState.SUCCEEDED:
        ttft = ms["engine_ttft"] / 1000
        decode = ms["decode"] / 1000
        result = InferResult(
            engine="sim (llmconsole simulator 0.1)",
            model="sim-model",
            node=node,
            requested_input_tokens=input_tokens,
            requested_output_tokens=output_tokens,
            prompt_tokens=input_tokens,
            completion_tokens=output_tokens,
            cached_tokens=int(input_tokens * cached_share),
            prefix_tokens=input_tokens // 2,
            finish_reason="length",
            ttft_s=ttft,
            decode_s=decode,
            engine_time_s=ttft + decode,
            gpu=GpuJobStats(
                available=True,
                gpu_count=1,
                samples=10,
                util_mean_pct=87.5,
                vram_peak_bytes=120 * 2**30,
                vram_total_bytes=141 * 2**30,
                power_mean_w=410.0,
                energy_j=410.0 * (ttft + decode),
            ),
            t_worker_received=ts["t_worker_received"] or 0,
            t_engine_start=ts["t_engine_start"] or 0,
            t_first_token=ts["t_first_token"] or 0,
            t_engine_end=ts["t_engine_end"] or 0,
        )
    elif state in (JobState.FAILED, JobState.DEAD):
        error = (
            "engine 400 on /v1/completions: prompt too long"
            if state == JobState.FAILED
            else "gave up after 3"
        )
    spec = JobSpec(
        job_id=job_id,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        prefix_share=0.5,
        run_id=run_id,
        label=None,
        seed=n,
    )
    return JobView(
        job_id=job_id,
        state=state,
        attempt=1 if state != JobState.QUEUED else 0,
        spec=spec,
        timestamps=ts,
        stages_s=stage_durations(ts),
        result=result,
        error=error,
        worker="proxy-1" if state != JobState.QUEUED else None,
        node=node if state != JobState.QUEUED else None,
    )


def demo_jobs(nodes: tuple[str, ...] = (FAKE_NODE,)) -> list[JobView]:
    """A fixed list of recent jobs (newest first) covering every state, spread over ``nodes``."""
    jobs = [make_job(40, JobState.QUEUED), make_job(39, JobState.RUNNING), make_job(38, JobState.RUNNING)]
    for n in range(37, 20, -1):
        state = JobState.SUCCEEDED
        if n == 33:
            state = JobState.FAILED
        elif n == 27:
            state = JobState.DEAD
        # Several nodes: job n runs on node n mod k, each node with its own cache hit rate.
        i = n % len(nodes)
        jobs.append(
            make_job(
                n,
                state,
                input_tokens=256 * (1 + n % 4),
                output_tokens=64 * (1 + n % 3),
                node=nodes[i],
                cached_share=0.5 if len(nodes) == 1 else (0.8, 0.25, 0.5)[i % 3],
            )
        )
    return jobs


class FakeStack:
    """Queue, jobs and nodes (the three Redis-backed Protocols), fixed data."""

    def __init__(
        self,
        *,
        down: bool = False,
        gpu_node: bool = True,
        jobs: list[JobView] | None = None,
        cluster: bool = False,
    ) -> None:
        self.down = down
        self.gpu_node = gpu_node
        #: Four nodes (:data:`CLUSTER_NODES`: two up, one draining, one lost) instead of one.
        self.cluster = cluster
        self.jobs = (demo_jobs(CLUSTER_NODES[:3]) if cluster else demo_jobs()) if jobs is None else jobs
        self.calls = 0
        self.events = 0
        #: Nodes asked to drain, in order.
        self.drained: list[str] = []

    def _check(self) -> None:
        if self.down:
            raise SourceDown("Redis down at 127.0.0.1:6379 (ConnectionError)")

    async def queue_stats(self) -> QueueStats:
        """Depth follows :data:`DEPTH_WAVE`; counters grow by a fixed step per call."""
        self._check()
        n = self.calls
        self.calls += 1
        done = 1200 + 12 * n
        return QueueStats(
            waiting=DEPTH_WAVE[n % len(DEPTH_WAVE)],
            in_flight=4,
            active=DEPTH_WAVE[n % len(DEPTH_WAVE)] + 4,
            stream_len=40,
            consumers=2,
            counters={
                "submitted": done + 30,
                "succeeded": done - 9,
                "failed": 6,
                "dead": 3,
                "refused": 0,
                "redelivered": 2,
            },
            redis_used=412 * 2**20,
            redis_limit=6 * 2**30,
            retained=48_210,
            oldest_finished=time.time() - 7620,
        )

    async def recent_jobs(self, limit: int) -> list[JobView]:
        """The fixed job list."""
        self._check()
        return self.jobs[:limit]

    async def job(self, job_id: str) -> JobView | None:
        """One of the fixed jobs."""
        self._check()
        return next((j for j in self.jobs if j.job_id == job_id), None)

    async def event_count(self) -> int:
        """Three events per call."""
        self._check()
        self.events += 3
        return self.events

    async def nodes(self) -> list[NodeInfo]:
        """One live node (or the four of :data:`CLUSTER_NODES`)."""
        self._check()
        gpu = "yes" if self.gpu_node else "no: NVML library not found (libnvidia-ml.so.1)"
        if not self.cluster:
            return [
                NodeInfo(
                    FAKE_NODE,
                    {
                        "node": FAKE_NODE,
                        "engine": "vllm 0.32.0",
                        "model": "gemma-3-270m",
                        "gpu": gpu,
                        "gpus": "1× NVIDIA H200" if self.gpu_node else "",
                        "in_flight": "4",
                        "capacity": "128",
                        "state": "up",
                        "t": str(T0_NS - 1_000_000_000),
                    },
                    True,
                    FAKE_NODE in self.drained,
                )
            ]
        out = []
        for i, name in enumerate(CLUSTER_NODES):
            lost = i == 3
            fields = {
                "node": name,
                "engine": "sim (llmconsole simulator 0.1)",
                "model": "sim-model",
                "gpu": "no: NVML library not found (libnvidia-ml.so.1)",
                "in_flight": str(5 * (3 - i)),
                "capacity": "128",
                "state": "draining" if i == 2 else "up",
                "t": str(T0_NS - 1_000_000_000),
            }
            out.append(NodeInfo(name, {} if lost else fields, not lost, name in self.drained))
        return out

    async def drain(self, node: str) -> None:
        """Remember the request (the node shows as draining from the next refresh)."""
        self._check()
        self.drained.append(node)

    async def latest_gpu_samples(self, node: str) -> list[GpuSample]:
        """The node publishes no samples of its own in the fake (local NVML covers it)."""
        self._check()
        return []


class FakeEngine:
    """``/metrics`` with counters that grow by a fixed step per scrape."""

    url = "http://127.0.0.1:8000"

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.calls = 0

    async def metrics(self) -> list[Sample]:
        """A scrape: 3 running, 1 waiting, KV 42 %, prefix hits 60 % of queries."""
        if self.down:
            raise SourceDown(f"engine down at {self.url} (ConnectError)")
        n = self.calls
        self.calls += 1
        lbl = {"model_name": "gemma-3-270m", "engine": "0"}
        return [
            Sample(VllmMetric.RUNNING, lbl, 3.0),
            Sample(VllmMetric.WAITING, lbl, 1.0),
            Sample(VllmMetric.KV_CACHE_USAGE, lbl, 0.42),
            Sample(VllmMetric.PREFIX_QUERIES, lbl, 10_000.0 + 1000 * n),
            Sample(VllmMetric.PREFIX_HITS, lbl, 6_000.0 + 600 * n),
            Sample(VllmMetric.PROMPT_TOKENS, lbl, 500_000.0 + 2048 * n),
            Sample(VllmMetric.GENERATION_TOKENS, lbl, 120_000.0 + 512 * n),
            Sample(VllmMetric.REQUEST_SUCCESS, {**lbl, "finished_reason": "length"}, 1200.0 + 12 * n),
        ]


#: The fake programs: name → pid (0 = stopped).
FAKE_PROGRAMS: dict[str, int] = {
    "engine": 4102,
    "inference_worker": 4120,
    "ingestion": 4130,
    "proxy_worker": 4140,
    "redis": 4101,
}
#: vLLM's engine core runs as a child of the engine program: it holds the VRAM.
FAKE_ENGINE_CHILD = 4150


@dataclass
class FakeSupervisor:
    """supervisord with five programs; ``down`` makes every call fail like a missing socket."""

    down: bool = False
    programs: dict[str, int] = field(default_factory=lambda: dict(FAKE_PROGRAMS))
    actions: list[tuple[str, str]] = field(default_factory=list)
    log_lines: int = 0

    def _check(self) -> None:
        if self.down:
            raise SourceDown("supervisord is not running (no socket at var/supervisor.sock)")

    async def processes(self) -> list[ProcessInfo]:
        """Every program; running ones have run for a fixed uptime."""
        self._check()
        now = int(T0_NS / 1e9)
        out = []
        for i, (name, pid) in enumerate(sorted(self.programs.items())):
            running = pid > 0
            uptime = 3 * 3600 + 7 * 60 + 11 * i
            out.append(
                ProcessInfo(
                    name=name,
                    group=name,
                    state="RUNNING" if running else "STOPPED",
                    pid=pid,
                    start=now - uptime if running else 0,
                    now=now,
                    description=f"pid {pid}, uptime {uptime}" if running else "Not started",
                )
            )
        return out

    async def start(self, name: str) -> None:
        """Mark ``name`` running again."""
        self._check()
        self.actions.append(("start", name))
        self.programs[name] = FAKE_PROGRAMS.get(name, 9999) + 1000

    async def stop(self, name: str) -> None:
        """Mark ``name`` stopped."""
        self._check()
        self.actions.append(("stop", name))
        self.programs[name] = 0

    async def restart(self, name: str) -> None:
        """Stop + start."""
        self._check()
        self.actions.append(("restart", name))
        self.programs[name] = FAKE_PROGRAMS.get(name, 9999) + 2000

    async def tail(self, name: str, offset: int, length: int) -> LogChunk:
        """Numbered log lines; each call adds two."""
        self._check()
        start = self.log_lines
        self.log_lines += 2 if offset else 5
        text = "".join(f"{name}: log line {i}\n" for i in range(start, self.log_lines))
        return LogChunk(text, offset + len(text), False)


class FakeProcTree:
    """The engine program's child process holds the GPU memory, as with vLLM."""

    def __init__(self, parents: dict[int, int] | None = None) -> None:
        self.parents = parents if parents is not None else {FAKE_ENGINE_CHILD: FAKE_PROGRAMS["engine"]}

    async def owners(self, roots: dict[int, str]) -> dict[int, str]:
        """Descendants of ``roots`` per the fixed parent map."""
        return owners_from_parents({**{r: 1 for r in roots}, **self.parents}, roots)


class FakeGpu:
    """One H200-like GPU with the engine's child holding most of its memory, or no GPU."""

    node = FAKE_NODE

    def __init__(self, *, available: bool = True, gpus: int = 1) -> None:
        self.available = available
        self.gpus = gpus

    async def read(self) -> LocalGpuReading:
        """Fixed samples, or the reason a host without NVIDIA driver gives."""
        if not self.available:
            return LocalGpuReading(reason="no NVIDIA GPU (NVML library not found: libnvidia-ml.so.1)")
        gib = 2**30
        return LocalGpuReading(
            samples=tuple(
                GpuSample(
                    index=i,
                    name="NVIDIA H200",
                    uuid=f"GPU-fake-{i}",
                    t=T0_NS,
                    util_pct=87.0 - 10 * i,
                    mem_util_pct=40.0,
                    vram_used_bytes=int(126.5 * gib) - i * gib,
                    vram_total_bytes=int(140.4 * gib),
                    temp_c=61.0 + i,
                    power_w=412.0 - 20 * i,
                    energy_mj=123_456_789,
                    processes={FAKE_ENGINE_CHILD: int(125.9 * gib) - i * gib, 7777: int(0.5 * gib)},
                )
                for i in range(self.gpus)
            )
        )


def fake_sources(
    *,
    gpu: bool = True,
    supervisor_down: bool = False,
    redis_down: bool = False,
    engine_down: bool = False,
    gpus: int = 1,
    cluster: bool = False,
) -> Sources:
    """A full set of fake sources (the switches turn single backends off; ``cluster``: four nodes)."""
    stack = FakeStack(down=redis_down, gpu_node=gpu, cluster=cluster)
    return Sources(
        queue=stack,
        jobs=stack,
        nodes=stack,
        local_gpu=FakeGpu(available=gpu, gpus=gpus),
        engine=FakeEngine(down=engine_down),
        supervisor=FakeSupervisor(down=supervisor_down),
        procs=FakeProcTree(),
    )


# ---------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------


def fake_records(n: int, path: str = "pipeline", *, scale: float = 1.0) -> list[RequestRecord]:
    """``n`` deterministic successful requests (latencies grow a little with the index)."""
    out = []
    for i in range(n):
        ttft = scale * (0.08 + 0.004 * (i % 10))
        itl = [scale * 0.01] * 63
        rec = RequestRecord(
            index=i,
            path=path,
            success=True,
            requested_input_tokens=512,
            requested_output_tokens=64,
            prompt_tokens=512,
            completion_tokens=64,
            cached_tokens=256,
            intended_s=0.05 * i,
            sent_s=0.05 * i,
            ttft_s=ttft,
            itl_s=itl,
            latency_s=ttft + sum(itl) + (0.05 if path == "pipeline" else 0.0),
            first_token_s=0.05 * i + ttft,
        )
        if path == "pipeline":
            rec.stages_s = {
                "ingest": 0.001,
                "queue_wait": 0.02 + 0.001 * (i % 5),
                "dispatch": 0.002,
                "prompt_build": 0.005,
                "engine_ttft": ttft,
                "decode": sum(itl),
                "return": 0.001,
                "result_write": 0.001,
            }
            rec.client_s = 0.015
            rec.engine_time_s = ttft + sum(itl)
            rec.server_e2e_s = (rec.latency_s or 0.0) - 0.015
        out.append(rec)
    return out


def fake_run(run_id: str, *, n: int = 40, label: str = "", scale: float = 1.0) -> RunResult:
    """A finished fake run whose summary comes from bench's own metric functions."""
    config = BenchConfig(
        input_tokens=512,
        output_tokens=64,
        prefix_share=0.5,
        requests=n,
        concurrency=8,
        label=label or None,
        run_id=run_id,
    )
    records = fake_records(n, scale=scale)
    metrics = path_metrics(records, 4.0 * scale, config.percentiles, None, max_concurrency=8, rate=None)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "label": label or None,
        "date": "20261201-120000",
        "state": "finished",
        "engine": "sim (llmconsole simulator 0.1)",
        "model_id": "sim-model",
        "path": "pipeline",
        "primary_path": "pipeline",
        "num_prompts": n,
        "request_rate": "inf",
        "burstiness": 1.0,
        "max_concurrency": 8,
        "input_tokens": 512,
        "output_tokens": 64,
        "prefix_share": 0.5,
        "percentiles": config.percentiles,
        **metrics,
        "duration": 4.0 * scale,
        "paths": {"pipeline": metrics},
        "prefix_cache": {"queries": 20480.0, "hits": 10240.0, "hit_rate": 0.5},
        "gpu": None,
        "warnings": [],
        "config": config.model_dump(mode="json"),
    }
    return RunResult(run_id, config, summary, records, None)


class FakeBench:
    """Runs that finish at once with fixed results; two earlier runs to list and compare."""

    settings = None

    def __init__(self, *, fail: str | None = None) -> None:
        self.fail = fail
        self.results: dict[str, RunResult] = {
            "run-fake-a": fake_run("run-fake-a", label="baseline"),
            "run-fake-b": fake_run("run-fake-b", label="slower", scale=1.5),
        }
        self.configs: list[BenchConfig] = []

    async def run(self, config: BenchConfig, progress: Callable[[ProgressEvent], None]) -> RunResult:
        """Report progress per request, then return a fixed result."""
        self.configs.append(config)
        run_id = config.run_id or f"run-fake-{len(self.configs)}"
        total = config.requests
        for done in range(total + 1):
            progress(ProgressEvent(run_id, "run", done, total, 0, done * 0.01))
            await asyncio.sleep(0)
        if self.fail:
            raise BenchError(self.fail)
        result = fake_run(run_id, n=min(total, 200), label=config.label or "")
        self.results[run_id] = result
        return result

    async def runs(self, limit: int = 100) -> list[RunRow]:
        """The known runs, newest id first."""
        rows = []
        for run_id, r in sorted(self.results.items(), reverse=True):
            s = r.summary
            rows.append(
                RunRow(
                    run_id=run_id,
                    state="finished",
                    date=str(s["date"]),
                    label=s.get("label") or "",
                    path=str(s["path"]),
                    completed=s.get("completed"),
                    failed=s.get("failed"),
                    request_throughput=s.get("request_throughput"),
                    output_throughput=s.get("output_throughput"),
                )
            )
        return rows[:limit]

    async def load(self, run_id: str) -> RunResult:
        """A known run."""
        if run_id not in self.results:
            raise SourceDown(f"run {run_id} not found")
        return self.results[run_id]

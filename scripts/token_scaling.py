#!/usr/bin/env python3
"""How the pipeline's per-token work scales with output length: CPU per job and per token (issue 11, item 4).

    ./.venv/bin/python scripts/token_scaling.py                         # 16,128,1024,4096 tokens
    ./.venv/bin/python scripts/token_scaling.py --tokens 16,256,2048 --reps 5
    ./.venv/bin/python scripts/token_scaling.py --tokens 16,128,512 --sim-itl-ms 2  # paced tokens
    ./.venv/bin/python scripts/token_scaling.py --json                  # the figures as JSON

It starts the simulator engine (``python -m services.sim_engine``) on a free port with zero latency
(no TTFT, no ITL, no jitter), so that a job's wall time is what streaming it costs; then a
chunk's data is ready whenever the client polls. ``--sim-itl-ms`` paces the tokens instead, so
that each chunk wakes the client up on its own, as with a real engine. Then, for each output
length, it measures the CPU time of *this* process (``time.process_time``: all its
threads, not the simulator's) per job, median over ``--reps`` repetitions, of:

``engine stream``
    :meth:`services.engine_client.EngineClient.stream_completion` as the inference worker calls
    it (``text_chars`` = the stored preview): after the preview, a timestamp and a byte test per
    token chunk; on uvloop as the worker runs under uvicorn.
``engine stream, every chunk parsed``
    the same with ``text_chars=None``: a timestamp and a JSON parse per token chunk.
``bench direct``
    :meth:`bench.paths.DirectPath.send`, the bench client's direct path: the same stream, then
    the :class:`~bench.records.RequestRecord` it fills, on asyncio's loop as the bench runs.
``gpu sampler``
    :class:`services.telemetry.JobGpuSampler` over :class:`~services.telemetry.FakeGpuBackend`
    for a job of that length: ``tokens × --itl-ms`` of engine time sampled every
    ``--interval-s`` (the worker's ``TELEMETRY_INTERVAL_S``) is ``tokens × itl / interval`` frames,
    then ``stats``. The frames are taken ``--sampler-pace-s`` apart (1 ms) so that the run is
    short: the cost is per frame, and a frame woken after 100 ms idle costs no less (more: cold
    caches). One job alone: concurrent jobs of a worker share the sampling, not the reduction.
``worker result json``
    ``InferResult.model_dump_json()`` with that many ITLs: the inference worker's response body.
``proxy result write``
    ``InferResult.model_validate_json`` of that body and
    :func:`services.contracts.encode_result`: the compact field the proxy worker writes (ITLs
    packed).
``decode result``
    :func:`services.contracts.decode_result` of that field: what every reader of a job does.

A line ``cost = a + b·tokens`` is fitted to each stage's medians (least squares): ``a`` is the
fixed part per job, ``b`` the cost per token. The sizes of the worker's body and of the stored
field are printed too. The figures are CPU time, not wall time, but another process on the
same cores still slows this one's caches: on a shared machine read them as ±30 %.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.paths import DirectPath, StepClock  # noqa: E402
from bench.records import RequestRecord  # noqa: E402
from bench.workload import WorkItem  # noqa: E402
from services import runtime  # noqa: E402
from services.contracts import (  # noqa: E402
    RESULT_TEXT_HEAD_MAX,
    GpuJobStats,
    GpuSample,
    InferResult,
    decode_result,
    encode_result,
    now_ns,
)
from services.engine_client import EngineClient  # noqa: E402
from services.telemetry import FakeGpu, FakeGpuBackend, JobGpuSampler  # noqa: E402

#: The prompt of every streamed job: a few words (the simulator's tokenizer is word-level).
PROMPT = "measure what the pipeline spends on every streamed token"
#: The stages, in the order they are printed.
STAGES = (
    "engine stream",
    "engine stream, every chunk parsed",
    "bench direct",
    "gpu sampler",
    "worker result json",
    "proxy result write",
    "decode result",
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sim(
    port: int, log: Path, max_model_len: int = 65536, itl_ms: float = 0.0
) -> subprocess.Popen[bytes]:
    """The simulator on ``port`` with zero latency (or ``itl_ms`` per token), its output in ``log``.

    Returns once it answers ``/health``.
    """
    args = [sys.executable, "-m", "services.sim_engine", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--ttft-base-ms", "0", "--prefill-ms-per-token", "0", "--itl-ms", f"{itl_ms:g}"]
    args += ["--itl-jitter-ms", "0"]
    args += ["--itl-batch-ms", "0", "--max-model-len", str(max_model_len), "--log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["LLMC_ENV_FILE"] = "/nonexistent/llmconsole.env"
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_sim(proc)
    raise RuntimeError(f"simulator did not start: {log.read_text(errors='replace')[-2000:]}")


def stop_sim(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the simulator, SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def cpu_of(fn: Callable[[], Awaitable[Any]]) -> float:
    """CPU seconds of this process while ``fn()`` runs (after a garbage collection)."""
    gc.collect()
    c0 = time.process_time()
    await fn()
    return time.process_time() - c0


def cpu_of_sync(fn: Callable[[], Any], inner: int) -> float:
    """CPU seconds of one call of ``fn`` (``inner`` calls in a row, after a garbage collection)."""
    gc.collect()
    c0 = time.process_time()
    for _ in range(inner):
        fn()
    return (time.process_time() - c0) / inner


def inner_count(fn: Callable[[], Any], target_s: float = 0.005) -> int:
    """How many calls of ``fn`` take about ``target_s`` of CPU (process_time ticks are coarse)."""
    c0 = time.process_time()
    fn()
    once = max(time.process_time() - c0, 1e-6)
    return max(1, min(10_000, math.ceil(target_s / once)))


def sample_result(tokens: int, itl_ms: float, seed: int = 0) -> InferResult:
    """An InferResult as the worker returns it for a ``tokens``-token job (ITLs around ``itl_ms``)."""
    rng = random.Random(seed)
    itl = [round(max(rng.gauss(itl_ms, itl_ms / 10), 0.0) / 1000, 6) for _ in range(max(tokens - 1, 0))]
    t0 = now_ns()
    text = " ".join(f"word{i % 97}" for i in range(min(tokens, 100)))[:500]
    return InferResult(
        engine="sim (llmconsole-sim 0.1)",
        model="llmconsole-sim",
        node="node-1",
        requested_input_tokens=1000,
        requested_output_tokens=tokens,
        prompt_tokens=1000,
        completion_tokens=tokens,
        cached_tokens=512,
        prefix_tokens=512,
        finish_reason="length",
        ttft_s=0.05,
        decode_s=sum(itl),
        engine_time_s=0.05 + sum(itl),
        itl_s=itl,
        text_head=text,
        gpu=GpuJobStats(
            available=True,
            gpu_count=1,
            samples=10,
            util_mean_pct=87.5,
            vram_peak_bytes=120 * 2**30,
            vram_total_bytes=140 * 2**30,
            power_mean_w=412.0,
            energy_j=1234.5,
            energy_per_output_token_j=0.3,
        ),
        t_worker_received=t0,
        t_engine_start=t0 + 1000,
        t_first_token=t0 + 50_000_000,
        t_engine_end=t0 + 60_000_000,
    )


class CountingBackend(FakeGpuBackend):
    """A :class:`FakeGpuBackend` that sets an event once it has taken ``target`` samples.

    The event is set from the sampling thread (``asyncio.to_thread``) through the loop, so the
    job window closes right after its last frame without a polling loop of its own.
    """

    def __init__(self, gpus: int) -> None:
        super().__init__([FakeGpu(uuid=f"GPU-fake-{i}") for i in range(gpus)])
        self.target = 0
        self.done: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def arm(self, target: int) -> asyncio.Event:
        """Count from zero; the returned event is set at the ``target``-th sample."""
        self.calls, self.target = 0, target
        self.loop, self.done = asyncio.get_running_loop(), asyncio.Event()
        return self.done

    def sample(self) -> list[GpuSample]:
        """The fake reading; the event set once ``target`` readings were taken."""
        out = super().sample()
        if self.calls == self.target and self.loop is not None and self.done is not None:
            self.loop.call_soon_threadsafe(self.done.set)
        return out


async def sampler_job(backend: CountingBackend, frames: int, tokens: int, interval_s: float) -> int:
    """One job window of ``frames`` hub frames (plus the opening and closing ones); returns the frames."""
    done = backend.arm(frames + 1)
    sampler = JobGpuSampler(backend, interval_s)
    async with sampler:
        if frames:
            await done.wait()
    sampler.stats(tokens)
    return len(sampler.frames)


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x``: (a, b); with one point, (0, y/x)."""
    if len(xs) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def run_on(loop: str, coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on ``"uvloop"`` (the services' loop under uvicorn, where installed) or ``"asyncio"``."""
    if loop == "uvloop":
        runtime.run(coro)  # the services' own runner
    else:
        asyncio.run(coro)


async def worker_stages(
    base_url: str,
    sizes: list[int],
    reps: int,
    cpu: dict[str, dict[int, float]],
    frames_by_size: dict[int, int],
    *,
    itl_ms: float,
    interval_s: float,
    gpus: int,
    sampler_pace_s: float,
    say: Callable[[str], None],
) -> None:
    """The inference worker's per-job work: the engine stream and the GPU sampler, into ``cpu``."""
    engine = EngineClient(base_url, timeout_s=120)
    try:
        for n in sizes:
            for stage, keep in (
                ("engine stream", RESULT_TEXT_HEAD_MAX),
                ("engine stream, every chunk parsed", None),
            ):
                # Warm-up: the connection, the model id, first-call paths.
                for _ in range(2):
                    await engine.stream_completion(PROMPT, n, exact=True, text_chars=keep)
                say(f"{n} tokens: {stage}")
                runs: list[float] = []
                for _ in range(reps):
                    res_box: list[Any] = []

                    async def one() -> None:
                        res_box.append(await engine.stream_completion(PROMPT, n, exact=True, text_chars=keep))  # noqa: B023

                    runs.append(await cpu_of(one))
                    if res_box[0].completion_tokens != n or res_box[0].chunks != n:
                        raise RuntimeError(
                            f"asked {n} tokens, got {res_box[0].completion_tokens} in {res_box[0].chunks} chunks"
                        )
                cpu[stage][n] = statistics.median(runs)

            say(f"{n} tokens: gpu sampler")
            frames = round(n * itl_ms / 1000 / interval_s)
            backend = CountingBackend(gpus)
            runs = []
            for _ in range(reps):
                got: list[int] = []

                async def window() -> None:
                    got.append(await sampler_job(backend, frames, n, sampler_pace_s))  # noqa: B023

                runs.append(await cpu_of(window))
                frames_by_size[n] = got[0]
            cpu["gpu sampler"][n] = statistics.median(runs)
    finally:
        await engine.aclose()


async def bench_stages(
    base_url: str, sizes: list[int], reps: int, cpu: dict[str, dict[int, float]], say: Callable[[str], None]
) -> None:
    """The bench client's direct path (:meth:`bench.paths.DirectPath.send`), into ``cpu``."""
    engine = EngineClient(base_url, timeout_s=120)
    try:
        direct = DirectPath(engine, run_id="token-scaling")
        clock = StepClock()
        for n in sizes:
            item = WorkItem(index=0, output_tokens=n, prefix_share=0.0, prompt=PROMPT, seeds={"direct": 0})
            await direct.prepare([item])
            for _ in range(2):
                await direct.send(item, RequestRecord(index=0, path="direct"), clock, clock.now() + 120)
            say(f"{n} tokens: bench direct")
            runs: list[float] = []
            for _ in range(reps):
                rec = RequestRecord(index=0, path="direct")

                async def send() -> None:
                    await direct.send(item, rec, clock, clock.now() + 120)  # noqa: B023

                runs.append(await cpu_of(send))
                if not rec.success:
                    raise RuntimeError(f"direct path failed at {n} tokens: {rec.error}")
            cpu["bench direct"][n] = statistics.median(runs)
    finally:
        await engine.aclose()


def result_stages(
    sizes: list[int],
    reps: int,
    cpu: dict[str, dict[int, float]],
    sizes_b: dict[str, dict[int, int]],
    itl_ms: float,
    say: Callable[[str], None],
) -> None:
    """The result's serialisation: worker body, proxy write, reader's decode, into ``cpu`` and ``sizes_b``."""
    for n in sizes:
        say(f"{n} tokens: result serialisation")
        result = sample_result(n, itl_ms)
        body = result.model_dump_json()
        field = encode_result(result)
        ts = {
            "t_worker_received": result.t_worker_received,
            "t_engine_start": result.t_engine_start,
            "t_first_token": result.t_first_token,
            "t_engine_end": result.t_engine_end,
        }
        if len(decode_result(field, ts).itl_s) != len(result.itl_s):
            raise RuntimeError("decode_result lost ITLs")
        sizes_b["worker_body"][n] = len(body.encode())
        sizes_b["result_field"][n] = len(field.encode())
        calls: dict[str, Callable[[], Any]] = {
            "worker result json": result.model_dump_json,
            "proxy result write": lambda: encode_result(InferResult.model_validate_json(body)),  # noqa: B023
            "decode result": lambda: decode_result(field, ts),  # noqa: B023
        }
        for stage, fn in calls.items():
            inner = inner_count(fn)
            cpu[stage][n] = statistics.median(cpu_of_sync(fn, inner) for _ in range(reps))


def measure(
    base_url: str,
    sizes: list[int],
    reps: int = 10,
    *,
    itl_ms: float = 42.0,
    interval_s: float = 0.1,
    gpus: int = 1,
    sampler_pace_s: float = 0.001,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every stage at every size against the simulator at ``base_url``: the figures as a dict.

    Each stage runs on its process's event loop: the worker's on uvloop (uvicorn's choice), the
    bench client's on asyncio's (``asyncio.run``). ``result["stages"][stage]`` holds ``cpu_us``
    (median per job, by size), ``per_token_us`` (the median divided by the size), ``fixed_us``
    and ``slope_us_per_token`` (the fitted line); ``result["bytes"]`` the worker's body and the
    stored field, by size.
    """
    say = progress or (lambda _msg: None)
    cpu: dict[str, dict[int, float]] = {s: {} for s in STAGES}
    sizes_b: dict[str, dict[int, int]] = {"worker_body": {}, "result_field": {}}
    frames_by_size: dict[int, int] = {}
    run_on(
        "uvloop",
        worker_stages(
            base_url,
            sizes,
            reps,
            cpu,
            frames_by_size,
            itl_ms=itl_ms,
            interval_s=interval_s,
            gpus=gpus,
            sampler_pace_s=sampler_pace_s,
            say=say,
        ),
    )
    run_on("asyncio", bench_stages(base_url, sizes, reps, cpu, say))
    result_stages(sizes, reps, cpu, sizes_b, itl_ms, say)

    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        ys = [cpu[stage][n] * 1e6 for n in sizes]
        a, b = fit_line(sizes, ys)
        stages[stage] = {
            "cpu_us": {str(n): round(y, 1) for n, y in zip(sizes, ys, strict=True)},
            "per_token_us": {str(n): round(y / n, 3) for n, y in zip(sizes, ys, strict=True)},
            "fixed_us": round(a, 1),
            "slope_us_per_token": round(b, 3),
        }
    fr = [frames_by_size[n] for n in sizes]
    sampler_us = [cpu["gpu sampler"][n] * 1e6 for n in sizes]
    per_frame = fit_line(fr, sampler_us)[1] if len(set(fr)) > 1 else sampler_us[-1] / max(fr[-1], 1)
    return {
        "sizes": sizes,
        "reps": reps,
        "itl_ms": itl_ms,
        "interval_s": interval_s,
        "gpus": gpus,
        "sampler_pace_s": sampler_pace_s,
        "sampler_frames": {str(n): f for n, f in frames_by_size.items()},
        "sampler_us_per_frame": round(per_frame, 1),
        "stages": stages,
        "bytes": {k: {str(n): v for n, v in d.items()} for k, d in sizes_b.items()},
    }


def render(r: dict[str, Any]) -> str:
    """The figures as two plain-text tables."""
    sizes = [str(n) for n in r["sizes"]]
    w = max(len(s) for s in STAGES) + 2
    lines = [
        f"CPU of this process per job, µs (median of {r['reps']}); the line a + b·tokens fitted to them",
        f"{'stage':<{w}}"
        + "".join(f"{n + ' tok':>11}" for n in sizes)
        + f"{'a: fixed µs':>13}{'b: µs/token':>13}",
    ]
    for stage in STAGES:
        st = r["stages"][stage]
        cells = "".join(f"{st['cpu_us'][n]:>11,.0f}" for n in sizes)
        lines.append(f"{stage:<{w}}{cells}{st['fixed_us']:>13,.0f}{st['slope_us_per_token']:>13.2f}")
    lines += ["", f"{'µs per token':<{w}}" + "".join(f"{n + ' tok':>11}" for n in sizes)]
    for stage in STAGES:
        st = r["stages"][stage]
        lines.append(f"{stage:<{w}}" + "".join(f"{st['per_token_us'][n]:>11.2f}" for n in sizes))
    lines += ["", f"{'bytes':<{w}}" + "".join(f"{n + ' tok':>11}" for n in sizes)]
    for key, label in (("worker_body", "worker body (JSON)"), ("result_field", "stored result field")):
        lines.append(f"{label:<{w}}" + "".join(f"{r['bytes'][key][n]:>11,}" for n in sizes))
    frames = ", ".join(f"{n}: {r['sampler_frames'][n]}" for n in sizes)
    lines += [
        "",
        f"gpu sampler: {r['gpus']} fake GPU(s), a job of tokens × {r['itl_ms']:g} ms sampled every "
        f"{r['interval_s']:g} s (frames taken {r['sampler_pace_s']:g} s apart here); frames per job {frames}; "
        f"{r['sampler_us_per_frame']:,.0f} µs per frame",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Start the simulator, measure every stage at every size, print the tables (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="16,128,1024,4096", help="output lengths, comma-separated")
    p.add_argument("--reps", type=int, default=10, help="repetitions per stage and size (median)")
    p.add_argument("--itl-ms", type=float, default=42.0, help="ITL of the job the GPU sampler spans")
    p.add_argument(
        "--interval-s", type=float, default=0.1, help="GPU sampling interval (TELEMETRY_INTERVAL_S)"
    )
    p.add_argument("--gpus", type=int, default=1, help="fake GPUs the sampler reads")
    p.add_argument(
        "--sampler-pace-s", type=float, default=0.001, help="seconds between the sampler's frames here"
    )
    p.add_argument(
        "--sim-itl-ms",
        type=float,
        default=0.0,
        help="the simulator's ITL (0: tokens as fast as it streams; >0: one chunk per wake-up, as in a real run)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    sizes = sorted({int(x) for x in args.tokens.split(",") if x.strip()})
    if not sizes or sizes[0] < 1 or args.reps < 1:
        p.error("--tokens must be positive integers and --reps at least 1")
    with tempfile.TemporaryDirectory(prefix="llmc-tokscale-") as tmp:
        port = free_port()
        proc = start_sim(
            port, Path(tmp) / "sim.log", max_model_len=max(2048, 2 * max(sizes) + 64), itl_ms=args.sim_itl_ms
        )
        try:
            progress = None if args.json else (lambda m: print(f"  {m}", file=sys.stderr, flush=True))
            r = measure(
                f"http://127.0.0.1:{port}",
                sizes,
                args.reps,
                itl_ms=args.itl_ms,
                interval_s=args.interval_s,
                gpus=args.gpus,
                sampler_pace_s=args.sampler_pace_s,
                progress=progress,
            )
        finally:
            stop_sim(proc)
    r["sim_itl_ms"] = args.sim_itl_ms
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""The floor of the pipeline's shape: the same hops and round trips, with nothing else in them.

    ./.venv/bin/python scripts/skeleton.py                                  # concurrency 32, 100 ms jobs
    ./.venv/bin/python scripts/skeleton.py --concurrency 1 --requests 100
    ./.venv/bin/python scripts/skeleton.py --hold-spread 0.5                # job lengths ±50 %: no waves

It starts its own redis-server (AOF on, as production runs it) and three skeleton services, each a
process of its own on the libraries and server settings the real ones use (uvicorn with
httptools and the project's header bound, uvloop, redis-py with hiredis, the proxy's
HTTP client, services/stream_http.py):

- **ingestion**: ``POST /jobs`` stamps ``t_received``, parses the body, runs one Lua script that
  writes the job hash (``t_enqueued`` from Redis's clock) and its stream entry, answers 202;
- **proxy**: a blocking ``XREADGROUP``; per entry, a claim script (``t_dequeued``) returning the
  spec, a ``POST`` to the worker (``t_dispatched``), and on its answer (``t_result_received``) a
  finish script writing the stamps and the result, ``t_finished`` from Redis's clock, the ack and
  the run's done-stream entry;
- **worker**: stamps ``t_worker_received`` and ``t_engine_start``, sleeps the job's length (the
  "engine", which uses no CPU here), stamps ``t_engine_end``, answers a result of about the size
  of a 100-token job's.

This process is the closed-loop client: ``--concurrency`` submitters, each waiting for its job on
one blocking read of the done stream. With one job length for all, jobs end together, in waves,
as a fixed-length benchmark's do. It prints the server-side overhead per job exactly as the bench
defines it, ``(t_finished − t_received) − (t_engine_end − t_engine_start)``, its hops, and the CPU
its processes used per job. What the real pipeline does beyond this (validation, idempotency,
routing, leases, retries, the engine's stream, telemetry) is what its figures add to these.
Compare the two as ratios measured on one machine, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from hops import job_hops  # noqa: E402
from ingest_load import free_port, serve_like_ingestion, wait_port  # noqa: E402
from wave_cpu import sched_ns  # noqa: E402

from bench.metrics import stats_ms  # noqa: E402
from services.contracts import TIMESTAMPS, end_to_end_s, engine_time_s  # noqa: E402

STREAM = "sk:jobs"
DONE = "sk:done"
GROUP = "proxies"

_NOW = "local t = redis.call('TIME') local now = t[1] .. string.format('%06d', t[2]) .. '000' "
SUBMIT = (
    _NOW + "redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'state', 'queued', 'spec', ARGV[3],"
    " 't_received', ARGV[2], 't_enqueued', now) "
    "redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1]) return now"
)
CLAIM = "redis.call('HSET', KEYS[1], 'state', 'running', 't_dequeued', ARGV[1]) return redis.call('HGET', KEYS[1], 'spec')"
FINISH = (
    _NOW
    + "redis.call('HSET', KEYS[1], 'state', 'succeeded', 't_dispatched', ARGV[3], 't_worker_received', ARGV[4],"
    " 't_engine_start', ARGV[5], 't_first_token', ARGV[6], 't_engine_end', ARGV[7], 't_result_received', ARGV[8],"
    " 'result', ARGV[9], 't_finished', now) "
    "redis.call('XACK', KEYS[2], ARGV[2], ARGV[1]) "
    "redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[10]) return now"
)


def _redis(port: int) -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis(port=port, decode_responses=True)


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def serve_ingestion(port: int, redis_port: int) -> None:
    """The skeleton ingestion: one script per submit, 202 with the job id."""
    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                if msg["type"] == "lifespan.startup":
                    r = _redis(redis_port)
                    state["submit"] = r.register_script(SUBMIT)
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        t_received = time.time_ns()
        body = await _read_body(receive)
        spec = json.loads(body)
        job_id = uuid.uuid4().hex
        await state["submit"](keys=[f"sk:job:{job_id}", STREAM], args=[job_id, t_received, json.dumps(spec)])
        await _answer(send, 202, json.dumps({"job_id": job_id, "state": "queued"}).encode())

    serve_like_ingestion(app, port)


def serve_worker(port: int) -> None:
    """The skeleton inference worker: holds each job its length, answers a result."""
    filler = {
        "text": "x" * 80,
        "itl_ms": [42.0 + i % 7 for i in range(100)],
        "usage": {"prompt_tokens": 1000},
    }

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        t_worker_received = time.time_ns()
        spec = json.loads(await _read_body(receive))
        t_engine_start = time.time_ns()
        await asyncio.sleep(spec["hold_ms"] / 1000)
        t_engine_end = time.time_ns()
        out = {
            "t_worker_received": t_worker_received,
            "t_engine_start": t_engine_start,
            "t_first_token": t_engine_start,
            "t_engine_end": t_engine_end,
            "result": filler,
        }
        await _answer(send, 200, json.dumps(out).encode())

    serve_like_ingestion(app, port)


async def _proxy(redis_port: int, worker_url: str) -> None:
    import redis.asyncio as aioredis

    from services import stream_http

    r = _redis(redis_port)
    blocking = _redis(redis_port)
    claim, finish = r.register_script(CLAIM), r.register_script(FINISH)
    try:
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except aioredis.ResponseError:
        pass  # it exists
    # The real proxy's client for this hop (services/stream_http.py): keep-alive, the answer whole.
    pool = stream_http.StreamPool(worker_url)
    tasks: set[asyncio.Task[None]] = set()

    async def process(entry_id: str, job_id: str) -> None:
        key = f"sk:job:{job_id}"
        spec = await claim(keys=[key], args=[time.time_ns()])
        t_dispatched = time.time_ns()
        _status, body = await stream_http.post_read(
            pool, "", spec.encode() if isinstance(spec, str) else spec
        )
        t_result_received = time.time_ns()
        out = json.loads(body)
        args = [entry_id, GROUP, t_dispatched]
        args += [out[k] for k in ("t_worker_received", "t_engine_start", "t_first_token", "t_engine_end")]
        args += [t_result_received, json.dumps(out["result"]), job_id]
        await finish(keys=[key, STREAM, DONE], args=args)

    from services import runtime

    runtime.freeze_startup_heap()
    while True:
        got = await blocking.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=64, block=1000)
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                task = asyncio.create_task(process(entry_id, fields["job_id"]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


def serve_proxy(redis_port: int, worker_url: str) -> None:
    """The skeleton proxy worker on uvloop, as the real one."""
    from services import runtime

    runtime.run(_proxy(redis_port, worker_url))


async def _client(
    args: argparse.Namespace, ingest_url: str, redis_port: int, pids: dict[str, int]
) -> dict[str, Any]:
    """The closed loop: submit, wait on the done stream, submit again; then read the stamps."""
    import aiohttp

    r = _redis(redis_port)
    blocking = _redis(redis_port)
    waiting: dict[str, asyncio.Future[None]] = {}
    arrived: set[str] = set()

    async def follow() -> None:
        last = "0"
        while True:
            got = await blocking.xread({DONE: last}, count=256, block=1000)
            for _stream, entries in got or []:
                for entry_id, fields in entries:
                    last = entry_id
                    fut = waiting.pop(fields["job_id"], None)
                    if fut is None:
                        arrived.add(fields["job_id"])
                    elif not fut.done():
                        fut.set_result(None)

    rng = random.Random(args.seed)
    total = args.warmup + args.requests
    issued = 0
    measured: list[str] = []
    cpu_before: dict[str, float] = {}
    loop = asyncio.get_running_loop()

    async def submitter(session: aiohttp.ClientSession) -> None:
        nonlocal issued
        while issued < total:
            n = issued
            issued += 1
            if n == args.warmup:  # the measured part starts with this job
                cpu_before.update(_cpu(pids))
            hold = args.hold_ms * (1 + rng.uniform(-args.hold_spread, args.hold_spread))
            async with session.post(ingest_url, json={"hold_ms": hold}) as resp:
                job_id = (await resp.json())["job_id"]
            if job_id in arrived:
                arrived.discard(job_id)
            else:
                fut = loop.create_future()
                waiting[job_id] = fut
                await fut
            if n >= args.warmup:
                measured.append(job_id)

    follower = asyncio.create_task(follow())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(submitter(session) for _ in range(args.concurrency)))
    cpu_after = _cpu(pids)
    follower.cancel()
    async with r.pipeline(transaction=False) as p:
        for job_id in measured:
            p.hgetall(f"sk:job:{job_id}")
        hashes = await p.execute()
    await r.aclose()
    await blocking.aclose()
    return {"hashes": hashes, "cpu": {k: cpu_after[k] - cpu_before[k] for k in cpu_after}}


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds each process's threads have run so far (schedstat: nanoseconds, not ticks)."""
    return {name: sched_ns(pid)[0] / 1e9 for name, pid in pids.items()}


def summarise(hashes: list[dict[str, str]], cpu: dict[str, float]) -> dict[str, Any]:
    """Overhead per job (the bench's definition), hop medians and CPU per job from the run's stamps."""
    overhead: list[float] = []
    hops: dict[str, list[float]] = {}
    for h in hashes:
        ts: dict[str, int | None] = {name: int(h[name]) for name in TIMESTAMPS}
        e2e, engine = end_to_end_s(ts), engine_time_s(ts)
        assert e2e is not None and engine is not None  # every stamp was read just above
        overhead.append(e2e - engine)
        for name, us in (job_hops(h) or {}).items():
            hops.setdefault(name, []).append(us)
    n = len(hashes)
    return {
        "jobs": n,
        # The bench's own statistics (numpy's linear percentiles), under its key names.
        "overhead_ms": {
            k.split("_")[0]: v for k, v in stats_ms(overhead, (50, 90, 99), "server_overhead").items()
        },
        "hops_us_p50": {name: statistics.median(v) for name, v in hops.items()},
        "cpu_ms_per_job": {name: 1000 * s / n for name, s in cpu.items()},
        # As the bench counts "pipeline CPU": its own processes, not Redis (nor the engine).
        "cpu_ms_per_job_pipeline": 1000 * sum(v for k, v in cpu.items() if k != "redis") / n,
    }


def main() -> int:
    """Start the skeleton, run the closed loop, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32, help="jobs in flight (default 32)")
    ap.add_argument("--requests", type=int, default=400, help="measured jobs (default 400)")
    ap.add_argument("--warmup", type=int, default=32, help="jobs before the measured ones (default 32)")
    ap.add_argument(
        "--hold-ms", type=float, default=100.0, help="each job's length in the worker (default 100)"
    )
    ap.add_argument(
        "--hold-spread", type=float, default=0.0, help="lengths vary by ± this fraction (default 0)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (1 <= args.concurrency <= 1024 and 1 <= args.requests <= 100_000 and 0 <= args.warmup <= 100_000):
        ap.error("--concurrency 1..1024, --requests 1..100000, --warmup 0..100000")
    if not (0 <= args.hold_spread < 1 and 0 <= args.hold_ms <= 60_000):
        ap.error("--hold-spread in [0, 1), --hold-ms in [0, 60000]")
    if args.serve:
        role, *rest = args.serve
        if role == "ingestion":
            serve_ingestion(int(rest[0]), int(rest[1]))
        elif role == "worker":
            serve_worker(int(rest[0]))
        else:
            serve_proxy(int(rest[0]), rest[1])
        return 0
    redis_exe = shutil.which("redis-server") or "/usr/sbin/redis-server"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="llmc-skeleton-") as tmp:
        rport, iport, wport = free_port(), free_port(), free_port()
        me = [sys.executable, __file__, "--serve"]

        def spawn(name: str, argv: list[str]) -> None:
            procs[name] = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)

        try:
            redis_args = ["--bind", "127.0.0.1", "--dir", tmp, "--save", "", "--appendonly", "yes"]
            spawn("redis", [redis_exe, "--port", str(rport), *redis_args, "--appendfsync", "everysec"])
            wait_port(rport)
            spawn("worker", [*me, "worker", str(wport)])
            spawn("ingestion", [*me, "ingestion", str(iport), str(rport)])
            wait_port(wport)
            spawn("proxy", [*me, "proxy", str(rport), f"http://127.0.0.1:{wport}/infer"])
            wait_port(iport)
            for name, p in procs.items():
                if p.poll() is not None:
                    print(f"the skeleton's {name} exited ({p.returncode})", file=sys.stderr)
                    return 1
            got = asyncio.run(
                _client(args, f"http://127.0.0.1:{iport}/jobs", rport, {k: p.pid for k, p in procs.items()})
            )
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    out = summarise(got["hashes"], got["cpu"])
    out["settings"] = {
        k: getattr(args, k) for k in ("concurrency", "requests", "warmup", "hold_ms", "hold_spread")
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    o = out["overhead_ms"]
    print(
        f"skeleton: {out['jobs']} jobs at concurrency {args.concurrency}, {args.hold_ms:g} ms each (± {args.hold_spread:g})"
    )
    print(f"server-side overhead p50 / p90 / p99: {o['p50']:.2f} / {o['p90']:.2f} / {o['p99']:.2f} ms")
    print(f"{'hop':40s} {'p50 µs':>9s}")
    for name, us in out["hops_us_p50"].items():
        print(f"{name:40s} {us:9.0f}")
    cpu = "  ".join(f"{k} {v:.2f}" for k, v in out["cpu_ms_per_job"].items())
    print(f"CPU per job: {out['cpu_ms_per_job_pipeline']:.2f} ms without Redis, as the bench counts ({cpu})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How many jobs per second one Redis holds: the pipeline's real Redis calls, AOF ``everysec``.

Starts a private ``redis-server`` with llmconsole's own config (``services.lifecycle.redis_launch``:
AOF on, ``appendfsync everysec``, noeviction, listpack job hashes) on a free loopback port,
then drives the Redis side of every job with the real code (``services.queue.JobQueue``):

* ``submit``: ingestion's Lua (job hash + stream entry + counters + event), from many clients;
* ``cycle``: the whole life of a job as the services make it, per job: submit, XREADGROUP (in
  batches, as a proxy worker reads), START, the fenced FINISH with a compact result of 100
  tokens, and the client's final HGETALL.

It reports wall-clock jobs/s and the Redis server's own CPU per job (from /proc): Redis runs
commands on one thread, so ``1 / cpu_per_job`` is the most jobs/s one Redis can hold on a core
of this machine however many clients drive it. The clients share the machine with Redis here,
so the wall-clock figure is a floor and the CPU figure the better guide. Nothing of the stack
needs to run; nothing outside the temporary folder is touched.

    ./.venv/bin/python scripts/redis_capacity.py --jobs 20000 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout: the repository root on the path (``python scripts/redis_capacity.py``).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.contracts import InferResult, JobSpec, JobState, Keys, encode_result, new_id, now_ns
from services.lifecycle.redis_launch import redis_config
from services.queue import JobQueue, redis_client
from services.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _result(job_id: str, tokens: int) -> str:
    t = now_ns()
    return encode_result(
        InferResult(
            engine="sim (llmconsole simulator 0.1)",
            model="sim-model",
            node="node-1",
            requested_input_tokens=1000,
            requested_output_tokens=tokens,
            prompt_tokens=1000,
            completion_tokens=tokens,
            cached_tokens=496,
            prefix_tokens=500,
            finish_reason="length",
            ttft_s=0.05,
            decode_s=1.0,
            engine_time_s=1.05,
            itl_s=[0.01] * (tokens - 1),
            text_head="x" * 80,
            t_worker_received=t,
            t_engine_start=t,
            t_first_token=t,
            t_engine_end=t,
        )
    )


async def _submit_all(q: JobQueue, n: int, clients: int, run_id: str) -> list[str]:
    ids: list[str] = []
    todo = iter(range(n))

    async def client() -> None:
        for _ in todo:
            job_id = new_id("j")
            spec = JobSpec(
                job_id=job_id, input_tokens=1000, output_tokens=100, prefix_share=0.5, run_id=run_id, seed=1
            )
            out = await q.submit(spec, now_ns(), max_active=10_000_000)
            assert out.status == "ok", out
            ids.append(job_id)

    await asyncio.gather(*(client() for _ in range(clients)))
    return ids


async def _cycle_all(q: JobQueue, n: int, clients: int, run_id: str, result: str) -> None:
    """Submitters and consumers at once: every job submitted, read, started, finished, read back."""
    await q.ensure_group()
    done = 0
    finished = asyncio.Event()

    async def consumer(name: str) -> None:
        nonlocal done
        while done < n:
            entries = await q.read(name, count=32, block_ms=100)
            for entry_id, job_id in entries:
                d = await q.start(entry_id, job_id, name)
                assert d is not None
                await q.finish(
                    d, JobState.SUCCEEDED, {"result": result, "t_dispatched": now_ns()}, ttl_s=3600
                )
                await q.get_job(job_id)  # the client's final read of its job
                done += 1
        finished.set()

    consumers = [asyncio.create_task(consumer(f"c{i}")) for i in range(max(clients // 8, 2))]
    await _submit_all(q, n, clients, run_id)
    await finished.wait()
    for c in consumers:
        c.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)


async def measure(args: argparse.Namespace, s: Settings, pid: int) -> None:
    """Run both phases against the Redis at ``s`` (server process ``pid``) and print the figures."""
    r = redis_client(s, blocking=True)
    result = _result("x", args.output_tokens)
    try:
        for phase in ("submit", "cycle"):
            q = JobQueue(r, Keys(f"cap{phase}:"))
            cpu0, t0 = _cpu_s(pid), time.perf_counter()
            if phase == "submit":
                await _submit_all(q, args.jobs, args.clients, "run-cap")
            else:
                await _cycle_all(q, args.jobs, args.clients, "run-cap", result)
            wall, cpu = time.perf_counter() - t0, _cpu_s(pid) - cpu0
            info = await r.info("persistence")
            print(
                f"{phase:>6}: {args.jobs:,} jobs in {wall:.2f} s = {args.jobs / wall:,.0f} jobs/s wall-clock; "
                f"redis-server CPU {cpu / args.jobs * 1e6:.0f} µs/job -> at most "
                f"{args.jobs / cpu if cpu else float('inf'):,.0f} jobs/s on one core "
                f"(aof_enabled={info.get('aof_enabled')}, AOF {info.get('aof_current_size', 0) / 2**20:.1f} MiB)"
            )
    finally:
        await r.aclose()


def main() -> int:
    """Start a private Redis, measure, stop it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per phase (default 20000)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--output-tokens", type=int, default=100, help="tokens in each stored result (ITLs)")
    p.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="llmc-redis-cap-") as tmp:
        s = Settings(  # type: ignore[call-arg]
            _env_file=None,
            redis_port=_free_port(),
            var_dir=tmp,
            redis_appendfsync=args.appendfsync,
            redis_maxmemory_mb=4096,
        )
        conf = Path(tmp) / "redis.conf"
        conf.write_text(redis_config(s, Path(tmp)))
        proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL)
        try:
            for _ in range(100):
                with socket.socket() as c:
                    if c.connect_ex(("127.0.0.1", s.redis_port)) == 0:
                        break
                time.sleep(0.05)
            print(
                f"redis-server {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]}"
                f" · appendonly yes · appendfsync {args.appendfsync} · {os.cpu_count()} CPUs on this machine"
            )
            asyncio.run(measure(args, s, proc.pid))
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Which process spends the CPU when a wave of jobs ends at once, and how much: one bench run.

    ./.venv/bin/python scripts/wave_cpu.py --out runs/wave -- \\
        --concurrency 32 --input-tokens 1000 --output-tokens 100 --requests 400 --warmup 32
    ./.venv/bin/python scripts/wave_cpu.py --cpus 0 --out runs/wave1 -- ...   # the same on one core

It runs ``llmconsole bench --path pipeline --no-plots`` with the arguments after ``--`` against
the stack of this checkout (``var/llmconsole.env``), and meanwhile samples every millisecond the
CPU time each process has used (``/proc/PID/task/*/schedstat``, nanoseconds): the stack's
programs (from supervisord, or ``--pid name=PID``) and the bench client itself. Afterwards it
reads each job's ``t_engine_end`` from Redis and groups the ends into waves (ends less than
``--gap-ms`` apart). A wave's *burst* is the ``--window-ms`` after its first end: the wave's
results go back, its clients send the next jobs, and those start.

It prints, per process, the CPU milliseconds per job spent inside bursts and outside them, the
milliseconds per job its threads waited runnable for a CPU in the bursts (schedstat's run-queue
time: contention, as against work), and how many cores were busy in each 10 ms of a burst (per process and together). With every job
the same length, a closed loop ends its jobs in waves, and the server-side overhead of the
bench's summary (printed too) grows with the wave. ``--cpus`` pins the stack and the bench to
those CPUs for the run (each thread's own mask is put back afterwards), so that runs on fewer
cores can be set beside a run on all of them.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.records import RequestRecord  # noqa: E402
from bench.report import load_run  # noqa: E402
from services.contracts import Keys  # noqa: E402
from services.lifecycle.supervisor_client import supervisor_proxy  # noqa: E402
from services.settings import get_settings  # noqa: E402

#: The bench client's name in the tables.
BENCH = "bench"
#: The burst starts this long before a wave's first end (its final chunks are on their way).
LEAD_NS = 2_000_000


def sched_ns(pid: int) -> tuple[int, int]:
    """Nanoseconds all threads of ``pid`` have run so far, and waited runnable for a CPU (on a
    run queue); (0, 0) once it is gone.

    Threads that ended before a read drop out of the sums: the services' threads live as long as
    their process, so a window's difference is exact for them.
    """
    run = wait = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    fields = f.read().split()
                run += int(fields[0])
                wait += int(fields[1])
    return run, wait


def stack_pids(args_pids: list[str]) -> dict[str, int]:
    """The processes to follow: ``--pid name=PID`` pairs, else supervisord's running programs."""
    if args_pids:
        out = {}
        for pair in args_pids:
            name, _, pid = pair.partition("=")
            if not name or not pid.isdigit():
                raise SystemExit(f"--pid wants name=PID, got {pair!r}")
            out[name] = int(pid)
        return out
    try:
        infos = supervisor_proxy(get_settings().supervisor_socket, 3.0).supervisor.getAllProcessInfo()
    except OSError as e:
        raise SystemExit(
            f"supervisord does not answer ({e}): start the stack, or name the processes with --pid"
        ) from e
    return {i["name"]: int(i["pid"]) for i in infos if i.get("pid")}


@contextlib.contextmanager
def pinned(pids: list[int], cpus: set[int] | None) -> Iterator[None]:
    """Every thread of ``pids`` on ``cpus`` while inside; each thread's own mask put back after."""
    if cpus is None:
        yield
        return
    saved: dict[int, set[int]] = {}
    try:
        for pid in pids:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    saved[int(tid)] = os.sched_getaffinity(int(tid))
                    os.sched_setaffinity(int(tid), cpus)
        yield
    finally:
        for tid, mask in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


class Sampler(threading.Thread):
    """Reads every process's CPU time every ``interval_s`` until stopped."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.pids = dict(pids)
        self.interval_s = interval_s
        self.t: list[int] = []
        self.cpu: dict[str, list[int]] = {name: [] for name in pids}
        self.wait: dict[str, list[int]] = {name: [] for name in pids}  # runnable, waiting for a CPU
        self.first: dict[str, int] = dict.fromkeys(pids, 0)  # a process's first sample
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def add(self, name: str, pid: int) -> None:
        """Follow one more process from now on (earlier samples read 0 for it)."""
        with self._lock:
            self.pids[name] = pid
            self.first[name] = len(self.t)
            self.cpu[name] = [0] * len(self.t)
            self.wait[name] = [0] * len(self.t)

    def run(self) -> None:
        """Sample until :meth:`stop`."""
        while not self._stop_event.is_set():
            with self._lock:
                self.t.append(time.time_ns())
                for name, pid in self.pids.items():
                    run, wait = sched_ns(pid)
                    self.cpu[name].append(run)
                    self.wait[name].append(wait)
            time.sleep(self.interval_s)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop_event.set()
        self.join()

    def between(self, name: str, a: int, b: int, *, waited: bool = False) -> float:
        """CPU milliseconds ``name`` used from time ``a`` to ``b`` (ns, clipped to the samples);
        with ``waited``, the milliseconds its threads waited runnable for a CPU instead."""
        last = len(self.t) - 1
        i = min(max(bisect.bisect_left(self.t, a), self.first[name]), last)
        j = min(max(bisect.bisect_left(self.t, b), self.first[name]), last)
        series = (self.wait if waited else self.cpu)[name]
        return max(series[j] - series[i], 0) / 1e6


def waves(ends: list[int], gap_ns: int) -> list[list[int]]:
    """Sorted engine ends grouped: a new wave starts after a gap of more than ``gap_ns``."""
    out: list[list[int]] = []
    for e in sorted(ends):
        if out and e - out[-1][-1] <= gap_ns:
            out[-1].append(e)
        else:
            out.append([e])
    return out


def engine_ends(records: list[RequestRecord]) -> tuple[list[int], tuple[int, int]]:
    """``t_engine_end`` of every successful pipeline job of a run still in Redis, and the
    measured run's span (its first send to its last answer, ns; the warm-up is not in it)."""
    s = get_settings()
    r = redis.Redis.from_url(s.redis_url, decode_responses=True)
    keys = Keys(s.redis_prefix)
    jobs = [x for x in records if x.path == "pipeline" and x.success and x.job_id]
    if not jobs:
        return [], (0, 0)
    first = min(x.start_ns for x in jobs)
    last = max(x.start_ns + int((x.latency_s or 0.0) * 1e9) for x in jobs)
    with r.pipeline(transaction=False) as p:
        for x in jobs:
            p.hget(keys.job(x.job_id), "t_engine_end")  # type: ignore[arg-type]
        got = p.execute()
    return [int(v) for v in got if v], (first, last)


def report(
    sampler: Sampler,
    ends: list[int],
    span: tuple[int, int],
    gap_ms: float,
    window_ms: float,
    min_wave: int = 1,
) -> dict[str, object]:
    """Per process: CPU ms per job inside the waves' bursts and outside them, within ``span``."""
    ws = waves(ends, int(gap_ms * 1e6))
    jobs = len(ends)
    windows = [(w[0] - LEAD_NS, w[0] + int(window_ms * 1e6)) for w in ws]
    # Bursts may overlap when waves come closer than the window: merge them, count each ns once.
    merged: list[tuple[int, int]] = []
    for a, b in windows:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    t0, t1 = span
    merged = [(max(a, t0), min(b, t1)) for a, b in merged if b > t0 and a < t1]
    rows = {}
    for name in sampler.cpu:
        total = sampler.between(name, t0, t1)
        burst = sum(sampler.between(name, a, b) for a, b in merged)
        waited = sum(sampler.between(name, a, b, waited=True) for a, b in merged)
        rows[name] = {
            "burst_ms_per_job": burst / jobs if jobs else 0.0,
            "burst_wait_ms_per_job": waited / jobs if jobs else 0.0,
            "rest_ms_per_job": (total - burst) / jobs if jobs else 0.0,
            "burst_share": burst / total if total else 0.0,
        }
    # Cores busy in 10 ms steps from each wave's first end (mean over the waves of at least
    # ``min_wave`` jobs whose whole window lies in the span): where in the burst the CPU is spent.
    step = 10_000_000
    inside = [
        w[0] for w in ws if len(w) >= min_wave and w[0] - LEAD_NS >= t0 and w[0] + int(window_ms * 1e6) <= t1
    ]
    profile = []
    by_process: dict[str, list[float]] = {name: [] for name in sampler.cpu}
    for k in range(int(window_ms * 1e6) // step):
        all_busy = 0.0
        for name in sampler.cpu:
            cpu = sum(sampler.between(name, w0 + k * step, w0 + (k + 1) * step) for w0 in inside)
            busy = cpu / (len(inside) * step / 1e6) if inside else 0.0
            by_process[name].append(busy)
            all_busy += busy
        profile.append(all_busy)
    burst_wall_ms = sum(b - a for a, b in merged) / 1e6
    burst_cpu_ms = sum(r["burst_ms_per_job"] for r in rows.values()) * jobs
    sizes = sorted(len(w) for w in ws)
    return {
        "jobs": jobs,
        "waves": len(ws),
        "wave_size_median": sizes[len(sizes) // 2] if sizes else 0,
        "wave_size_max": sizes[-1] if sizes else 0,
        "window_ms": window_ms,
        "gap_ms": gap_ms,
        "burst_wall_ms": burst_wall_ms,
        "burst_cores_busy": burst_cpu_ms / burst_wall_ms if burst_wall_ms else 0.0,
        "profile_waves": len(inside),
        "profile_min_wave": min_wave,
        "cores_busy_by_10ms": profile,
        "cores_busy_by_10ms_per_process": by_process,
        "processes": rows,
    }


def main() -> int:
    """Run the bench while sampling, then print the burst table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the bench's output folder")
    ap.add_argument("--cpus", help="pin the stack and the bench to these CPUs for the run (e.g. 0 or 0,1)")
    ap.add_argument("--pid", action="append", default=[], help="name=PID of a process to follow (repeat)")
    ap.add_argument("--gap-ms", type=float, default=50.0, help="ends further apart start a new wave")
    ap.add_argument(
        "--window-ms", type=float, default=120.0, help="a burst: this long after a wave's first end"
    )
    ap.add_argument(
        "--min-wave", type=int, default=1, help="the 10 ms profile: waves of this many jobs or more"
    )
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: llmconsole bench arguments")
    args = ap.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    pids = stack_pids(args.pid)
    if not pids:
        raise SystemExit("no running process to follow")

    cmd = [sys.executable, "-c", "from console.cli import main; main()", "bench", "--path", "pipeline"]
    cmd += ["--no-plots", "--out", str(args.out), *bench_args]
    sampler = Sampler(pids)
    sampler.start()
    with pinned(list(pids.values()), cpus):
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        bench = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=pin)
        sampler.add(BENCH, bench.pid)
        rc = bench.wait()
    sampler.stop()
    if rc != 0:
        print(f"the bench failed (exit {rc})", file=sys.stderr)
        return rc

    run = load_run(args.out)
    ends, span = engine_ends(run.records)
    if not ends:
        print("no pipeline job of the run is in Redis (expired?)", file=sys.stderr)
        return 1
    out = report(sampler, ends, span, args.gap_ms, args.window_ms, args.min_wave)
    summary = run.summary
    out["cpus"] = sorted(cpus) if cpus else sorted(os.sched_getaffinity(0))
    out["overhead_ms"] = {p: summary.get(f"p{p}_server_overhead_ms") for p in (50, 90, 99)}
    (args.out / "wave_cpu.json").write_text(json.dumps(out, indent=2) + "\n")

    procs: dict[str, dict[str, float]] = out["processes"]  # type: ignore[assignment]
    per: dict[str, list[float]] = out["cores_busy_by_10ms_per_process"]  # type: ignore[assignment]
    print(
        f"{'process':18s} {'burst ms/job':>12s} {'waited':>7s} {'rest ms/job':>11s} {'in bursts':>9s}"
        "   cores busy, 10 ms steps from a wave's first end"
    )
    for name, row in procs.items():
        steps = " ".join(f"{c:4.2f}" for c in per[name])
        print(
            f"{name:18s} {row['burst_ms_per_job']:12.2f} {row['burst_wait_ms_per_job']:7.2f} "
            f"{row['rest_ms_per_job']:11.2f} {100 * row['burst_share']:8.0f}%   {steps}"
        )
    burst_total = sum(r["burst_ms_per_job"] for r in procs.values())
    wait_total = sum(r["burst_wait_ms_per_job"] for r in procs.values())
    rest_total = sum(r["rest_ms_per_job"] for r in procs.values())
    steps = " ".join(f"{c:4.2f}" for c in out["cores_busy_by_10ms"])  # type: ignore[attr-defined]
    print(f"{'all':18s} {burst_total:12.2f} {wait_total:7.2f} {rest_total:11.2f} {'':9s}   {steps}")
    print("waited: ms per job that the process's threads were runnable but waited for a CPU, in bursts")
    ov = out["overhead_ms"]
    print(
        f"{out['jobs']} jobs in {out['waves']} waves (median {out['wave_size_median']}, "
        f"largest {out['wave_size_max']}); bursts of {args.window_ms:g} ms kept "
        f"{out['burst_cores_busy']:.2f} cores busy on CPUs {','.join(map(str, out['cpus']))}"
    )
    print(f"the 10 ms profile: mean over {out['profile_waves']} waves of {args.min_wave} jobs or more")
    print(f"server-side overhead p50 / p90 / p99: {ov[50]:.2f} / {ov[90]:.2f} / {ov[99]:.2f} ms")  # type: ignore[index]
    print(f"written: {args.out / 'wave_cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

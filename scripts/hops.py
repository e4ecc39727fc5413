#!/usr/bin/env python3
"""Where a pipeline run's overhead goes, hop by hop, from the bench's records and the job hashes.

    llmconsole bench --path pipeline --concurrency 1 --requests 60 --out runs/c1
    ./.venv/bin/python scripts/hops.py runs/c1
    ./.venv/bin/python scripts/hops.py runs/c32 --slowest 5    # only the jobs of the overhead's tail

For every pipeline request of the run (its ``requests.jsonl``) it reads the job's hash from
Redis (the stack's own settings, ``var/llmconsole.env``) and prints the median and p90 of each
gap between adjacent timestamps, finer than the bench's stages: the client's submit side (the
bench's send to ``t_received``), each hop of the job, and the notify side (``t_finished`` to the
bench holding the result). The engine's own time (``t_engine_start`` to ``t_engine_end``) is left
out. Run it while the jobs are still in Redis (they expire with ``JOB_TTL_S``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.records import RequestRecord  # noqa: E402
from bench.store import read_folder_records  # noqa: E402
from services.contracts import TIMESTAMPS, Keys  # noqa: E402
from services.settings import get_settings  # noqa: E402

#: Gaps that are the engine's, not the pipeline's.
_ENGINE = {("t_engine_start", "t_first_token"), ("t_first_token", "t_engine_end")}


def job_hops(job: dict[str, str]) -> dict[str, float] | None:
    """Microseconds of each gap between a job hash's adjacent timestamps, the engine's own left
    out; None when the hash lacks a timestamp."""
    try:
        t = [int(job[name]) for name in TIMESTAMPS]
    except (KeyError, ValueError):
        return None
    return {
        f"{a[2:]} → {b[2:]}": (t[i + 1] - t[i]) / 1e3
        for i, (a, b) in enumerate(itertools.pairwise(TIMESTAMPS))
        if (a, b) not in _ENGINE
    }


def gaps(record: RequestRecord, job: dict[str, str]) -> dict[str, float] | None:
    """Microseconds of each hop of one request, the client's two sides included; None when its
    hash lacks a timestamp."""
    hops = job_hops(job)
    if hops is None:
        return None
    start_ns = record.start_ns
    end_ns = start_ns + (record.latency_s or 0.0) * 1e9
    return {
        "submit (bench send → t_received)": (int(job["t_received"]) - start_ns) / 1e3,
        **hops,
        "notify (t_finished → bench holds it)": (end_ns - int(job["t_finished"])) / 1e3,
    }


#: The client's two sides: not the server's overhead.
_CLIENT_SIDES = ("submit", "notify")
#: Submitted this close to a run's first submit: the run's opening burst.
OPENING_MS = 100.0


def slowest(
    rows: list[tuple[RequestRecord, dict[str, float]]], pct: float
) -> tuple[list[tuple[RequestRecord, dict[str, float]]], int]:
    """The ``pct`` % of requests with the largest server-side overhead (the sum of their job's
    hops, the client's sides left out), and how many of those were submitted within
    :data:`OPENING_MS` of the run's first submit."""
    if not rows:
        return [], 0
    first = min(x.start_ns for x, _ in rows)
    ranked = sorted(
        rows, key=lambda row: sum(v for k, v in row[1].items() if not k.startswith(_CLIENT_SIDES))
    )
    kept = ranked[-max(1, round(len(ranked) * pct / 100)) :]
    return kept, sum(1 for x, _ in kept if x.start_ns - first < OPENING_MS * 1e6)


def main() -> int:
    """Print the per-hop table of one run folder."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a bench output folder (holding requests.jsonl)")
    ap.add_argument("--step", type=int, help="only this step of a sweep")
    ap.add_argument(
        "--slowest",
        type=float,
        metavar="PCT",
        help="only the PCT %% of jobs with the largest server-side overhead, and how many of them "
        "the run's opening burst holds",
    )
    args = ap.parse_args()
    if args.slowest is not None and not 0 < args.slowest <= 100:
        ap.error("--slowest must be a percentage above 0 and at most 100")
    s = get_settings()
    r = redis.Redis.from_url(s.redis_url, decode_responses=True)
    keys = Keys(s.redis_prefix)
    records = [
        x
        for x in read_folder_records(args.run) or []
        if x.path == "pipeline" and x.success and x.job_id
        if args.step is None or x.step == args.step
    ]
    if not records:
        print("no successful pipeline requests in that run", file=sys.stderr)
        return 1
    pipe = r.pipeline(transaction=False)
    for x in records:
        pipe.hgetall(keys.job(x.job_id))  # type: ignore[arg-type]
    rows = [(x, g) for x, job in zip(records, pipe.execute(), strict=True) if (g := gaps(x, job)) is not None]
    missing = len(records) - len(rows)
    opening = None
    if args.slowest is not None:
        rows, opening = slowest(rows, args.slowest)
    per_hop: dict[str, list[float]] = {}
    for _x, g in rows:
        for name, us in g.items():
            per_hop.setdefault(name, []).append(us)
    if not per_hop:
        print("none of the run's jobs is still in Redis", file=sys.stderr)
        return 1
    print(f"{'hop':40s} {'p50 µs':>9s} {'p90 µs':>9s}")
    total = 0.0
    for name, values in per_hop.items():
        values.sort()
        p50 = statistics.median(values)
        total += p50
        print(f"{name:40s} {p50:9.0f} {values[int(0.9 * (len(values) - 1))]:9.0f}")
    print(f"{'sum of the medians':40s} {total:9.0f}")
    n = len(rows)
    note = f" ({missing} without their job hash: expired or incomplete)" if missing else ""
    if opening is not None:
        note += f"; the slowest {args.slowest:g} %, {opening} of them submitted in the run's first {OPENING_MS:g} ms"
    print(f"{n} request{'s' if n != 1 else ''}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Terminal plots of a benchmark run (plotext, drawn by textual-plotext widgets).

Each function takes a plotext ``plt`` object and draws one figure from a run's
records or summary, so the same code serves a fresh run, a reopened one and a
comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.records import BREAKDOWN_NAMES, RequestRecord

MS = 1000.0


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their cumulative share in percent (empty in, empty out)."""
    xs = sorted(values)
    n = len(xs)
    return xs, [100.0 * (i + 1) / n for i in range(n)]


def _paths(records: Sequence[RequestRecord]) -> list[str]:
    return [p for p in ("pipeline", "direct") if any(r.path == p for r in records)]


def plot_latency_cdf(
    plt: Any, runs: Sequence[tuple[str, Sequence[RequestRecord]]], metric: str = "ttft"
) -> bool:
    """CDF of TTFT (``metric='ttft'``) or end-to-end latency (``'e2el'``) per run and path; False if no data."""
    plt.clear_figure()
    drawn = False
    for name, records in runs:
        for path in _paths(records):
            ok = [r for r in records if r.path == path and r.success]
            vals = [(r.ttft_s if metric == "ttft" else r.latency_s) for r in ok]
            ms = [v * MS for v in vals if v is not None]
            if not ms:
                continue
            xs, ys = cdf(ms)
            label = f"{name} {path}".strip()
            plt.plot(xs, ys, label=label, marker="braille")
            drawn = True
    plt.title(f"{'TTFT' if metric == 'ttft' else 'E2E latency'} CDF")
    plt.xlabel("ms")
    plt.ylabel("% of requests")
    return drawn


def plot_timeline(plt: Any, records: Sequence[RequestRecord]) -> bool:
    """TTFT against send time, per path (queueing shows up as a rising cloud)."""
    plt.clear_figure()
    drawn = False
    for path in _paths(records):
        pts = [
            (r.sent_s, r.ttft_s * MS)
            for r in records
            if r.path == path and r.success and r.ttft_s is not None
        ]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        plt.scatter(list(xs), list(ys), label=path, marker="dot")
        drawn = True
    plt.title("TTFT over the run")
    plt.xlabel("send time (s)")
    plt.ylabel("TTFT (ms)")
    return drawn


def stage_means_ms(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Mean milliseconds of each pipeline stage over successful pipeline requests."""
    ok = [r for r in records if r.path == "pipeline" and r.success]
    out: dict[str, float] = {}
    for name in BREAKDOWN_NAMES:
        vals = [(r.client_s if name == "client" else r.stages_s.get(name)) for r in ok]
        nums = [v for v in vals if v is not None]
        if nums:
            out[name] = sum(nums) / len(nums) * MS
    return out


def plot_stages(plt: Any, records: Sequence[RequestRecord]) -> bool:
    """Mean time per pipeline stage (horizontal bars); False without pipeline requests."""
    plt.clear_figure()
    means = stage_means_ms(records)
    if not means:
        plt.title("no pipeline requests: no stages")
        return False
    names = list(reversed(means))  # plotext draws horizontal bars bottom-up: keep the pipeline order top-down
    plt.bar(names, [means[n] for n in names], orientation="horizontal", width=0.3)
    plt.title("mean ms per pipeline stage")
    return True


def plot_sweep(plt: Any, summary: dict[str, Any]) -> bool:
    """Output throughput against the swept load, per path; False if the run was no sweep."""
    plt.clear_figure()
    sweep = summary.get("sweep") or {}
    steps = sweep.get("steps") or []
    if not steps:
        plt.title("not a sweep")
        return False
    paths = sorted({p for st in steps for p in st.get("paths", {})})
    for path in paths:
        xs = [float(st["load"]) for st in steps if path in st.get("paths", {})]
        ys = [
            float(st["paths"][path].get("output_throughput") or 0.0)
            for st in steps
            if path in st.get("paths", {})
        ]
        plt.plot(xs, ys, label=path, marker="braille")
    plt.title(f"output tok/s vs {sweep.get('param', 'load')}")
    plt.xlabel(str(sweep.get("param", "load")))
    plt.ylabel("tok/s")
    return True

#!/usr/bin/env python3
"""Is the pipeline transparent on this machine? Every figure of its cost, in one run, against targets.

    ./.venv/bin/python scripts/transparency.py                          # the stack of this checkout
    ./.venv/bin/python scripts/transparency.py --rounds 3 --out runs/transparency
    ./.venv/bin/python scripts/transparency.py --cpu-before-ms 28.9     # also judge "half of before"

Before trusting the pipeline's figures on a new machine, this says how much the pipeline itself
adds there. It runs, in rounds, side by side on the stack of this checkout (``var/llmconsole.env``;
start it with ``./install.sh --engine sim --no-bench``):

- ``llmconsole bench --path pipeline`` at concurrency 32, 1000 tokens in and 100 out, fixed lengths:
  the server-side overhead per job, ``(t_finished − t_received) − (t_engine_end − t_engine_start)``,
  the pipeline's own CPU per job and per 1,000 streamed tokens, and ``prompt_build``;
- the same with ``--path both``: pipeline E2EL − direct E2EL, paired by request;
- ``scripts/skeleton.py``: the same hops doing nothing, on an engine that sleeps, so the overhead
  above can be set beside the floor of the pipeline's shape on the same cores;

and once, before the rounds, ``scripts/ingest_load.py``: ingestion's accepted jobs/s against a bare
FastAPI app on the same server settings (needs ``wrk``).

It prints one table, target against figure, each figure per round, and whether every round met it;
writes ``transparency.json`` and ``transparency.png`` (the overheads per round beside the targets
and the skeleton's) into ``--out``. The targets are issue 11's, for the simulator engine; a stack
on another engine is measured all the same, and said to be. These are benchmark figures: read them
as ratios within one run, never across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.render import fmt  # noqa: E402
from bench.report import new_figure  # noqa: E402  (matplotlib is imported when a figure is made)
from services.settings import get_settings  # noqa: E402

#: Issue 11's targets (ms unless said): what "transparent" means here.
OVERHEAD_P50_MS = 5.0
OVERHEAD_P99_MS = 25.0
PAIRED_MEDIAN_MS = 10.0
PROMPT_BUILD_P50_MS = 1.0
INGEST_RATIO = 0.7
CPU_SHARE_OF_BEFORE = 0.5


@dataclass
class Row:
    """One line of the table: a target, the figure of each round, and the verdict."""

    target: str
    figures: list[float]
    unit: str
    #: True when every figure met the target, None when there is no target to judge against.
    met: bool | None
    note: str = ""


def verdicts(
    rounds: list[dict[str, Any]], ingest: dict[str, Any] | None, cpu_before_ms: float | None
) -> list[Row]:
    """The table from the figures measured: ``rounds`` holds one dict per round (keys as
    :func:`round_figures` returns), ``ingest`` the ingest_load summary (None when skipped)."""

    def col(key: str) -> list[float]:
        return [r[key] for r in rounds if r.get(key) is not None]

    def every(figures: list[float], ok: Callable[[float], bool]) -> bool:
        # Met only with a figure from every round, each within the bound: a round that produced
        # none (a run that failed to report it) does not count as met.
        return bool(rounds) and len(figures) == len(rounds) and all(ok(f) for f in figures)

    def _le(figures: list[float], bound: float) -> bool:
        return every(figures, lambda f: f <= bound)

    rows: list[Row] = []
    if ingest is not None:
        per = [r["ingestion_rps"] / r["bare_rps"] for r in ingest["rounds"] if r["bare_rps"] > 0]
        note = f"{len(per)} alternating rounds: " + ", ".join(f"{x:.2f}" for x in per)
        rows.append(
            Row(
                f"ingestion ÷ bare FastAPI ≥ {INGEST_RATIO}",
                [ingest["ratio"]],
                "×",
                ingest["ratio"] >= INGEST_RATIO,
                note,
            )
        )
    p50, p99 = col("overhead_p50_ms"), col("overhead_p99_ms")
    rows.append(
        Row(f"server-side overhead p50 ≤ {OVERHEAD_P50_MS:g} ms", p50, "ms", _le(p50, OVERHEAD_P50_MS))
    )
    rows.append(
        Row(f"server-side overhead p99 ≤ {OVERHEAD_P99_MS:g} ms", p99, "ms", _le(p99, OVERHEAD_P99_MS))
    )
    paired = col("paired_median_ms")
    rows.append(
        Row(
            f"pipeline − direct E2EL, paired median ≤ {PAIRED_MEDIAN_MS:g} ms",
            paired,
            "ms",
            _le(paired, PAIRED_MEDIAN_MS),
        )
    )
    pb = col("prompt_build_p50_ms")
    rows.append(
        Row(
            f"prompt_build p50 < {PROMPT_BUILD_P50_MS:g} ms",
            pb,
            "ms",
            every(pb, lambda f: f < PROMPT_BUILD_P50_MS),
        )
    )
    cpu = col("cpu_ms_per_job")
    if cpu_before_ms is not None:
        bound = cpu_before_ms * CPU_SHARE_OF_BEFORE
        rows.append(Row(f"pipeline CPU per job ≤ half of {cpu_before_ms:g} ms", cpu, "ms", _le(cpu, bound)))
    else:
        rows.append(Row("pipeline CPU per job", cpu, "ms", None, "--cpu-before-ms to judge it"))
    rows.append(Row("pipeline CPU per 1,000 streamed tokens", col("cpu_s_per_1k_tokens"), "s", None))
    failed = [float(r.get("failed") or 0) for r in rounds]
    if any(failed):
        note = "jobs that failed in the c32 pipeline run of each round: the figures above cover the others"
        rows.append(Row("failed jobs (none expected)", failed, "", False, note))
    note = "the same hops doing nothing: the floor of this shape on these cores"
    for q in ("p50", "p99"):
        floor = col(f"skeleton_{q}_ms")
        if floor:
            rows.append(
                Row(f"skeleton overhead {q} (context)", floor, "ms", None, note if q == "p50" else "")
            )
    return rows


def round_figures(
    pipeline: dict[str, Any], both: dict[str, Any] | None, skeleton: dict[str, Any] | None
) -> dict[str, Any]:
    """One round's figures from the bench summaries (``summary.json``) and the skeleton's JSON."""
    cpu = pipeline.get("pipeline_cpu") or {}
    stages = pipeline.get("stages") or {}
    out: dict[str, Any] = {
        "overhead_p50_ms": pipeline.get("p50_server_overhead_ms"),
        "overhead_p99_ms": pipeline.get("p99_server_overhead_ms"),
        "cpu_ms_per_job": cpu.get("per_job_ms"),
        "cpu_s_per_1k_tokens": cpu.get("per_1k_tokens_s"),
        "prompt_build_p50_ms": (stages.get("prompt_build") or {}).get("p50_ms"),
        "completed": pipeline.get("completed"),
        "failed": pipeline.get("failed"),
        "run_id": pipeline.get("run_id"),
    }
    if both is not None:
        out["paired_median_ms"] = (both.get("paired_e2el") or {}).get("median_e2el_diff_ms")
        out["both_run_id"] = both.get("run_id")
    if skeleton is not None:
        o = skeleton.get("overhead_ms") or {}
        out["skeleton_p50_ms"], out["skeleton_p99_ms"] = o.get("p50"), o.get("p99")
    return out


def _run(
    argv: list[str], what: str, timeout_s: float, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run one step in its own process group; past ``timeout_s`` the whole group goes (a script
    such as skeleton.py starts services of its own) and the run stops with a message."""
    t0 = time.monotonic()
    print(f"  {what} ...", end="", flush=True)
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SystemExit(f"\n{what} took more than {timeout_s:g} s (--timeout): stopped") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        raise
    print(f" {time.monotonic() - t0:.0f} s", flush=True)
    if proc.returncode != 0:
        tail = (out[-2000:] + err[-2000:]).strip()
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _bench(
    args: argparse.Namespace, path: str, requests: int, out: Path, env: dict[str, str]
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "console.cli", "bench", "--path", path]
    argv += ["--concurrency", str(args.concurrency), "--input-tokens", str(args.input_tokens)]
    argv += ["--output-tokens", str(args.output_tokens), "--requests", str(requests)]
    argv += ["--warmup", str(args.warmup), "--no-plots", "--quiet", "--out", str(out)]
    what = f"llmconsole bench --path {path} --concurrency {args.concurrency} --requests {requests}"
    _run(argv, what, args.timeout, env)
    return json.loads((out / "summary.json").read_text())


def plot(rounds: list[dict[str, Any]], path: Path) -> None:
    """The overhead p50/p99 of each round beside the skeleton's and the targets."""
    fig = new_figure(8, 4.2)
    ax = fig.subplots()
    labels = [f"round {i + 1}" for i in range(len(rounds))]
    xs = list(range(len(rounds)))
    w = 0.2
    series = [
        ("pipeline p50", "overhead_p50_ms", -1.5, "tab:blue"),
        ("pipeline p99", "overhead_p99_ms", -0.5, "tab:cyan"),
        ("skeleton p50", "skeleton_p50_ms", 0.5, "tab:gray"),
        ("skeleton p99", "skeleton_p99_ms", 1.5, "silver"),
    ]
    for name, key, off, color in series:
        vals = [r.get(key) for r in rounds]
        if any(v is not None for v in vals):
            ax.bar([x + off * w for x in xs], [v or 0 for v in vals], w, label=name, color=color)
    ax.axhline(OVERHEAD_P50_MS, color="tab:blue", ls="--", lw=1, label=f"target p50 {OVERHEAD_P50_MS:g} ms")
    ax.axhline(OVERHEAD_P99_MS, color="tab:cyan", ls=":", lw=1, label=f"target p99 {OVERHEAD_P99_MS:g} ms")
    ax.set_xticks(xs, labels)
    ax.set_ylabel("server-side overhead per job (ms)")
    ax.set_title("the pipeline's overhead against its targets and the shape's floor")
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.savefig(path)


def render(rows: list[Row], header: list[str]) -> str:
    """The table as text: target, figures per round, verdict."""
    lines = [*header, ""]
    width = max(len(r.target) for r in rows)
    for r in rows:
        figs = " / ".join(fmt(f, 3 if abs(f) < 1 else 2) for f in r.figures) or "-"
        verdict = {True: "met", False: "NOT met", None: ""}[r.met]
        lines.append(f"{r.target:<{width}}  {figs + ' ' + r.unit:<28} {verdict}")
        if r.note:
            lines.append(f"{'':<{width}}    {r.note}")
    return "\n".join(lines)


def main() -> int:
    """Run the rounds, print the table, write the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rounds", type=int, default=2, help="rounds of pipeline, both and skeleton runs (default 2)"
    )
    ap.add_argument("--concurrency", type=int, default=32, help="jobs in flight (default 32)")
    ap.add_argument("--input-tokens", type=int, default=1000)
    ap.add_argument("--output-tokens", type=int, default=100)
    ap.add_argument("--requests", type=int, default=400, help="jobs of a --path pipeline run (default 400)")
    ap.add_argument("--both-requests", type=int, default=200, help="jobs of a --path both run (default 200)")
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument(
        "--hold-ms",
        type=int,
        default=2000,
        help="the skeleton's job length (default 2000: the simulator's at c32)",
    )
    ap.add_argument("--no-skeleton", action="store_true", help="skip the skeleton runs")
    ap.add_argument("--no-ingest", action="store_true", help="skip ingestion against bare FastAPI")
    ap.add_argument("--ingest-duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    ap.add_argument("--ingest-rounds", type=int, default=3)
    ap.add_argument(
        "--cpu-before-ms", type=float, help="CPU per job of a build to compare with (judged: at most half)"
    )
    ap.add_argument(
        "--timeout", type=float, default=900.0, help="seconds any one step may take (default 900)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="folder for transparency.json/.png and the runs (default var/runs/transparency-<time>)",
    )
    args = ap.parse_args()
    for name in (
        "rounds",
        "concurrency",
        "input_tokens",
        "output_tokens",
        "requests",
        "both_requests",
        "hold_ms",
        "ingest_rounds",
    ):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.ingest_duration <= 0 or args.timeout <= 0:
        ap.error("--warmup must be ≥ 0, --ingest-duration and --timeout > 0")

    s = get_settings()
    out = args.out or (Path(s.results_dir) / f"transparency-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    cores = len(os.sched_getaffinity(0))
    header = [
        f"pipeline transparency: {cores} CPU core(s), engine {s.engine_kind}, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        f"concurrency {args.concurrency}, {args.input_tokens} in / {args.output_tokens} out, fixed lengths; "
        f"{args.rounds} round(s)",
    ]
    if (args.concurrency, args.input_tokens, args.output_tokens) != (32, 1000, 100):
        header.append(
            "note: the targets are for concurrency 32, 1000 in / 100 out; verdicts here only orient"
        )
    if s.engine_kind != "sim":
        header.append(
            f"note: the targets are for the simulator engine; this stack runs ENGINE_KIND={s.engine_kind}"
        )
    print("\n".join(header), flush=True)

    ingest: dict[str, Any] | None = None
    if not args.no_ingest:
        argv = [sys.executable, str(ROOT / "scripts" / "ingest_load.py"), "--json"]
        argv += ["--duration", str(args.ingest_duration), "--rounds", str(args.ingest_rounds)]
        done = _run(
            argv,
            f"ingestion against bare FastAPI ({args.ingest_rounds} × 2 × {args.ingest_duration:g} s of wrk)",
            args.timeout,
            env,
        )
        ingest = json.loads(done.stdout)

    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", flush=True)
        pipe = _bench(args, "pipeline", args.requests, out / f"round{i + 1}-pipeline", env)
        both = _bench(args, "both", args.both_requests, out / f"round{i + 1}-both", env)
        skel = None
        if not args.no_skeleton:
            argv = [sys.executable, str(ROOT / "scripts" / "skeleton.py"), "--json"]
            argv += ["--concurrency", str(args.concurrency), "--requests", str(args.requests)]
            argv += ["--warmup", str(args.warmup), "--hold-ms", str(args.hold_ms)]
            what = f"skeleton.py --concurrency {args.concurrency} --requests {args.requests} --hold-ms {args.hold_ms}"
            skel = json.loads(_run(argv, what, args.timeout, env).stdout)
        rounds.append(round_figures(pipe, both, skel))

    rows = verdicts(rounds, ingest, args.cpu_before_ms)
    header.append(f"load average {os.getloadavg()[0]:.2f} at the end; figures per round, separated by /")
    print()
    print(render(rows, header))
    result = {
        "cores": cores,
        "engine_kind": s.engine_kind,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rounds": rounds,
        "ingest": ingest,
        "table": [asdict(r) for r in rows],
    }
    (out / "transparency.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rounds, out / "transparency.png")
    print(f"\nwritten: {out / 'transparency.json'}, {out / 'transparency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

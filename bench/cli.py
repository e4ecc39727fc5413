"""``llmconsole bench``: the thin command line over :mod:`bench`.

::

    llmconsole bench [run options]            run a benchmark (``run`` may be spelt out)
    llmconsole bench compare DIR_A DIR_B      two runs side by side
    llmconsole bench list                     runs in the results folder
    llmconsole bench show DIR                 a saved run's summary again
    llmconsole bench calibrate --out NAME     fit a simulator profile to a real engine

Exit codes: 0 done, 1 the run failed (nothing listening, every request
failed, …), 2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.config import BenchConfig, ProgressEvent, parse_goodput, parse_percentiles, parse_sweep
from bench.datasets import add_vllm_args, apply_vllm_args, check_dataset
from services.contracts import RoutingPolicy
from services.settings import Settings, load_settings

SUBCOMMANDS = ("run", "compare", "list", "show", "calibrate")


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` returns the code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}\n(see {self.prog} --help)")


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum`` (``what`` says the bound in words)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text} {what}")
        return v

    return parse


_positive_int = _int_at_least(1, "must be at least 1")
_nonneg_int = _int_at_least(0, "must not be negative")


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("NaN is not a number here")
    return v


def run_parser(settings: Settings) -> argparse.ArgumentParser:
    """The parser of ``llmconsole bench [run]`` (defaults shown from ``settings``)."""
    p = _Parser(
        prog="llmconsole bench",
        description="Benchmark the pipeline and/or the engine with vLLM's metric definitions.",
        epilog="Subcommands: compare DIR_A DIR_B · list · show DIR · calibrate --out NAME "
        "(each has --help). Metric definitions: the Benchmarks section of README.md.",
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--input-tokens",
        "--input-len",
        type=_positive_int,
        metavar="N",
        help=f"prompt tokens (default {settings.input_tokens}, INPUT_TOKENS)",
    )
    w.add_argument(
        "--output-tokens",
        "--output-len",
        type=_positive_int,
        metavar="N",
        help=f"output tokens (default {settings.output_tokens}, OUTPUT_TOKENS)",
    )
    w.add_argument(
        "--prefix-share",
        type=_float,
        metavar="F",
        help=f"shared-prefix share of the prompt, 0-1 (default {settings.prefix_share})",
    )
    w.add_argument(
        "--range-ratio",
        type=_float,
        default=0.0,
        metavar="R",
        help="vary lengths uniformly by ±ratio (default 0)",
    )
    w.add_argument(
        "--dataset",
        metavar="FILE",
        help='prompts file: JSONL {"prompt": ..., "output_tokens": N} per line, or ShareGPT JSON',
    )
    w.add_argument(
        "--requests",
        "--num-prompts",
        type=_positive_int,
        default=100,
        metavar="N",
        help="measured requests per path (default 100)",
    )
    w.add_argument(
        "--prefix-groups",
        type=_positive_int,
        metavar="N",
        help="N prefix groups, each with its own shared prefix (requests spread evenly, shuffled)",
    )
    w.add_argument(
        "--warmup", type=_nonneg_int, default=0, metavar="N", help="warm-up requests, not counted (default 0)"
    )
    w.add_argument(
        "--seed",
        type=_nonneg_int,
        default=0,
        metavar="N",
        help="seed of lengths, prompts and arrivals (default 0)",
    )
    add_vllm_args(p, _positive_int)
    ld = p.add_argument_group("load")
    ld.add_argument(
        "--concurrency",
        "--max-concurrency",
        type=_positive_int,
        metavar="N",
        help="requests in flight at most (default 16 without --rate)",
    )
    ld.add_argument(
        "--rate",
        "--request-rate",
        type=_float,
        metavar="R",
        help="requests/s with Poisson/gamma arrivals (default: inf)",
    )
    ld.add_argument(
        "--burstiness",
        type=_float,
        default=1.0,
        metavar="B",
        help="gamma shape: 1 Poisson, <1 burstier, >1 steadier",
    )
    ld.add_argument("--sweep", metavar="PARAM:V1,V2,..", help="e.g. concurrency:1,2,4,8,16 or rate:1,2,4,8")
    ld.add_argument(
        "--sweep-min-gain",
        type=_float,
        default=0.25,
        metavar="G",
        help="saturated below this marginal throughput gain",
    )
    ld.add_argument(
        "--sweep-latency-factor",
        type=_float,
        default=10.0,
        metavar="X",
        help="saturated when median TTFT exceeds this many times the first step's (default 10)",
    )
    ld.add_argument("--sweep-all", action="store_true", help="run every sweep step, even past the knee")
    m = p.add_argument_group("measurement")
    m.add_argument(
        "--path", choices=["pipeline", "direct", "both"], default="pipeline", help="default pipeline"
    )
    m.add_argument(
        "--pipeline-api",
        choices=["jobs", "openai"],
        default="jobs",
        help="pipeline path through the job API (default) or the OpenAI door (streamed, client-timed)",
    )
    m.add_argument(
        "--routing",
        choices=get_args(RoutingPolicy),
        help=f"routing policy of the run's jobs (default: the proxy workers' ROUTING, {settings.routing})",
    )
    m.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:5000")
    m.add_argument(
        "--percentiles",
        "--metric-percentiles",
        default="50,90,99",
        metavar="P1,P2,..",
        help="default 50,90,99",
    )
    m.add_argument(
        "--timeout",
        type=_float,
        default=1800.0,
        metavar="S",
        help="per-request limit in seconds (default 1800)",
    )
    m.add_argument(
        "--stall-notice",
        type=_float,
        default=60.0,
        metavar="S",
        help="say so, with the queue's state, when no request has finished for S seconds (default 60)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--label", metavar="TEXT", help="a name for the run")
    o.add_argument("--run-id", metavar="ID", help="run id (default: generated)")
    o.add_argument("--out", metavar="DIR", help=f"results folder (default {settings.results_dir}/<run_id>)")
    o.add_argument("--no-store", action="store_true", help="do not store the run in Redis")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--json", action="store_true", help="print the summary JSON instead of tables")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def config_from_args(ns: argparse.Namespace, settings: Settings | None = None) -> BenchConfig:
    """A :class:`BenchConfig` from parsed run arguments (ValueError/ValidationError if inconsistent)."""
    apply_vllm_args(ns, settings or load_settings())
    sweep = None
    if ns.sweep:
        sweep = parse_sweep(ns.sweep).model_copy(
            update={
                "min_gain": ns.sweep_min_gain,
                "latency_factor": ns.sweep_latency_factor,
                "stop_at_knee": not ns.sweep_all,
            }
        )
        sweep = type(sweep).model_validate(sweep.model_dump())  # re-validate the updated fields
    rate = ns.rate
    if rate is not None and math.isinf(rate):
        rate = None
    return BenchConfig(
        input_tokens=ns.input_tokens,
        output_tokens=ns.output_tokens,
        prefix_share=ns.prefix_share,
        range_ratio=ns.range_ratio,
        dataset=ns.dataset,
        dataset_name=ns.dataset_name,
        requests=ns.requests,
        warmup=ns.warmup,
        seed=ns.seed,
        concurrency=ns.concurrency,
        rate=rate,
        burstiness=ns.burstiness,
        sweep=sweep,
        path=ns.path,
        routing=ns.routing,
        pipeline_api=ns.pipeline_api,
        prefix_groups=ns.prefix_groups,
        goodput=parse_goodput(ns.goodput or []),
        percentiles=parse_percentiles(ns.percentiles),
        timeout_s=ns.timeout,
        stall_notice_s=ns.stall_notice,
        label=ns.label,
        run_id=ns.run_id,
        out=ns.out,
        store=not ns.no_store,
        plots=not ns.no_plots,
    )


def _validation_message(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"  --{loc.replace('_', '-')}: {msg}" if loc else f"  {msg}")
    return "invalid benchmark options:\n" + "\n".join(lines)


class _Bar:
    """A rich progress bar fed by :class:`ProgressEvent`."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None
        self.key: tuple[str, int] | None = None

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.warning:
            self.progress.console.print(f"[yellow]warning:[/] {escape(ev.warning)}")
            return
        if ev.phase in ("prepare", "done", "step"):
            if ev.phase == "step" and ev.message and self.task is not None:
                self.progress.update(self.task, extra=f"{ev.message}")
            return
        key = (ev.phase, ev.step)
        step = f" {ev.step + 1}/{ev.steps}" if ev.steps > 1 else ""
        desc = f"{'warm-up' if ev.phase == 'warmup' else 'run'}{step} ({ev.load})"
        if key != self.key:
            self.key = key
            self.task = self.progress.add_task(desc, total=ev.total, extra="")
        rate = ev.done / ev.elapsed_s if ev.elapsed_s > 0 else 0.0
        failed = f"[red]{ev.failed} failed[/] · " if ev.failed else ""
        self.progress.update(self.task, completed=ev.done, extra=f"{failed}{rate:.1f} req/s")


class _WarningsOnly:
    """Progress callback for ``--quiet`` and ``--json``: prints only the run's warnings."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.warning:
            self.console.print(f"[yellow]warning:[/] {escape(ev.warning)}")


def cmd_run(argv: list[str], out: Console, err: Console) -> int:
    """Run a benchmark from the command line."""
    settings = load_settings()
    ns = run_parser(settings).parse_args(argv)
    try:
        cfg = config_from_args(ns, settings)
        check_dataset(cfg)  # a malformed dataset file is a usage error (exit 2), before anything runs
    except ValidationError as e:
        raise UsageError(_validation_message(e)) from None
    except ValueError as e:
        raise UsageError(str(e)) from None

    from bench.runner import BenchError, run_benchmark
    from services.runtime import freeze_startup_heap
    from services.runtime import run as run_loop

    freeze_startup_heap()  # no full collection walks the bench's imports mid-run

    try:
        if ns.quiet or ns.json:
            # No bar, but a stall is still said (on stderr: --json keeps stdout for the JSON).
            result = run_loop(run_benchmark(cfg, _WarningsOnly(err), settings=settings))
        else:
            with _Bar(err) as bar:
                result = run_loop(run_benchmark(cfg, bar, settings=settings))
    except BenchError as e:
        err.print(f"[red]error:[/] {e}")
        return 1
    if ns.json:
        out.print_json(json.dumps(result.summary, default=str))
    else:
        from bench.render import summary_renderables

        for r in summary_renderables(result.summary):
            out.print(r)
        out.print(f"results: {result.out_dir}  (summary.json, requests.jsonl, requests.csv, *.png)")
    if result.summary.get("completed", 0) == 0:
        err.print("[red]every request failed[/]; see the errors above")
        return 1
    return 0


def cmd_compare(argv: list[str], out: Console, err: Console) -> int:
    """Compare two run folders."""
    p = _Parser(prog="llmconsole bench compare", description="Two runs side by side: B − A and B / A.")
    p.add_argument(
        "a", metavar="DIR_A", help="a run folder, or a run id (under RESULTS_DIR, else from Redis)"
    )
    p.add_argument("b", metavar="DIR_B")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    ns = p.parse_args(argv)
    from bench.compare import Comparison, compare_summaries
    from bench.store import find_run

    settings = load_settings()
    try:
        a, b = find_run(ns.a, settings), find_run(ns.b, settings)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for note in [*a.warnings, *b.warnings] if a.out_dir is None or b.out_dir is None else []:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    c = Comparison(a, b, compare_summaries(a.summary, b.summary))
    if ns.json:
        out.print_json(json.dumps([r.__dict__ | {"verdict": r.verdict} for r in c.rows]))
    else:
        from bench.render import comparison_table

        out.print(comparison_table(c))
    return 0


def cmd_list(argv: list[str], out: Console, err: Console) -> int:
    """List saved runs."""
    settings = load_settings()
    p = _Parser(prog="llmconsole bench list", description="Runs in the results folder, newest first.")
    p.add_argument("--results-dir", default=settings.results_dir)
    ns = p.parse_args(argv)
    from rich.table import Table

    from bench.render import fmt
    from bench.report import list_runs

    runs = list_runs(ns.results_dir)
    if not runs:
        out.print(f"no runs under {ns.results_dir}")
        _redis_only_runs(settings, set(), err)
        return 0
    t = Table(title=f"runs in {ns.results_dir}")
    for c in ("date", "run id", "label", "path", "ok", "failed", "req/s", "out tok/s"):
        t.add_column(c)
    for r in runs:
        t.add_row(
            r.date,
            r.run_id,
            r.label or "",
            r.path,
            fmt(r.completed),
            fmt(r.failed),
            fmt(r.request_throughput),
            fmt(r.output_throughput),
        )
    out.print(t)
    _redis_only_runs(settings, {r.run_id for r in runs}, err)
    return 0


def _redis_only_runs(settings: Settings, on_disk: set[str], err: Console) -> None:
    """Name the runs Redis still holds whose folder is gone (their records with it)."""
    from bench.report import SUMMARY_FILE
    from bench.store import list_stored_runs

    try:
        stored = asyncio.run(list_stored_runs(settings, settings.run_retention_max))
    except Exception:  # Redis down or unreachable: the folders listed are the whole answer
        return
    for h in stored:
        run_id, out_dir = h.get("run_id", ""), h.get("out_dir", "")
        if run_id in on_disk or (out_dir and (Path(out_dir) / SUMMARY_FILE).is_file()):
            continue
        err.print(
            f"note: run {run_id} ({h.get('state', '?')}) is in Redis without its folder {out_dir or '(none)'}: "
            f"its per-request records are gone; `llmconsole bench show {run_id}` prints the summary Redis keeps",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def cmd_show(argv: list[str], out: Console, err: Console) -> int:
    """Print a saved run's summary tables."""
    p = _Parser(prog="llmconsole bench show", description="A saved run's summary again.")
    p.add_argument(
        "dir", metavar="DIR", help="a run folder, or a run id (under RESULTS_DIR, else from Redis)"
    )
    ns = p.parse_args(argv)
    from bench.render import summary_renderables
    from bench.store import find_run

    try:
        run = find_run(ns.dir, load_settings())
    except ValueError as e:
        raise UsageError(str(e)) from None
    for r in summary_renderables(run.summary):
        out.print(r)
    for note in run.warnings if run.out_dir is None else []:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_calibrate(argv: list[str], out: Console, err: Console) -> int:
    """Fit a simulator profile to a real engine."""
    from bench.calibrate import calibrate_main

    return calibrate_main(argv, out, err, _Parser)


COMMANDS: dict[str, Callable[[list[str], Console, Console], int]] = {
    "run": cmd_run,
    "compare": cmd_compare,
    "list": cmd_list,
    "show": cmd_show,
    "calibrate": cmd_calibrate,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llmconsole bench``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = Console()
    err = Console(stderr=True)
    cmd = cmd_run
    if args and args[0] in COMMANDS:
        cmd = COMMANDS[args.pop(0)]
    try:
        return cmd(args, out, err)
    except UsageError as e:
        err.print(str(e), markup=False, highlight=False, soft_wrap=True)  # one line per line, never wrapped
        return 2
    except ValidationError as e:  # settings from the environment / env file
        err.print(f"invalid settings: {e}", markup=False)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""llmconsole's benchmark: a library with a thin CLI (``llmconsole bench``).

Library API (what the console's launcher and scripts use)::

    from bench import BenchConfig, ProgressEvent, RunResult, run_benchmark, load_run, list_runs

    cfg = BenchConfig(input_tokens=500, output_tokens=100, requests=200, concurrency=16, path="both")
    result: RunResult = await run_benchmark(cfg, progress=lambda ev: ..., settings=None)

``async run_benchmark(config, progress=None, *, settings=None) -> RunResult``
    Runs the benchmark (or sweep) that ``config`` describes against the stack
    ``settings`` points at (default :func:`services.settings.get_settings`),
    writes its folder (``config.out`` or ``RESULTS_DIR/<run_id>``) and stores it
    in Redis. ``progress`` is called on the event loop with a
    :class:`ProgressEvent` after each request and phase change. Raises
    :class:`BenchError` with a readable message when the run cannot start
    (nothing listening, bad dataset); cancelling the task marks the run
    failed in Redis.
``BenchConfig``
    Every option, validated (pydantic); unset token counts take the settings'
    defaults. :func:`bench.config.parse_goodput`, ``parse_percentiles`` and
    ``parse_sweep`` turn form/CLI text into its fields.
``RunResult``
    ``run_id``, ``config`` (resolved), ``summary`` (the dict written to
    summary.json), ``records`` (:class:`bench.records.RequestRecord` per
    measured request), ``out_dir``, ``state``, ``warnings``.
``load_run(dir) -> RunResult``
    Reads a run folder back (ValueError if it is not one).
``list_runs(results_dir=None, settings=None) -> list[RunInfo]``
    Run folders under the results folder, newest first.
``bench.store.list_stored_runs(settings)`` / ``load_stored_run(settings, run_id)``
    The same from Redis (the layout is described in :mod:`bench.store`).
``bench.compare.compare_runs(dir_a, dir_b)``, ``bench.render``
    Comparison rows, and rich tables of a summary or a comparison.
``bench.cli.main(argv) -> int``
    The ``llmconsole bench ...`` command line (exit code returned, never raised).
"""

from bench.config import BenchConfig, ProgressEvent, SweepSpec
from bench.report import RunInfo, list_runs, load_run
from bench.runner import BenchError, RunResult, run_benchmark

__all__ = [
    "BenchConfig",
    "BenchError",
    "ProgressEvent",
    "RunInfo",
    "RunResult",
    "SweepSpec",
    "list_runs",
    "load_run",
    "run_benchmark",
]

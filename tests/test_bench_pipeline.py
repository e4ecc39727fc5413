"""A small benchmark through the whole pipeline (real processes), both paths, stored in Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from rich.console import Console

from bench import BenchConfig, ProgressEvent, run_benchmark
from bench.cli import main
from bench.render import summary_renderables
from bench.store import list_stored_runs, load_stored_run
from services.contracts import STAGE_NAMES, RunState
from tests.stackutil import Stack

pytestmark = pytest.mark.slow


async def test_both_paths_through_the_stack(stack: Stack, tmp_path: Path) -> None:
    s = stack.settings
    cfg = BenchConfig(
        input_tokens=64,
        output_tokens=6,
        requests=10,
        concurrency=4,
        warmup=2,
        path="both",
        label="pipeline test",
        out=str(tmp_path / "run"),
    )
    res = await run_benchmark(cfg, settings=s)
    sm = res.summary
    assert set(sm["paths"]) == {"pipeline", "direct"}
    pipe, direct = sm["paths"]["pipeline"], sm["paths"]["direct"]
    assert pipe["completed"] == 10 and direct["completed"] == 10
    assert sm["completed"] == 10 and sm["backend"] == "llmconsole-pipeline"  # pipeline at the top level
    assert pipe["token_mismatches"] == 0 and direct["token_mismatches"] == 0
    assert pipe["total_input_tokens"] == direct["total_input_tokens"] == 640
    for name in (*STAGE_NAMES, "client"):
        assert pipe["stages"][name]["count"] == 10, name
    assert pipe["stages"]["queue_wait"]["mean_ms"] >= 0
    assert 0 < pipe["mean_efficiency"] <= 1
    assert sm["overhead"]["mean_e2el_ms"]["diff"] == pytest.approx(
        pipe["mean_e2el_ms"] - direct["mean_e2el_ms"]
    )
    # Each request went both ways: the paired difference is the median of its per-request differences.
    e2el = {(r.index, r.path): r.latency_s for r in res.records}
    diffs = sorted(e2el[(i, "pipeline")] - e2el[(i, "direct")] for i in {r.index for r in res.records})
    assert sm["paired_e2el"]["pairs"] == 10
    assert sm["paired_e2el"]["median_e2el_diff_ms"] == pytest.approx((diffs[4] + diffs[5]) / 2 * 1000)
    text = Console(width=200, record=True)
    for renderable in summary_renderables(sm):  # as `llmconsole bench` prints them
        text.print(renderable)
    assert "E2EL pipeline − direct, paired by request (10 pairs): median" in text.export_text()
    assert sm["prefix_cache"]["hit_rate"] > 0
    assert sm["engine"].startswith("sim")
    # every pipeline request is a succeeded job of this run, engine timings filled in
    prec = [r for r in res.records if r.path == "pipeline"]
    assert len(prec) == 10 and all(r.job_id and r.state == "succeeded" for r in prec)
    assert all(r.engine_time_s and r.server_e2e_s and r.client_s is not None for r in prec)
    assert len({r.job_id for r in prec}) == 10
    assert (tmp_path / "run" / "stages.png").is_file()

    stored = await load_stored_run(s, res.run_id)
    assert stored is not None
    h, recs = stored
    assert h["state"] == RunState.FINISHED.value and h["summary"]["run_id"] == res.run_id
    assert h["params"]["path"] == "both" and h["label"] == "pipeline test"
    assert int(h["done"]) == int(h["total"]) == 20
    assert len(recs) == 20 and {r.path for r in recs} == {"pipeline", "direct"}
    assert res.run_id in [r["run_id"] for r in await list_stored_runs(s)]


async def test_backpressure_429_is_honoured(make_stack, tmp_path: Path) -> None:
    st: Stack = make_stack(max_active_jobs=2)
    cfg = BenchConfig(input_tokens=16, output_tokens=4, requests=6, concurrency=6, path="pipeline", plots=False,
                      out=str(tmp_path / "bp"))  # fmt: skip
    res = await run_benchmark(cfg, settings=st.settings)
    assert res.summary["completed"] == 6 and res.summary["failed"] == 0
    assert res.summary["refused_429"] > 0  # refused, waited Retry-After, resubmitted


def _cli_env(monkeypatch: pytest.MonkeyPatch, stack: Stack, columns: int) -> None:
    """The environment an in-process ``llmconsole bench`` reads its settings from: this stack's."""
    monkeypatch.setenv("LLMC_ENV_FILE", "/nonexistent/llmconsole.env")
    for k, v in stack.values.items():
        monkeypatch.setenv(k.upper(), str(v))
    monkeypatch.setenv("COLUMNS", str(columns))


def test_cli_run_prints_the_summary(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _cli_env(monkeypatch, stack, columns=160)
    out = tmp_path / "cli"
    code = main(["--input-tokens", "32", "--output-tokens", "4", "--requests", "4", "--concurrency", "2",
                 "--out", str(out), "--no-plots"])  # fmt: skip
    cap = capsys.readouterr()
    text = cap.out
    assert code == 0, text + cap.err
    assert "4/4" in cap.err  # the progress bar, on stderr
    for needle in ("Successful requests", "Mean TTFT (ms)", "P99 E2EL (ms)", "Pipeline stages", "queue_wait",
                   "Prefix cache hit rate", str(out)):  # fmt: skip
        assert needle in text, needle
    assert (out / "summary.json").is_file()


async def test_a_cancelled_run_is_marked_failed_in_redis(stack: Stack, tmp_path: Path) -> None:
    seen: list[ProgressEvent] = []
    started = asyncio.Event()

    def progress(ev: ProgressEvent) -> None:
        seen.append(ev)
        if ev.phase == "run" and ev.done >= 2:
            started.set()

    cfg = BenchConfig(input_tokens=16, output_tokens=50, requests=500, concurrency=2, path="pipeline",
                      out=str(tmp_path / "cancel"), run_id="run-cancel-test")  # fmt: skip
    task = asyncio.create_task(run_benchmark(cfg, progress, settings=stack.settings))
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = await load_stored_run(stack.settings, "run-cancel-test")
    assert stored is not None
    h, _ = stored
    assert h["state"] == RunState.FAILED.value and h["error"] == "cancelled"
    assert not (tmp_path / "cancel" / "summary.json").exists()


def test_a_stalled_run_says_what_the_queue_shows(
    make_stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No proxy worker: the jobs wait in the queue and nothing finishes. Even with --quiet the bench
    # says so on stderr, with the queue's state and what to check, and keeps it in the summary.
    st: Stack = make_stack()
    st.procs["proxy_worker"].stop()
    _cli_env(monkeypatch, st, columns=400)
    out = tmp_path / "stalled"
    code = main(["--input-tokens", "16", "--output-tokens", "2", "--requests", "2", "--concurrency", "2",
                 "--stall-notice", "1", "--timeout", "4", "--quiet", "--json", "--out", str(out),
                 "--no-plots"])  # fmt: skip
    cap = capsys.readouterr()
    assert code == 1, cap.out + cap.err  # every request timed out
    assert "warning: no request has finished in the last" in cap.err, cap.err
    assert "(2 in flight); 2 job(s) wait in the queue and none is running: is a proxy worker up?" in cap.err
    summary = json.loads(cap.out)  # --json: stdout holds only the JSON
    stalls = [w for w in summary["warnings"] if w.startswith("stalled: ")]
    assert 1 <= len(stalls) <= 5 and "none is running" in stalls[0]

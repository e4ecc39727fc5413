"""Results folders (JSON, JSONL, CSV, PNG), reading them back, and compare."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.image import imread
from rich.console import Console

from bench import list_runs, load_run
from bench.cli import main
from bench.compare import compare_runs, compare_summaries
from bench.config import BenchConfig, SweepSpec
from bench.records import RequestRecord
from bench.render import comparison_table, summary_renderables
from bench.report import write_run
from bench.runner import Load, build_summary, step_loads, step_summary, sweep_knee
from services.contracts import STAGE_NAMES
from services.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(scale: float = 1.0, n: int = 8) -> list[RequestRecord]:
    out = []
    for i in range(n):
        for path in ("pipeline", "direct"):
            r = RequestRecord(index=i, path=path, success=True, sent_s=0.05 * i)
            r.requested_input_tokens, r.requested_output_tokens = 100, 5
            r.prompt_tokens, r.completion_tokens, r.cached_tokens = 100, 5, 48
            r.ttft_s = 0.02 * scale
            r.itl_s = [0.01 * scale] * 4
            r.first_token_s = r.sent_s + r.ttft_s
            r.latency_s = r.ttft_s + sum(r.itl_s) + (0.03 if path == "pipeline" else 0.0)
            if path == "pipeline":
                r.stages_s = dict.fromkeys(STAGE_NAMES, 0.005)
                r.server_e2e_s = 0.04
                r.client_s = r.latency_s - 0.04
                r.engine_time_s = 0.06 * scale
                r.job_id, r.attempt = f"j{i}", 1
            out.append(r)
    bad = RequestRecord(index=n, path="direct", success=False, error="engine 500: boom", latency_s=0.1)
    return [*out, bad]


def summary_for(recs: list[RequestRecord], cfg: BenchConfig, duration: float = 1.0) -> dict[str, Any]:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    cfg = cfg.resolved(s).model_copy(update={"run_id": "run-test"})
    loads = step_loads(cfg)
    steps = [
        step_summary(cfg, ld, i, [r for r in recs if r.step == i], duration) for i, ld in enumerate(loads)
    ]
    knee = sweep_knee(cfg, steps) if cfg.sweep else None
    prefix = {"queries": 1000.0, "hits": 400.0, "hit_rate": 0.4}
    return build_summary(
        cfg, steps, knee, prefix, None, engine="sim", model_id="m", t_start_ns=1, t_end_ns=2, settings=s
    )


def check_png(p: Path) -> None:
    assert p.read_bytes()[:8] == PNG_MAGIC
    img = imread(p)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img.std() > 0  # not a blank canvas


def test_run_folder_files_and_round_trip(tmp_path: Path) -> None:
    recs = records()
    cfg = BenchConfig(input_tokens=100, output_tokens=5, path="both", concurrency=4, goodput={"ttft": 100})
    summary = summary_for(recs, cfg)
    written = write_run(tmp_path / "run", summary, recs)
    names = {p.name for p in written}
    assert {"summary.json", "requests.jsonl", "requests.csv"} <= names
    assert {"latency_cdf.png", "latency_hist.png", "timeline.png", "stages.png"} <= names
    for p in written:
        if p.suffix == ".png":
            check_png(p)

    # summary.json: strict JSON (no NaN) with vLLM's keys for the primary (pipeline) path
    text = (tmp_path / "run" / "summary.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    for key in (
        "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "request_goodput", "output_throughput", "total_token_throughput", "max_concurrency", "request_rate",
        "burstiness", "mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "std_e2el_ms", "max_output_tokens_per_s",
        "max_concurrent_requests",
    ):  # fmt: skip
        assert key in data, key
    assert data["completed"] == 8 and data["failed"] == 0  # pipeline figures at the top
    assert data["paths"]["direct"]["failed"] == 1
    assert data["overhead"]["mean_e2el_ms"]["diff"] == pytest.approx(30.0)
    # client = E2EL 90 ms − server 40 ms
    assert data["paths"]["pipeline"]["stages"]["client"]["mean_ms"] == pytest.approx(50.0)

    rows = list(csv.DictReader((tmp_path / "run" / "requests.csv").open()))
    assert len(rows) == len(recs)
    assert rows[0]["stage_queue_wait_s"] == "0.005" and rows[0]["n_itl"] == "4"

    run = load_run(tmp_path / "run")
    assert run.run_id == "run-test"
    assert run.records == recs
    assert run.config.path == "both"
    assert [r.run_id for r in list_runs(tmp_path)] == ["run-test"]

    console = Console(record=True, width=160)
    for r in summary_renderables(data):
        console.print(r)
    out = console.export_text()
    for needle in ("Mean TTFT (ms)", "P99 E2EL (ms)", "pipeline − direct", "queue_wait", "client", "40.0 %",
                   "engine 500: boom"):  # fmt: skip
        assert needle in out, needle
    # P50 is the median: shown once, as the median row and column.
    assert "Median TTFT (ms)" in out and "P50 TTFT" not in out and " p50 " not in out


def test_sweep_plot_and_table(tmp_path: Path) -> None:
    cfg = BenchConfig(
        input_tokens=100,
        output_tokens=5,
        path="direct",
        sweep=SweepSpec(param="concurrency", values=[1, 2, 4]),
    )
    recs: list[RequestRecord] = []
    for step, scale in enumerate((1.0, 1.1, 3.0)):
        for r in records(scale, n=4):
            if r.path == "direct":
                r.step = step
                recs.append(r)
    summary = summary_for(recs, cfg)
    assert summary["sweep"]["knee"] is not None and len(summary["sweep"]["steps"]) == 3
    written = write_run(tmp_path / "sw", summary, recs)
    sweep_png = tmp_path / "sw" / "sweep.png"
    assert sweep_png in written
    check_png(sweep_png)
    assert not (tmp_path / "sw" / "stages.png").exists()  # no pipeline, no stage plot
    console = Console(record=True, width=160)
    for r in summary_renderables(summary):
        console.print(r)
    text = console.export_text()
    assert "Sweep over concurrency" in text and "◀ knee" in text


def test_no_plots_when_asked(tmp_path: Path) -> None:
    recs = records()
    written = write_run(tmp_path / "np", summary_for(recs, BenchConfig(path="both")), recs, plots=False)
    assert not [p for p in written if p.suffix == ".png"]


def test_compare_rows_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = BenchConfig(input_tokens=100, output_tokens=5, path="both", concurrency=4)
    a_recs, b_recs = records(1.0), records(2.0)
    write_run(tmp_path / "a", summary_for(a_recs, cfg, duration=1.0), a_recs, plots=False)
    write_run(tmp_path / "b", summary_for(b_recs, cfg, duration=2.0), b_recs, plots=False)
    c = compare_runs(tmp_path / "a", tmp_path / "b")
    rows = {(r.section, r.key): r for r in c.rows}
    thr = rows[("pipeline", "request_throughput")]
    assert thr.a == pytest.approx(8.0) and thr.b == pytest.approx(4.0)
    assert thr.diff == pytest.approx(-4.0) and thr.ratio == pytest.approx(0.5)
    assert thr.verdict == "worse"
    ttft = rows[("direct", "mean_ttft_ms")]
    assert ttft.ratio == pytest.approx(2.0) and ttft.verdict == "worse"
    assert rows[("pipeline", "stage_client")].a is not None
    assert rows[("run", "prefix_cache_hit_rate")].ratio == pytest.approx(1.0)
    paired = rows[("run", "median_e2el_diff_ms")]
    assert paired.a is not None and paired.b is not None and ("run", "p99_e2el_diff_ms") in rows

    console = Console(record=True, width=200)
    console.print(comparison_table(c))
    text = console.export_text()
    assert "B / A" in text and "0.500×" in text and "Mean TTFT (ms)" in text

    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "Request throughput" in out and "worse" in out
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    rows_json = json.loads(capsys.readouterr().out)
    assert any(r["key"] == "mean_e2el_ms" and r["ratio"] == pytest.approx(2.0, rel=0.2) for r in rows_json)


def test_compare_runs_of_different_paths_uses_primary_figures() -> None:
    a = {"paths": {"direct": {}}, "request_throughput": 10.0, "mean_ttft_ms": 5.0, "percentiles": [99]}
    b = {"paths": {"pipeline": {}}, "request_throughput": 5.0, "mean_ttft_ms": 10.0, "percentiles": [99]}
    rows = {r.key: r for r in compare_summaries(a, b)}
    assert rows["request_throughput"].section == "primary"
    assert rows["mean_ttft_ms"].ratio == pytest.approx(2.0)


def test_step_loads() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert step_loads(BenchConfig(concurrency=3).resolved(s)) == [Load(3, None)]
    sw = BenchConfig(rate=None, sweep=SweepSpec(param="rate", values=[1, 2]), concurrency=8).resolved(s)
    assert step_loads(sw) == [Load(8, 1.0, 1.0), Load(8, 2.0, 2.0)]

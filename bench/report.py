"""A run's folder: summary JSON, per-request JSONL and CSV, PNG plots; and reading it back.

Files in ``<results_dir>/<run_id>/`` (or ``--out``):

``summary.json``
    The summary; its top-level keys match ``vllm bench serve``'s result JSON
    where the quantity is the same (see README.md, "Benchmarks").
``requests.jsonl`` / ``requests.csv``
    One line per measured request (warm-ups excluded).
``latency_cdf.png``, ``latency_hist.png``, ``timeline.png``, ``stages.png``, ``sweep.png``
    Latency distributions, TTFT and ITL over time, the pipeline's per-stage
    breakdown, throughput and latency against load (sweeps only).

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), so a caller with its own UI is not disturbed.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import BenchConfig
from bench.records import BREAKDOWN_NAMES, CSV_COLUMNS, RequestRecord
from bench.runner import RunResult
from services.contracts import RunState
from services.settings import Settings, get_settings

SUMMARY_FILE = "summary.json"
JSONL_FILE = "requests.jsonl"
CSV_FILE = "requests.csv"
PATH_COLORS = {"pipeline": "#1f77b4", "direct": "#ff7f0e"}


def _json_default(o: object) -> object:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _clean(o: Any) -> Any:
    """NaN/inf → None, so the JSON is strict (json.dumps would write NaN)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def write_run(
    out_dir: Path, summary: dict[str, Any], records: list[RequestRecord], plots: bool = True
) -> list[Path]:
    """Write the run's files into ``out_dir`` (created); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    p = out_dir / SUMMARY_FILE
    p.write_text(json.dumps(_clean(summary), indent=2, default=_json_default, allow_nan=False) + "\n")
    written.append(p)
    p = out_dir / JSONL_FILE
    with p.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(_clean(r.to_dict()), allow_nan=False) + "\n")
    written.append(p)
    p = out_dir / CSV_FILE
    with p.open("w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
        w.writeheader()
        for r in records:
            w.writerow(r.csv_row())
    written.append(p)
    if plots:
        written.extend(write_plots(out_dir, summary, records))
    return written


def load_run(path: str | Path) -> RunResult:
    """Read a run folder back (``summary.json`` + ``requests.jsonl``).

    Raises ValueError when the folder holds no readable run.
    """
    d = Path(path)
    sp = d / SUMMARY_FILE if d.is_dir() else d
    if not sp.is_file():
        raise ValueError(f"{path}: no {SUMMARY_FILE} here; is it a run folder?")
    try:
        summary = json.loads(sp.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{sp}: not a readable summary ({e})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{sp}: not a run summary")
    records: list[RequestRecord] = []
    jp = sp.parent / JSONL_FILE
    if jp.is_file():
        with jp.open(encoding="utf-8") as fh:
            records = [RequestRecord.from_dict(json.loads(line)) for line in fh if line.strip()]
    try:
        config = BenchConfig.model_validate(summary.get("config") or {})
    except ValueError:
        config = BenchConfig()
    return RunResult(
        run_id=str(summary.get("run_id") or sp.parent.name),
        config=config,
        summary=summary,
        records=records,
        out_dir=sp.parent,
        state=RunState(summary.get("state", RunState.FINISHED.value)),
        warnings=list(summary.get("warnings") or []),
    )


@dataclass(frozen=True)
class RunInfo:
    """One line of a run listing."""

    run_id: str
    out_dir: Path
    date: str
    label: str | None
    path: str
    completed: int | None
    failed: int | None
    request_throughput: float | None
    output_throughput: float | None


def list_runs(results_dir: str | Path | None = None, settings: Settings | None = None) -> list[RunInfo]:
    """Run folders under ``results_dir`` (default: ``Settings.results_dir``), newest first."""
    root = Path(results_dir) if results_dir is not None else Path((settings or get_settings()).results_dir)
    out: list[RunInfo] = []
    if not root.is_dir():
        return out
    for sp in root.glob(f"*/{SUMMARY_FILE}"):
        try:
            s = json.loads(sp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out.append(
            RunInfo(
                run_id=str(s.get("run_id") or sp.parent.name),
                out_dir=sp.parent,
                date=str(s.get("date") or ""),
                label=s.get("label"),
                path=str(s.get("path") or ""),
                completed=s.get("completed"),
                failed=s.get("failed"),
                request_throughput=s.get("request_throughput"),
                output_throughput=s.get("output_throughput"),
            )
        )
    out.sort(key=lambda r: (r.date, r.run_id), reverse=True)
    return out


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def new_figure(w: float, h: float) -> Any:
    """A matplotlib figure of ``w`` × ``h`` inches on the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(records: list[RequestRecord], path: str) -> dict[str, list[float]]:
    ok = [r for r in records if r.success and r.path == path]
    return {
        "TTFT": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
        "TPOT": [t * 1e3 for r in ok if (t := r.tpot_s) is not None],
        "ITL": [x * 1e3 for r in ok for x in r.itl_s],
        "E2EL": [r.latency_s * 1e3 for r in ok if r.latency_s is not None],
    }


def write_plots(out_dir: Path, summary: dict[str, Any], records: list[RequestRecord]) -> list[Path]:
    """Write every plot that has data; return their paths."""
    import numpy as np

    written: list[Path] = []
    paths = sorted({r.path for r in records}, key=lambda p: p != "pipeline")
    series = {p: _series(records, p) for p in paths}
    title = f"{summary.get('run_id')}  {summary.get('label') or ''}".strip()

    if any(any(v for v in s.values()) for s in series.values()):

        def latency_panels(kind: str, ylabel: str, draw: Any) -> Any:
            # One panel per latency metric, one series per path: the CDF and histogram figures.
            fig = new_figure(11, 7.5)
            for ax, metric in zip(fig.subplots(2, 2).flatten(), ("TTFT", "TPOT", "ITL", "E2EL"), strict=True):
                for p in paths:
                    if series[p][metric]:
                        draw(ax, series[p][metric], p)
                ax.set_title(f"{metric} {kind}")
                ax.set_xlabel("ms")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                if ax.has_data():
                    ax.legend()
            return fig

        def cdf(ax: Any, values: list[float], p: str) -> None:
            vals = np.sort(np.asarray(values))
            ax.step(
                vals, np.arange(1, vals.size + 1) / vals.size, where="post", label=p, color=PATH_COLORS[p]
            )

        def hist(ax: Any, values: list[float], p: str) -> None:
            bins = min(50, max(5, int(math.sqrt(len(values)))))
            ax.hist(values, bins=bins, alpha=0.6, label=p, color=PATH_COLORS[p])

        fig = latency_panels("CDF", "fraction ≤ x", cdf)
        fig.suptitle(f"Latency distributions — {title}")
        written.append(_save(fig, out_dir / "latency_cdf.png"))
        fig = latency_panels("histogram", "count", hist)
        fig.suptitle(f"Latency histograms — {title}")
        written.append(_save(fig, out_dir / "latency_hist.png"))

        fig = new_figure(11, 7.5)
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        for p in paths:
            ok = [r for r in records if r.success and r.path == p and r.ttft_s is not None]
            xs = [r.sent_s for r in ok]
            ax1.scatter(xs, [r.ttft_s * 1e3 for r in ok], s=8, label=p, color=PATH_COLORS[p])  # type: ignore[operator]
            tx: list[float] = []
            ty: list[float] = []
            for r in ok:
                t = r.first_token_s if r.first_token_s is not None else r.sent_s + (r.ttft_s or 0)
                for gap in r.itl_s:
                    t += gap
                    tx.append(t)
                    ty.append(gap * 1e3)
            ax2.scatter(tx, ty, s=2, alpha=0.4, label=p, color=PATH_COLORS[p])
        ax1.set_ylabel("TTFT (ms)")
        ax1.set_title("TTFT by send time")
        ax2.set_ylabel("ITL (ms)")
        ax2.set_xlabel("seconds since the step started")
        ax2.set_title("Inter-token latency by token time")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend()
        fig.suptitle(f"Over time — {title}")
        written.append(_save(fig, out_dir / "timeline.png"))

    pipe = (summary.get("paths") or {}).get("pipeline")
    if pipe and pipe.get("stages"):
        fig = new_figure(11, 4.2)
        ax = fig.subplots()
        left = 0.0
        cmap = _colors(len(BREAKDOWN_NAMES))
        for i, name in enumerate(BREAKDOWN_NAMES):
            v = (pipe["stages"].get(name) or {}).get("mean_ms") or 0.0
            ax.barh(["pipeline"], [v], left=left, color=cmap[i], label=f"{name} {v:.1f} ms")
            left += v
        direct = (summary.get("paths") or {}).get("direct")
        if direct:
            ax.barh(
                ["direct"],
                [direct.get("mean_e2el_ms") or 0.0],
                color="#444444",
                label="direct E2EL",
            )
        ax.set_xlabel("mean ms per request")
        ax.set_title(f"Where a request's time goes (pipeline mean E2EL {pipe.get('mean_e2el_ms', 0):.1f} ms)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=5, fontsize="small")
        ax.grid(alpha=0.3, axis="x")
        written.append(_save(fig, out_dir / "stages.png"))

    sweep = summary.get("sweep")
    if sweep and sweep.get("steps"):
        steps = sweep["steps"]
        loads = [st["load"] for st in steps]
        fig = new_figure(11, 7.5)
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        for p in paths:
            m = [st["paths"].get(p) or {} for st in steps]
            ax1.plot(
                loads,
                [x.get("output_throughput") for x in m],
                "o-",
                label=f"{p} output tok/s",
                color=PATH_COLORS[p],
            )
            ax2.plot(
                loads,
                [x.get("median_ttft_ms") for x in m],
                "o-",
                label=f"{p} median TTFT",
                color=PATH_COLORS[p],
            )
            ax2.plot(
                loads,
                [x.get("median_e2el_ms") for x in m],
                "s--",
                label=f"{p} median E2EL",
                color=PATH_COLORS[p],
                alpha=0.6,
            )
        knee = sweep.get("knee") or {}
        if knee.get("knee_load") is not None:
            for ax in (ax1, ax2):
                ax.axvline(knee["knee_load"], color="red", ls=":", label="knee")
        ax1.set_ylabel("output tokens/s")
        ax2.set_ylabel("ms")
        ax2.set_xlabel(sweep.get("param", "load"))
        ax1.set_xscale("log", base=2)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"Throughput and latency against load — {title}")
        written.append(_save(fig, out_dir / "sweep.png"))
    return written


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path

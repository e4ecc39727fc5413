"""Rich renderings of a run summary and of a comparison (CLI, and usable in Textual)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bench.compare import Comparison
from bench.metrics import pkey
from bench.records import BREAKDOWN_NAMES


def fmt(v: Any, digits: int = 2) -> str:
    """A number for a table: ints with separators, floats with ``digits`` decimals, '—' for none."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _bytes(v: Any) -> str:
    return "—" if v is None else f"{v / 2**30:.2f} GiB"


def summary_renderables(summary: dict[str, Any]) -> list[RenderableType]:
    """Tables for a finished run: vLLM's result block per path, overhead, stages, extras, sweep."""
    out: list[RenderableType] = []
    paths: dict[str, dict[str, Any]] = summary.get("paths") or {}
    names = [p for p in ("pipeline", "direct") if p in paths]
    both = len(names) == 2
    head = Text()
    head.append(f"run {summary.get('run_id')}", style="bold")
    if summary.get("label"):
        head.append(f"  “{summary['label']}”")
    head.append(
        f"\nengine {summary.get('engine') or '?'} · model {summary.get('model_id') or '?'} · path {summary.get('path')}"
    )
    rate = summary.get("request_rate")
    head.append(
        f"\nload: max concurrency {fmt(summary.get('max_concurrency'))} · request rate {rate} req/s"
        f" · burstiness {summary.get('burstiness')} · {summary.get('input_tokens') or 'dataset'} in /"
        f" {summary.get('output_tokens')} out tokens · prefix share {summary.get('prefix_share')}"
    )
    out.append(head)

    t = Table(title="Serving Benchmark Result (vllm bench serve definitions)", title_justify="left")
    t.add_column("metric")
    for n in names:
        t.add_column(n, justify="right")
    if both:
        t.add_column("pipeline − direct", justify="right")
        t.add_column("ratio", justify="right")

    def row(label: str, key: str, digits: int = 2, overhead: bool = False) -> None:
        vals = [paths[n].get(key) for n in names]
        if all(v is None for v in vals):
            return
        cells = [fmt(v, digits) for v in vals]
        if both:
            ov = (summary.get("overhead") or {}).get(key) if overhead else None
            cells += [
                fmt(ov.get("diff")) if ov else "",
                (fmt(ov.get("ratio")) + "×") if ov and ov.get("ratio") else "",
            ]
        t.add_row(label, *cells)

    row("Successful requests", "completed")
    row("Failed requests", "failed")
    row("Benchmark duration (s)", "duration")
    row("Total input tokens", "total_input_tokens")
    row("Total generated tokens", "total_output_tokens")
    row("Request throughput (req/s)", "request_throughput", overhead=True)
    row("Request goodput (req/s)", "request_goodput")
    row("Output token throughput (tok/s)", "output_throughput", overhead=True)
    row("Peak output token throughput (tok/s)", "max_output_tokens_per_s")
    row("Peak concurrent requests", "max_concurrent_requests")
    row("Total token throughput (tok/s)", "total_token_throughput", overhead=True)
    pcts = summary.get("percentiles") or []
    # P50 is the median, which has its own row and column: shown once.
    shown = [p for p in pcts if p != 50.0]
    for m, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        t.add_section()
        for stat in ("mean", "median"):
            row(f"{stat.capitalize()} {name} (ms)", f"{stat}_{m}_ms", overhead=True)
        row(f"Std {name} (ms)", f"std_{m}_ms")
        for p in shown:
            row(f"{pkey(p).upper()} {name} (ms)", f"{pkey(p)}_{m}_ms", overhead=True)
    if any("mean_client_queue_time_ms" in paths[n] for n in names):
        t.add_section()
        row("Mean client queue time (ms)", "mean_client_queue_time_ms")
        row("Mean E2EL incl. client queue (ms)", "mean_e2el_including_client_queue_ms")
    out.append(t)
    if both and (summary.get("config") or {}).get("pipeline_api") == "openai":
        out.append(
            Text(
                "Pipeline through its OpenAI door: TTFT, TPOT, ITL and E2EL are timed by this client on both "
                "paths, so every difference is the pipeline's overhead.",
                style="dim",
            )
        )
    elif both:
        out.append(
            Text(
                "TTFT, TPOT and ITL: pipeline = engine-side (timed by the inference worker), direct = timed by this "
                "client; E2EL is client-timed on both paths: its difference is the pipeline's overhead.",
                style="dim",
            )
        )
    paired = summary.get("paired_e2el") if both else None
    if paired:
        # The same request on both paths: the median of its differences, not the medians' difference.
        tail = [p for p in pcts if p != 50.0]
        out.append(
            Text(
                "E2EL pipeline − direct, paired by request ("
                + f"{paired['pairs']} pairs): median {fmt(paired.get('median_e2el_diff_ms'))} ms"
                + "".join(
                    f", {pkey(p).upper()} {fmt(paired.get(f'{pkey(p)}_e2el_diff_ms'))} ms" for p in tail
                )
            )
        )

    x = Table(title="Client, pipeline and engine", title_justify="left")
    x.add_column("figure")
    for n in names:
        x.add_column(n, justify="right")

    def xrow(label: str, fn: Any) -> None:
        vals = [fn(paths[n]) for n in names]
        if all(v in (None, "—") for v in vals):
            return
        x.add_row(label, *[v if isinstance(v, str) else fmt(v) for v in vals])

    xrow(
        "Schedule lag mean / p99 / max (ms)",
        lambda m: " / ".join(
            fmt(m.get(k))
            for k in (
                "mean_schedule_lag_ms",
                f"{pkey(pcts[-1])}_schedule_lag_ms" if pcts else "",
                "max_schedule_lag_ms",
            )
        ),
    )
    xrow("Token count mismatches", lambda m: m.get("token_mismatches"))
    xrow("Cached prompt tokens (usage)", lambda m: m.get("total_cached_tokens"))
    xrow(
        "429 refusals / submit retries",
        lambda m: (
            f"{fmt(m.get('refused_429'))} / {fmt(m.get('submit_retries'))}"
            if "mean_engine_time_ms" in m
            else None
        ),
    )
    xrow("Redelivered jobs", lambda m: m.get("redelivered_jobs"))
    xrow("Engine time per job mean (ms)", lambda m: m.get("mean_engine_time_ms"))
    xrow(
        "Server-side overhead median / p90 / p99 (ms)",
        lambda m: (
            " / ".join(fmt(m.get(f"{k}_server_overhead_ms")) for k in ("median", "p90", "p99"))
            if "median_server_overhead_ms" in m
            else None
        ),
    )
    xrow(
        "Efficiency (engine / E2EL) mean",
        lambda m: _pct(m.get("mean_efficiency")) if "mean_efficiency" in m else None,
    )
    xrow(
        "Engine share of E2EL (Σ/Σ)",
        lambda m: _pct(m.get("engine_time_share")) if "engine_time_share" in m else None,
    )
    pc = summary.get("prefix_cache") or {}
    if pc:
        x.add_row(
            "Prefix cache hit rate (engine /metrics)",
            *[f"{_pct(pc.get('hit_rate'))} ({fmt(pc.get('hits'), 0)}/{fmt(pc.get('queries'), 0)} tok)"]
            * len(names),
        )
    cpu = summary.get("pipeline_cpu")
    if cpu:
        x.add_row(
            "Pipeline CPU: per job (ms) / per 1k tokens (s)",
            *[
                f"{fmt(cpu.get('per_job_ms'))} / {fmt(cpu.get('per_1k_tokens_s'), 3)}"
                if n == "pipeline"
                else "—"
                for n in names
            ],
        )
        x.add_row(
            "Pipeline CPU total (s) / cores busy",
            *[
                f"{fmt(cpu.get('cpu_s'))} / {fmt(cpu.get('cores'), 2)}" if n == "pipeline" else "—"
                for n in names
            ],
        )
    gpu = summary.get("gpu")
    if gpu:
        x.add_row("GPU util mean (run window)", *[fmt(gpu.get("util_mean_pct"), 1) + " %"] * len(names))
        x.add_row("GPU VRAM peak", *[_bytes(gpu.get("vram_peak_bytes"))] * len(names))
        x.add_row(
            "GPU energy (J) / per output token",
            *[f"{fmt(gpu.get('energy_j'), 1)} / {fmt(gpu.get('energy_per_output_token_j'), 4)}"] * len(names),
        )
    else:
        gj = (paths.get("pipeline") or {}).get("gpu_jobs")
        note = (gj or {}).get("reason") if gj else None
        x.add_row("GPU", *[f"no GPU samples{': ' + note if note else ''}"] * len(names))
    for n in names:
        for ex in paths[n].get("token_mismatch_examples") or []:
            x.add_row("  mismatch", ex if n == names[0] else "", *([""] * (len(names) - 1)))
        for err, count in (paths[n].get("errors") or {}).items():
            x.add_row(f"  error ×{count} ({n})", Text(err[:100], style="red"), *([""] * (len(names) - 1)))
    out.append(x)

    pipe = paths.get("pipeline")
    if pipe and pipe.get("stages"):
        st = Table(title="Pipeline stages per request (ms)", title_justify="left")
        st.add_column("stage")
        for c in ("mean", "median", *(pkey(p) for p in shown), "share of E2EL"):
            st.add_column(c, justify="right")
        for name in BREAKDOWN_NAMES:
            s = pipe["stages"].get(name) or {}
            st.add_row(
                name,
                fmt(s.get("mean_ms")),
                fmt(s.get("median_ms")),
                *[fmt(s.get(f"{pkey(p)}_ms")) for p in shown],
                _pct(s.get("share")),
            )
        st.add_row(
            Text("E2EL (client)", style="bold"),
            fmt(pipe.get("mean_e2el_ms")),
            fmt(pipe.get("median_e2el_ms")),
            *[fmt(pipe.get(f"{pkey(p)}_e2el_ms")) for p in shown],
            "100 %",
        )
        out.append(st)

    routing = summary.get("routing")
    if routing and routing.get("nodes"):
        out.append(routing_table(routing))

    sweep = summary.get("sweep")
    if sweep:
        sw = Table(title=f"Sweep over {sweep.get('param')}", title_justify="left")
        for c in (
            "step",
            sweep.get("param", "load"),
            "path",
            "req/s",
            "out tok/s",
            "gain",
            "median TTFT ms",
            "p99 E2EL ms" if 99.0 in pcts else "median E2EL ms",
            "failed",
        ):
            sw.add_column(c, justify="right")
        knee = sweep.get("knee") or {}
        gains = knee.get("gains") or []
        for st_ in sweep.get("steps") or []:
            i = st_["index"]
            mark = (
                " ◀ knee"
                if knee.get("knee_index") == i
                else (" saturated" if knee.get("saturated_index") == i else "")
            )
            for n, m in st_["paths"].items():
                sw.add_row(
                    f"{i}{mark}",
                    f"{st_.get('load'):g}",
                    n,
                    fmt(m.get("request_throughput")),
                    fmt(m.get("output_throughput")),
                    fmt(gains[i] if i < len(gains) else None),
                    fmt(m.get("median_ttft_ms")),
                    fmt(m.get("p99_e2el_ms") if 99.0 in pcts else m.get("median_e2el_ms")),
                    fmt(m.get("failed")),
                )
        out.append(sw)
        out.append(
            Text(
                f"knee: {sweep.get('param')} {fmt(knee.get('knee_load'), 0) if sweep.get('param') == 'concurrency' else fmt(knee.get('knee_load'))} — {knee.get('reason')}",
                style="bold",
            )
        )
    for w in summary.get("warnings") or []:
        out.append(Text(f"warning: {w}", style="yellow"))
    return out


def routing_table(routing: dict[str, Any]) -> Table:
    """Per-node figures of a run: share of jobs, prefix-cache hit rate, in-flight peak, TTFT."""
    groups = routing.get("prefix_groups")
    t = Table(
        title=f"Nodes (routing {routing.get('policy') or 'default'}"
        f"{f', {groups} prefix groups' if groups else ''}): hotspot {fmt(routing.get('hotspot'))}"
        f" (1.00 = even) · hit rate {_pct(routing.get('hit_rate'))} of {_pct(routing.get('hit_rate_allowed'))}"
        f" the workload allows",
        title_justify="left",
    )
    for c in ("node", "jobs", "share", "hit rate", "in flight peak", "median TTFT ms"):
        t.add_column(c, justify="left" if c == "node" else "right")
    for name, n in (routing.get("nodes") or {}).items():
        t.add_row(
            name,
            fmt(n.get("jobs")),
            _pct(n.get("share")),
            _pct(n.get("hit_rate")),
            fmt(n.get("in_flight_peak")),
            fmt(n.get("median_ttft_ms")),
        )
    return t


def summary_group(summary: dict[str, Any]) -> Group:
    """:func:`summary_renderables` as one renderable."""
    return Group(*summary_renderables(summary))


def comparison_table(c: Comparison) -> Table:
    """Runs A and B side by side with B − A and B / A, coloured where B is better or worse."""

    def policy(s: dict[str, Any]) -> str:
        name = (s.get("routing") or {}).get("policy")
        return f" [routing {name}]" if name else ""

    # A Text, not markup: "[routing kv_events]" would be read as a style tag and vanish.
    t = Table(
        title=Text(
            f"A = {c.a.run_id} ({c.a.summary.get('label') or c.a.out_dir}){policy(c.a.summary)}   "
            f"B = {c.b.run_id} ({c.b.summary.get('label') or c.b.out_dir}){policy(c.b.summary)}"
        ),
        title_justify="left",
    )
    for col, just in (
        ("", "left"),
        ("metric", "left"),
        ("A", "right"),
        ("B", "right"),
        ("B − A", "right"),
        ("B / A", "right"),
        ("", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    last = None
    for r in c.rows:
        if last is not None and r.section != last:
            t.add_section()
        style = {"better": "green", "worse": "red"}.get(r.verdict, "")
        t.add_row(
            r.section if r.section != last else "",
            r.label,
            fmt(r.a),
            fmt(r.b),
            fmt(r.diff),
            (fmt(r.ratio, 3) + "×") if r.ratio is not None else "—",
            Text(r.verdict, style=style),
        )
        last = r.section
    return t

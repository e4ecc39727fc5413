"""One job: its per-stage breakdown (a bar per stage), result, GPU figures and error."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from console.model import DASH, Snapshot, bar, fmt_bytes, fmt_num, fmt_s
from console.widgets import JOB_STYLES
from services.contracts import STAGES, JobView

if TYPE_CHECKING:
    from console.app import ConsoleApp

BAR_WIDTH = 28


def stage_lines(job: JobView, width: int = BAR_WIDTH) -> list[str]:
    """One line per stage: name, duration, a bar scaled to the longest stage, share of the total."""
    durations = [job.stages_s.get(st.name) for st in STAGES]
    known = [d for d in durations if d is not None and d > 0]
    longest = max(known, default=0.0)
    total = sum(known)
    lines = []
    for st, d in zip(STAGES, durations, strict=True):
        if d is None:
            lines.append(f"{st.name:<13} {DASH:>8}")
            continue
        frac = d / longest if longest > 0 else 0.0
        share = f"{d / total * 100:5.1f}%" if total > 0 else ""
        style = "$accent" if st.name in ("engine_ttft", "decode") else "$primary"
        lines.append(f"{st.name:<13} [b]{fmt_s(d):>8}[/]  [{style}]{bar(frac, width)}[/] {share}")
    lines.append(f"{'total':<13} [b]{fmt_s(total if known else None):>8}[/]")
    return lines


def stage_legend() -> list[str]:
    """What each stage measures (from the contracts' stage descriptions)."""
    return [f"[dim]{st.name:<13} {escape(st.description)}[/]" for st in STAGES]


def job_text(job: JobView) -> str:
    """The whole detail page as Textual markup."""
    spec, r = job.spec, job.result
    style = JOB_STYLES.get(job.state, "")
    out = [
        f"[b]{escape(job.job_id)}[/]  [{style}]{job.state.value}[/]  attempt {job.attempt}"
        f"  worker {escape(job.worker or DASH)}",
    ]
    if spec is not None:
        out.append(
            f"asked: in [b]{fmt_num(spec.input_tokens)}[/] tok, out [b]{spec.output_tokens:,}[/] tok, "
            f"prefix share {spec.prefix_share:.2f}, run {escape(spec.run_id or DASH)}"
            + (f", label {escape(spec.label)}" if spec.label else "")
        )
    out += ["", "[b]Stages[/]", *stage_lines(job), ""]
    if r is not None:
        tps = r.completion_tokens / r.decode_s if r.decode_s > 0 else None
        out += [
            "[b]Result[/]",
            f"engine {escape(r.engine)} · model {escape(r.model)} · node {escape(r.node)}",
            f"tokens in [b]{r.prompt_tokens:,}[/] (cached {fmt_num(r.cached_tokens)}, prefix {r.prefix_tokens:,})"
            f" · out [b]{r.completion_tokens:,}[/] · finish {escape(r.finish_reason or DASH)}",
            f"TTFT [b]{fmt_s(r.ttft_s)}[/] · decode [b]{fmt_s(r.decode_s)}[/]"
            f" · engine (GPU) time [b]{fmt_s(r.engine_time_s)}[/]"
            f" · {fmt_num(tps)} tok/s",
        ]
        if r.itl_s:
            itl = sorted(r.itl_s)
            p99 = itl[min(len(itl) - 1, int(len(itl) * 0.99))]
            out.append(
                f"inter-token: mean [b]{fmt_s(statistics.fmean(itl))}[/] · median {fmt_s(statistics.median(itl))}"
                f" · p99 {fmt_s(p99)} · max {fmt_s(itl[-1])}"
            )
        for m in r.token_mismatch:
            out.append(f"[$warning]⚠ {escape(m)}[/]")
        g = r.gpu
        if g is not None:
            if g.available:
                out.append(
                    f"GPUs {g.gpu_count} · util {fmt_num(g.util_mean_pct)}% · VRAM peak "
                    f"{fmt_bytes(g.vram_peak_bytes)}/{fmt_bytes(g.vram_total_bytes)} · power "
                    f"{fmt_num(g.power_mean_w)} W · energy {fmt_num(g.energy_j)} J"
                    + (f" ({g.energy_per_output_token_j:.3f} J/token)" if g.energy_per_output_token_j else "")
                )
            else:
                out.append(f"GPU: [dim]{escape(g.reason or 'not available')}[/]")
        out.append("")
    if job.error:
        out += ["[b $error]Error[/]", escape(job.error), ""]
    out += ["[b]What the stages measure[/]", *stage_legend()]
    return "\n".join(out)


class JobScreen(Screen[None]):
    """A job's per-stage breakdown; follows the job while it runs."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]  # noqa: RUF012

    def __init__(self, job: JobView) -> None:
        super().__init__()
        self.job = job

    def compose(self) -> ComposeResult:
        """Header, the detail text, footer."""
        yield Header(icon="◆")
        with VerticalScroll(id="job-scroll"):
            yield Static(job_text(self.job), id="job-text")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        """Title the screen after the job."""
        self.sub_title = f"job {self.job.job_id}"

    def show_snapshot(self, snap: Snapshot) -> None:
        """Redraw if the snapshot carries a newer view of this job."""
        capp: ConsoleApp = self.app  # type: ignore[assignment]
        newer = next((j for j in snap.jobs.jobs if j.job_id == self.job.job_id), None)
        if newer is None and not self.job.state.terminal:
            capp.refresh_job(self)
            return
        if newer is not None and newer != self.job:
            self.show_job(newer)

    def show_job(self, job: JobView) -> None:
        """Draw ``job``."""
        self.job = job
        self.query_one("#job-text", Static).update(job_text(job))

"""Benchmarks: the launcher form, live progress, a run's results and plots, the runs list, comparison.

The form builds a :class:`bench.config.BenchConfig` on every keystroke, so
what it accepts is exactly what ``llmconsole bench`` accepts, with the same
messages. A run goes on in the background (its own event loop thread) while
the operator looks elsewhere; the screen is installed once, so coming back
shows the run still going.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    Select,
    Static,
    TabbedContent,
    TabPane,
)
from textual_plotext import PlotextPlot

from bench.compare import Comparison, compare_summaries
from bench.config import BenchConfig, ProgressEvent
from bench.render import comparison_table, summary_group
from bench.runner import BenchError, RunResult
from console.collector import BackgroundLoop
from console.model import DASH, fmt_num, fmt_rate
from console.plots import plot_latency_cdf, plot_stages, plot_sweep, plot_timeline
from console.sources import BenchSource, RunRow, SourceDown

if TYPE_CHECKING:
    from console.app import ConsoleApp

#: Form fields: (BenchConfig field, label, input type).
FORM_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("input_tokens", "input tokens", "integer"),
    ("output_tokens", "output tokens", "integer"),
    ("prefix_share", "prefix share", "number"),
    ("requests", "requests", "integer"),
    ("load_value", "concurrency", "number"),
    ("label", "label", "text"),
)
LOAD_KINDS = (("concurrency", "concurrency"), ("rate (req/s)", "rate"))
PATHS = (("pipeline", "pipeline"), ("direct (engine API)", "direct"), ("both", "both"))


def form_to_config(
    values: dict[str, str], load_kind: str, path: str
) -> tuple[BenchConfig | None, dict[str, str]]:
    """Build a BenchConfig from the form's text; return it, or None and a message per field."""
    errors: dict[str, str] = {}
    data: dict[str, Any] = {"path": path}
    for name, label, kind in FORM_FIELDS:
        text = values.get(name, "").strip()
        if not text:
            if name in ("requests", "load_value"):
                errors[name] = f"{label if name != 'load_value' else load_kind}: required"
            continue  # token counts and prefix share fall back to the stack's defaults
        if kind == "integer":
            try:
                value: Any = int(text)
            except ValueError:
                errors[name] = f"{label}: a whole number"
                continue
        elif kind == "number":
            try:
                value = float(text)
            except ValueError:
                errors[name] = f"{label}: a number"
                continue
        else:
            value = text
        if name == "load_value":
            if load_kind == "concurrency":
                if float(value) != int(value):
                    errors[name] = "concurrency: a whole number"
                    continue
                data["concurrency"] = int(value)
            else:
                data["rate"] = float(value)
        else:
            data[name] = value
    try:
        config = BenchConfig.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = str(err["loc"][0]) if err["loc"] else ""
            field = "load_value" if loc in ("concurrency", "rate") else loc
            label = dict((n, lbl) for n, lbl, _ in FORM_FIELDS).get(field, loc or "form")
            if field == "load_value":
                label = load_kind
            errors.setdefault(field, f"{label}: {_message(err)}")
        return None, errors
    if errors:
        return None, errors
    return config, {}


def _message(err: Any) -> str:
    """A pydantic error as a short phrase: 'at most 131072', 'at least 1'."""
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    if kind == "less_than_equal":
        return f"at most {ctx.get('le')}"
    if kind == "greater_than_equal":
        return f"at least {ctx.get('ge')}"
    if kind == "greater_than":
        return f"more than {ctx.get('gt')}"
    if kind == "less_than":
        return f"less than {ctx.get('lt')}"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


def describe_progress(ev: ProgressEvent) -> str:
    """One status line for a progress event."""
    step = f" · step {ev.step + 1}/{ev.steps}" if ev.steps > 1 else ""
    load = f" · {ev.load}" if ev.load else ""
    failed = f" · [$error]{ev.failed} failed[/]" if ev.failed else ""
    msg = f" · {escape(ev.message)}" if ev.message else ""
    if ev.warning:
        msg += f" · [$warning]{escape(ev.warning)}[/]"
    return f"{ev.phase} {ev.done}/{ev.total}{failed}{step}{load} · {ev.elapsed_s:.1f}s{msg}"


def run_cells(r: RunRow, marked: bool) -> tuple[str, ...]:
    """Cells of one row of the runs list."""
    return (
        r.run_id,
        "✓" if marked else " ",
        r.date or DASH,
        r.state,
        (r.label or "")[:20],
        r.path,
        fmt_num(r.completed),
        fmt_rate(r.request_throughput, ""),
        fmt_rate(r.output_throughput, ""),
        r.progress[:30],
    )


def flip_tab(screen: Screen[None], step: int) -> None:
    """Show the next (or previous) visible tab of the screen's TabbedContent."""
    tabs = screen.query_one(TabbedContent)
    ids = [p.id for p in tabs.query(TabPane) if p.id and tabs.get_tab(p.id).display]
    if tabs.active in ids:
        tabs.active = ids[(ids.index(tabs.active) + step) % len(ids)]


class _TabbedScreen(Screen[None]):
    """A screen of tabs with keys to flip through them."""

    BINDINGS = [  # noqa: RUF012
        Binding("escape", "app.pop_screen", "Back"),
        Binding("n", "flip(1)", "Next tab"),
        Binding("N", "flip(-1)", "Previous tab", show=False),
    ]

    def action_flip(self, step: int) -> None:
        """Show the next (or previous) tab."""
        flip_tab(self, step)


class BenchScreen(Screen[None]):
    """Launch a run, watch it, and browse earlier runs."""

    BINDINGS = [  # noqa: RUF012
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+t", "flip(1)", "Launch/Runs", priority=True),
        Binding("ctrl+r", "launch", "Run", priority=True),
        Binding("ctrl+x", "cancel_run", "Cancel run", priority=True),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare"),
    ]

    def __init__(self) -> None:
        super().__init__(id="bench")
        self.config: BenchConfig | None = None
        self.running = False
        self.last_event: ProgressEvent | None = None
        self.last_result: RunResult | None = None
        self.rows: list[RunRow] = []
        self.marked: list[str] = []

    @property
    def capp(self) -> ConsoleApp:
        """The console app (typed)."""
        return self.app  # type: ignore[return-value]

    @property
    def bench(self) -> BenchSource | None:
        """The benchmark library (None when the console runs without one)."""
        return self.capp.bench

    def compose(self) -> ComposeResult:
        """Two tabs: the launcher and the runs list."""
        yield Header(icon="◆")
        with TabbedContent(initial="launch", id="bench-tabs"):
            with TabPane("Launch", id="launch"), Horizontal(id="launch-body"):
                with Vertical(id="bench-form"):
                    yield from self._input_row("input_tokens")
                    yield from self._input_row("output_tokens")
                    yield from self._input_row("prefix_share")
                    yield from self._input_row("requests")
                    with Horizontal(classes="form-row"):
                        yield Label("load", classes="form-label")
                        yield Select(
                            LOAD_KINDS, value="concurrency", allow_blank=False, compact=True, id="f-load"
                        )
                    yield from self._input_row("load_value")
                    with Horizontal(classes="form-row"):
                        yield Label("path", classes="form-label")
                        yield Select(PATHS, value="pipeline", allow_blank=False, compact=True, id="f-path")
                    yield from self._input_row("label")
                    yield Static(id="form-errors")
                    with Horizontal(classes="form-row"):
                        yield Button("Run ^r", id="start", variant="success", compact=True)
                        yield Button("Cancel ^x", id="cancel", variant="error", compact=True, disabled=True)
                    yield ProgressBar(id="bench-progress", show_eta=False)
                    yield Static(id="bench-status")
                with VerticalScroll(id="bench-last"):
                    yield Static(
                        "Fill in the form and press ctrl+r: the run goes on in the background; "
                        "its summary and plots open when it ends.",
                        id="bench-last-text",
                    )
            with TabPane("Runs", id="runs"):
                table: DataTable[Any] = DataTable(id="runs-table", cursor_type="row")
                for col in (
                    "",
                    "run",
                    "date",
                    "state",
                    "label",
                    "path",
                    "done",
                    "req/s",
                    "out tok/s",
                    "progress",
                ):
                    table.add_column(col, key=col or "mark")
                yield table
                yield Static("Enter opens a run · space marks · c compares the two marked", id="runs-hint")
        yield Footer(compact=True)

    @staticmethod
    def _input_row(name: str) -> ComposeResult:
        label, kind = next((lbl, k) for n, lbl, k in FORM_FIELDS if n == name)
        with Horizontal(classes="form-row"):
            yield Label(label, id=f"label-{name}", classes="form-label")
            yield Input(id=f"f-{name}", type=kind, compact=True, classes="form-input")  # type: ignore[arg-type]

    def on_mount(self) -> None:
        """Fill the form with the stack's defaults; read-only consoles only browse runs."""
        defaults = self._defaults()
        for name, value in defaults.items():
            self.query_one(f"#f-{name}", Input).value = value
        if self.capp.readonly or self.bench is None:
            self.query_one("#bench-tabs", TabbedContent).hide_tab("launch")
            self.query_one("#bench-tabs", TabbedContent).active = "runs"
        else:
            self.query_one("#f-input_tokens", Input).focus()
        self.query_one("#bench-progress", ProgressBar).display = False
        self.validate_form()
        self.set_interval(0.25, self._show_progress)
        self.set_interval(max(self.capp.refresh_s, 2.0), self._auto_refresh_runs)
        self.refresh_runs()

    def _defaults(self) -> dict[str, str]:
        s = getattr(self.bench, "settings", None)
        return {
            "input_tokens": str(s.input_tokens) if s else "1000",
            "output_tokens": str(s.output_tokens) if s else "500",
            "prefix_share": f"{s.prefix_share:g}" if s else "0.5",
            "requests": "100",
            "load_value": "16",
            "label": "",
        }

    def on_resize(self, event: events.Resize) -> None:
        """Space the form out when the terminal has the rows for it."""
        self.set_class(event.size.height >= 34, "-tall")

    def on_screen_resume(self) -> None:
        """Coming back: refresh the runs list."""
        self.refresh_runs()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """No launching in read-only mode; Run/Cancel only when they can act."""
        if action in ("launch", "cancel_run"):
            if self.capp.readonly or self.bench is None:
                return False
            if action == "launch":
                return not self.running and self.config is not None
            return self.running
        if action in ("mark", "compare"):
            return self.query_one("#bench-tabs", TabbedContent).active == "runs"
        return True

    def action_flip(self, step: int) -> None:
        """Switch between the launcher and the runs list."""
        flip_tab(self, step)

    # -- form ------------------------------------------------------------------
    def form_values(self) -> dict[str, str]:
        """The text of every input."""
        return {name: self.query_one(f"#f-{name}", Input).value for name, _l, _k in FORM_FIELDS}

    @on(Input.Changed)
    @on(Select.Changed)
    def _form_changed(self, event: Input.Changed | Select.Changed) -> None:
        if isinstance(event, Select.Changed) and event.select.id == "f-load":
            self.query_one("#label-load_value", Label).update(
                "concurrency" if event.value == "concurrency" else "rate (req/s)"
            )
        self.validate_form()

    def validate_form(self) -> BenchConfig | None:
        """Rebuild the config from the form; mark bad fields and list their messages."""
        load_kind = str(self.query_one("#f-load", Select).value)
        path = str(self.query_one("#f-path", Select).value)
        config, errors = form_to_config(self.form_values(), load_kind, path)
        for name, _l, _k in FORM_FIELDS:
            self.query_one(f"#f-{name}", Input).set_class(name in errors, "-invalid")
        box = self.query_one("#form-errors", Static)
        if errors:
            box.update("\n".join(f"[$error]✖[/] {escape(m)}" for m in errors.values()))
        else:
            box.update("[$success]✔[/] ready")
        self.config = config
        self.query_one("#start", Button).disabled = config is None or self.running
        self.refresh_bindings()
        return config

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.action_launch()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel_run()

    # -- running -----------------------------------------------------------------
    def action_launch(self) -> None:
        """Start a run with the form's config."""
        if self.capp.readonly or self.bench is None or self.running:
            return
        config = self.validate_form()
        if config is None:
            self.notify("fix the form first", severity="warning")
            return
        self.running = True
        self.last_event = None
        self.query_one("#start", Button).disabled = True
        self.query_one("#cancel", Button).disabled = False
        bar = self.query_one("#bench-progress", ProgressBar)
        bar.update(total=1, progress=0)
        bar.display = True
        self.query_one("#bench-status", Static).update("starting…")
        self.refresh_bindings()
        self.run_bench(config)

    def action_cancel_run(self) -> None:
        """Cancel the running benchmark (it is stored as failed: cancelled)."""
        if self.running:
            self.workers.cancel_group(self, "bench-run")

    def _progress(self, ev: ProgressEvent) -> None:
        # Called on the run's own loop thread after every request: only keep the latest
        # event (a plain attribute write); the UI timer draws it 4 times a second.
        self.last_event = ev

    def _show_progress(self) -> None:
        ev = self.last_event
        if ev is None or not self.running:
            return
        bar = self.query_one("#bench-progress", ProgressBar)
        bar.update(total=max(ev.total, 1), progress=ev.done)
        self.query_one("#bench-status", Static).update(describe_progress(ev))

    @work(exclusive=True, group="bench-run", exit_on_error=False)
    async def run_bench(self, config: BenchConfig) -> None:
        """Run the benchmark on its own event loop thread; show the result when it ends."""
        assert self.bench is not None
        loop = BackgroundLoop("llmconsole-bench")
        fut = loop.submit(self.bench.run(config, self._progress))
        status = self.query_one("#bench-status", Static)
        t0 = time.monotonic()
        try:
            result = await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            status.update("[$warning]cancelled[/]")
            self.notify("benchmark cancelled", severity="warning")
            raise
        except (BenchError, SourceDown, ValueError) as e:
            status.update(f"[$error]✖ {escape(str(e))}[/]")
            self.notify(f"benchmark failed: {e}", severity="error", timeout=10)
            return
        except Exception as e:  # the run's own bug must not take the console down
            status.update(f"[$error]✖ {type(e).__name__}: {escape(str(e))}[/]")
            self.notify(f"benchmark failed: {type(e).__name__}: {e}", severity="error", timeout=10)
            return
        finally:
            self.running = False
            self.query_one("#cancel", Button).disabled = True
            self.validate_form()
            await asyncio.to_thread(loop.close, _drain())
        self.last_result = result
        done = result.summary.get("completed")
        status.update(
            f"[$success]✔ finished[/] {escape(result.run_id)} · {fmt_num(done)} done in {time.monotonic() - t0:.1f}s"
        )
        bar = self.query_one("#bench-progress", ProgressBar)
        bar.update(total=max(bar.total or 1, 1), progress=bar.total or 1)
        self.query_one("#bench-last-text", Static).update(summary_group(result.summary))
        self.refresh_runs()
        self.app.push_screen(RunScreen(result))

    # -- runs list -----------------------------------------------------------------
    def _auto_refresh_runs(self) -> None:
        tabs = self.query_one("#bench-tabs", TabbedContent)
        if self.is_current and tabs.active == "runs" and not self.capp.paused:
            self.refresh_runs()

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_bindings()
        if event.pane.id == "runs":
            self.refresh_runs()
            self.query_one("#runs-table", DataTable).focus()

    @work(exclusive=True, group="runs", exit_on_error=False)
    async def refresh_runs(self) -> None:
        """Reload the runs list."""
        if self.bench is None:
            self.query_one("#runs-hint", Static).update("no benchmark library in this console")
            return
        try:
            rows = await self.capp.bg.run(self.bench.runs())
        except SourceDown as e:
            self.query_one("#runs-hint", Static).update(f"[$error]✖[/] {escape(str(e))}")
            return
        self.rows = rows
        self._draw_runs()

    def _draw_runs(self) -> None:
        from console.widgets import sync_rows

        table = self.query_one("#runs-table", DataTable)
        sync_rows(table, [(r.run_id, run_cells(r, r.run_id in self.marked)) for r in self.rows])

    def _selected_run(self) -> RunRow | None:
        table = self.query_one("#runs-table", DataTable)
        if not self.rows or table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(
            (min(max(table.cursor_row, 0), table.row_count - 1), 0)
        ).row_key.value
        return next((r for r in self.rows if r.run_id == key), None)

    def action_mark(self) -> None:
        """Mark or unmark the selected run for comparison (the last two marks count)."""
        row = self._selected_run()
        if row is None:
            return
        if row.run_id in self.marked:
            self.marked.remove(row.run_id)
        else:
            self.marked = [*self.marked, row.run_id][-2:]
        self._draw_runs()

    @on(DataTable.RowSelected, "#runs-table")
    def _run_selected(self) -> None:
        row = self._selected_run()
        if row is not None:
            self.open_run(row.run_id)

    @work(group="open-run", exit_on_error=False)
    async def open_run(self, run_id: str) -> None:
        """Load a run and show it."""
        assert self.bench is not None
        try:
            result = await self.capp.bg.run(self.bench.load(run_id))
        except SourceDown as e:
            self.notify(str(e), severity="error", timeout=8)
            return
        self.app.push_screen(RunScreen(result))

    @work(group="open-run", exit_on_error=False)
    async def action_compare(self) -> None:
        """Compare the two marked runs."""
        if len(self.marked) != 2 or self.bench is None:
            self.notify("mark two runs with space first", severity="warning")
            return
        try:
            a = await self.capp.bg.run(self.bench.load(self.marked[0]))
            b = await self.capp.bg.run(self.bench.load(self.marked[1]))
        except SourceDown as e:
            self.notify(str(e), severity="error", timeout=8)
            return
        self.app.push_screen(CompareScreen(a, b))


async def _drain() -> None:
    """Let a cancelled run's clean-up (marking it failed in Redis) finish before its loop stops."""
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    if rest:
        await asyncio.wait(rest, timeout=5.0)


class RunScreen(_TabbedScreen):
    """One run: its summary tables and plots."""

    def __init__(self, result: RunResult) -> None:
        super().__init__()
        self.result = result

    def compose(self) -> ComposeResult:
        """Summary and plot tabs."""
        yield Header(icon="◆")
        with TabbedContent(id="run-tabs"):
            with TabPane("Summary", id="run-summary"), VerticalScroll():
                yield Static(summary_group(self.result.summary), id="run-summary-text")
            with TabPane("TTFT", id="plot-ttft"):
                yield PlotextPlot(id="plot-ttft-cdf")
            with TabPane("Latency", id="plot-e2el"):
                yield PlotextPlot(id="plot-e2el-cdf")
            with TabPane("Timeline", id="plot-timeline"):
                yield PlotextPlot(id="plot-timeline-plot")
            with TabPane("Stages", id="plot-stages"):
                yield PlotextPlot(id="plot-stages-plot")
            if self.result.summary.get("sweep"):
                with TabPane("Sweep", id="plot-sweep"):
                    yield PlotextPlot(id="plot-sweep-plot")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        """Draw the plots once (the run does not change)."""
        self.sub_title = f"run {self.result.run_id}"
        recs = self.result.records
        plot_latency_cdf(self.query_one("#plot-ttft-cdf", PlotextPlot).plt, [("", recs)], "ttft")
        plot_latency_cdf(self.query_one("#plot-e2el-cdf", PlotextPlot).plt, [("", recs)], "e2el")
        plot_timeline(self.query_one("#plot-timeline-plot", PlotextPlot).plt, recs)
        plot_stages(self.query_one("#plot-stages-plot", PlotextPlot).plt, recs)
        if self.result.summary.get("sweep"):
            plot_sweep(self.query_one("#plot-sweep-plot", PlotextPlot).plt, self.result.summary)


class CompareScreen(_TabbedScreen):
    """Two runs side by side (bench's comparison table) and their TTFT distributions."""

    def __init__(self, a: RunResult, b: RunResult) -> None:
        super().__init__()
        self.a = a
        self.b = b

    def compose(self) -> ComposeResult:
        """Table tab and plot tab."""
        yield Header(icon="◆")
        comparison = Comparison(self.a, self.b, compare_summaries(self.a.summary, self.b.summary))
        with TabbedContent(id="compare-tabs"):
            with TabPane("Table", id="compare-table"), VerticalScroll():
                yield Static(comparison_table(comparison), id="compare-text")
            with TabPane("TTFT", id="compare-ttft"):
                yield PlotextPlot(id="compare-ttft-plot")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        """Overlay both runs' TTFT CDFs."""
        self.sub_title = f"A {self.a.run_id} · B {self.b.run_id}"
        plot_latency_cdf(
            self.query_one("#compare-ttft-plot", PlotextPlot).plt,
            [("A", self.a.records), ("B", self.b.records)],
            "ttft",
        )

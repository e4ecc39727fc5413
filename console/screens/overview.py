"""The overview: Queue, Engine, GPUs and Services panels over the live Jobs table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input

from console.model import Snapshot
from console.rowtable import RowTable
from console.screens.dialogs import ConfirmScreen, PickScreen
from console.sources import SourceDown
from console.widgets import EnginePanel, GpuPanel, JobsPanel, QueuePanel, ServicesPanel

if TYPE_CHECKING:
    from console.app import ConsoleApp

#: Terminal sizes at which the layout grows (columns for 4 panels in a row, rows for taller panels).
WIDE_COLUMNS = 150
TALL_ROWS = 36

#: Actions that change something; ``--readonly`` removes them everywhere.
CONTROL_ACTIONS = frozenset({"restart", "stop", "start", "drain"})


class OverviewScreen(Screen[None]):
    """Everything at a glance; select a service to control it, a job to open it."""

    BINDINGS = [  # noqa: RUF012 - Textual's own class-level convention
        Binding("enter", "open", "Open", priority=True),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("r", "restart", "Restart"),
        Binding("s", "stop", "Stop"),
        Binding("S", "start", "Start", key_display="S"),
        Binding("l", "logs", "Logs"),
        # Not in the footer (80 columns are full); the help's GPUs line names it.
        Binding("d", "drain", "Drain node", show=False),
    ]

    def __init__(self) -> None:
        super().__init__(id="overview")
        self.filter_text = ""

    @property
    def capp(self) -> ConsoleApp:
        """The console app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """Header, the four panels, the jobs table, the filter line, the footer."""
        yield Header(icon="◆")
        with Grid(id="panels"):
            yield QueuePanel(id="queue")
            yield EnginePanel(id="engine")
            yield GpuPanel(id="gpus")
            yield ServicesPanel(id="services")
        yield JobsPanel(id="jobs")
        yield Input(placeholder="filter jobs and services (Enter keeps, Esc clears)", id="filter")
        # The palette (ctrl+p) is listed by `?`; at 80 columns the footer needs its room for the keys.
        yield Footer(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        """Start with the jobs table focused and the filter hidden."""
        self.query_one("#filter", Input).display = False
        self.query_one("#jobs-table", RowTable).focus()
        self._apply_size(self.size.width, self.size.height)
        if self.capp.snapshot is not None:
            self.show_snapshot(self.capp.snapshot)

    def on_screen_resume(self) -> None:
        """Coming back from another screen: draw the latest snapshot at once."""
        if self.capp.snapshot is not None:
            self.show_snapshot(self.capp.snapshot)

    def on_resize(self, event: events.Resize) -> None:
        """Grow the layout with the terminal."""
        self._apply_size(event.size.width, event.size.height)

    def _apply_size(self, width: int, height: int) -> None:
        self.set_class(width >= WIDE_COLUMNS, "-wide")
        self.set_class(height >= TALL_ROWS, "-tall")
        # 80x24 has no room for the services header row; taller terminals show it.
        self.query_one("#services-table", DataTable).show_header = height >= TALL_ROWS

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide service control in read-only mode."""
        if action in CONTROL_ACTIONS and self.capp.readonly:
            return False
        return True

    # -- drawing -------------------------------------------------------------
    def show_snapshot(self, snap: Snapshot) -> None:
        """Draw one snapshot in every panel."""
        model = next((n.model for n in snap.gpus.nodes if n.alive and n.model), "")
        self.query_one(QueuePanel).show(snap.queue)
        self.query_one(EnginePanel).show(snap.engine, model)
        self.query_one(GpuPanel).show(snap.gpus)
        self.query_one(ServicesPanel).show(snap.services, self.filter_text)
        self.query_one(JobsPanel).show(snap.jobs, self.filter_text)

    def _redraw(self) -> None:
        if self.capp.snapshot is not None:
            self.show_snapshot(self.capp.snapshot)

    # -- filter --------------------------------------------------------------
    def action_filter(self) -> None:
        """Show and focus the filter line."""
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._redraw()

    def action_clear_filter(self) -> None:
        """Clear and hide the filter."""
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.filter_text = ""
        self._redraw()
        self.query_one("#jobs-table", RowTable).focus()

    # -- detail --------------------------------------------------------------
    def action_open(self) -> None:
        """Enter: open the selected job, or the selected service's log; keep the filter."""
        focused = self.focused
        if isinstance(focused, Input):
            focused.display = bool(focused.value)
            self.query_one("#jobs-table", RowTable).focus()
            return
        if focused is not None and focused.id == "services-table":
            self.action_logs()
            return
        job = self.query_one(JobsPanel).selected()
        if job is not None:
            self.capp.open_job(job)

    @on(RowTable.RowSelected, "#jobs-table")
    def _job_clicked(self, event: RowTable.RowSelected) -> None:
        job = self.query_one(JobsPanel).selected()
        if job is not None:
            self.capp.open_job(job)

    # -- service control -------------------------------------------------------
    def _service(self) -> Any:
        svc = self.query_one(ServicesPanel).selected()
        if svc is None:
            self.notify("No service selected (is supervisord running?)", severity="warning")
        return svc

    def action_restart(self) -> None:
        """Restart the selected program."""
        if (svc := self._service()) is not None:
            self.capp.control_service("restart", svc.full_name)

    def action_start(self) -> None:
        """Start the selected program."""
        if (svc := self._service()) is not None:
            self.capp.control_service("start", svc.full_name)

    def action_stop(self) -> None:
        """Stop the selected program, after asking."""
        if (svc := self._service()) is not None:
            self.capp.confirm_stop(svc.full_name)

    def action_logs(self) -> None:
        """Tail the selected program's log."""
        if (svc := self._service()) is not None:
            self.capp.open_logs(svc.full_name)

    # -- nodes -------------------------------------------------------------------
    def action_drain(self) -> None:
        """Drain a node (pick it when several are up), after asking."""
        snap = self.capp.snapshot
        up = [n.node for n in snap.gpus.nodes if n.state == "up"] if snap is not None else []
        if not up:
            self.notify("No node to drain: none is up", severity="warning")
        elif len(up) == 1:
            self._confirm_drain(up[0])
        else:
            self.app.push_screen(
                PickScreen("Drain which node?", up), lambda node: self._confirm_drain(node) if node else None
            )

    def _confirm_drain(self, node: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._drain(node)

        self.app.push_screen(
            ConfirmScreen(f"Drain {node}? It finishes its running jobs and takes no new ones."), answered
        )

    @work(group="control", exit_on_error=False)
    async def _drain(self, node: str) -> None:
        if self.capp.readonly:
            self.notify("read-only console: node control is off", severity="warning")
            return
        try:
            await self.capp.bg.run(self.capp.sources.nodes.drain(node))
        except SourceDown as e:
            self.notify(f"drain {node} failed: {e}", severity="error", timeout=8)
            return
        self.notify(f"{node}: draining (no new jobs)", timeout=3)
        if not self.capp.paused:
            await self.capp.collect_now()

"""The llmconsole Textual app: collection workers, screens, service control.

Collection runs on :class:`~console.collector.BackgroundLoop` (an event loop
in its own thread), driven by an exclusive worker that skips a tick while the
previous collection is still running, so it never overlaps itself and the UI
thread only draws finished snapshots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding

from console.collector import BackgroundLoop, Collector
from console.commands import BindingCommands, key_actions
from console.model import Snapshot
from console.screens.dialogs import ConfirmScreen, HelpScreen
from console.screens.job import JobScreen
from console.screens.logs import LogScreen
from console.screens.overview import CONTROL_ACTIONS, OverviewScreen
from console.sources import BenchSource, SourceDown, Sources
from services.contracts import JobView

log = logging.getLogger("llmconsole.console")

#: The shortest refresh interval allowed (seconds).
MIN_REFRESH_S = 0.25
DEFAULT_REFRESH_S = 1.0


class ConsoleApp(App[None]):
    """The operator console: live telemetry, service control and benchmark runs."""

    CSS_PATH = Path(__file__).with_name("llmconsole.tcss")
    TITLE = "llmconsole"
    COMMANDS = {BindingCommands}  # noqa: RUF012 - Textual's class-level convention
    BINDINGS = [  # noqa: RUF012
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("b", "bench", "Bench"),
        Binding("p", "pause", "Pause"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        sources: Sources,
        *,
        bench: BenchSource | None = None,
        refresh_s: float = DEFAULT_REFRESH_S,
        readonly: bool = False,
        demo: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        job_limit: int = 100,
    ) -> None:
        if refresh_s < MIN_REFRESH_S:
            raise ValueError(f"refresh interval must be at least {MIN_REFRESH_S} s (got {refresh_s:g})")
        super().__init__()
        self.sources = sources
        self.bench = bench
        self.refresh_s = refresh_s
        self.readonly = readonly
        self.demo = demo
        self.collector = Collector(sources, job_limit=job_limit, clock=clock, wall=wall)
        self.bg = BackgroundLoop()
        self.snapshot: Snapshot | None = None
        self.paused = False
        self._collecting = False

    # -- lifecycle -------------------------------------------------------------
    def on_mount(self) -> None:
        """Show the overview, collect now, then every ``refresh_s``."""
        self._update_subtitle()
        self.push_screen(OverviewScreen())
        self.tick()
        self.set_interval(self.refresh_s, self.tick)

    def on_unmount(self) -> None:
        """Close every client on the background loop, then stop it."""
        self.bg.close(self.sources.aclose())

    def _update_subtitle(self) -> None:
        parts = [f"refresh {self.refresh_s:g}s"]
        if self.paused:
            parts.append("PAUSED")
        if self.readonly:
            parts.append("read-only")
        if self.demo:
            parts.append("demo data")
        self.sub_title = " · ".join(parts)

    # -- collection --------------------------------------------------------------
    def tick(self) -> None:
        """Start a collection unless paused or one is still running."""
        if self.paused or self._collecting:
            return
        self._collecting = True
        self.collect()

    @work(exclusive=True, group="collect", exit_on_error=False)
    async def collect(self) -> None:
        """Collect one snapshot off the UI thread and draw it."""
        try:
            snap = await self.bg.run(self.collector.collect())
            self.apply_snapshot(snap)
        finally:
            self._collecting = False

    async def collect_now(self) -> Snapshot:
        """Collect and draw one snapshot right away (tests, and after a control action)."""
        snap = await self.bg.run(self.collector.collect())
        self.apply_snapshot(snap)
        return snap

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Keep ``snap`` and draw it on the visible screen."""
        self.snapshot = snap
        show = getattr(self.screen, "show_snapshot", None)
        if show is not None:
            show(snap)

    # -- actions -------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide service control in read-only mode."""
        if action in CONTROL_ACTIONS and self.readonly:
            return False
        return True

    def action_pause(self) -> None:
        """Pause or resume refreshing."""
        self.paused = not self.paused
        self._update_subtitle()
        self.notify("Refresh paused" if self.paused else "Refresh resumed", timeout=2)
        if not self.paused:
            self.tick()

    def action_help(self) -> None:
        """Show the keys of the current screen and what the panels mean."""
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(key_actions(self.screen), self.readonly, self.refresh_s))

    def action_bench(self) -> None:
        """Open the benchmark launcher and runs list."""
        from console.screens.bench import BenchScreen  # plotext is imported only when needed

        if isinstance(self.screen, BenchScreen):
            return
        if not self.is_screen_installed("bench"):
            self.install_screen(BenchScreen(), name="bench")
        self.push_screen("bench")

    def open_job(self, job: JobView) -> None:
        """Open a job's per-stage breakdown."""
        self.push_screen(JobScreen(job))

    def open_logs(self, program: str) -> None:
        """Open the log view of a program."""
        self.push_screen(LogScreen(program))

    @work(group="job")
    async def refresh_job(self, screen: JobScreen) -> None:
        """Read one job fresh (it fell off the recent list while its screen is open)."""
        try:
            view = await self.bg.run(self.sources.jobs.job(screen.job.job_id))
        except SourceDown:
            return
        if view is not None and screen.is_attached:
            screen.show_job(view)

    # -- service control -------------------------------------------------------------
    def confirm_stop(self, program: str) -> None:
        """Ask before stopping a program."""

        def answered(yes: bool | None) -> None:
            if yes:
                self.control_service("stop", program)

        self.push_screen(ConfirmScreen(f"Stop {program}?"), answered)

    @work(group="control", exit_on_error=False)
    async def control_service(self, action: str, program: str) -> None:
        """Restart, stop or start a program through supervisord."""
        if self.readonly or action not in CONTROL_ACTIONS:
            self.notify("read-only console: service control is off", severity="warning")
            return
        self.notify(f"{action} {program}…", timeout=2)
        fn = getattr(self.sources.supervisor, action)
        try:
            await self.bg.run(fn(program))
        except SourceDown as e:
            self.notify(f"{action} {program} failed: {e}", severity="error", timeout=8)
            return
        self.notify(f"{action} {program}: done", timeout=3)
        if not self.paused:
            await self.collect_now()

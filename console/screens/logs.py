"""A program's log, tailed through supervisord's ``tailProcessStdoutLog``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Log

from console.sources import SourceDown

if TYPE_CHECKING:
    from console.app import ConsoleApp

#: First read: the last this many bytes of the log; later reads continue from the offset.
TAIL_BYTES = 64 * 1024


class LogScreen(Screen[None]):
    """Follows one program's log at the refresh interval."""

    BINDINGS = [  # noqa: RUF012
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "clear", "Clear"),
        Binding("f", "follow", "Follow"),
    ]

    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program
        self.log_offset = 0
        self.error: str | None = None

    @property
    def capp(self) -> ConsoleApp:
        """The console app (typed)."""
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        """Header, the log, footer."""
        yield Header(icon="◆")
        yield Log(id="log", max_lines=5000, auto_scroll=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        """Read the log's tail now, then follow it."""
        self.sub_title = f"log · {self.program}"
        self.query_one(Log).border_title = f"{self.program} (stdout, via supervisord)"
        self.poll()
        self.set_interval(self.capp.refresh_s, self.poll)

    def action_clear(self) -> None:
        """Clear what is shown (the log file is untouched)."""
        self.query_one(Log).clear()

    def action_follow(self) -> None:
        """Jump to the end and keep following."""
        log = self.query_one(Log)
        log.auto_scroll = True
        log.scroll_end(animate=False)

    @work(exclusive=True, group="tail")
    async def poll(self) -> None:
        """Read what was appended since the last read."""
        if self.capp.paused:
            return
        try:
            chunk = await self.capp.bg.run(
                self.capp.sources.supervisor.tail(self.program, self.log_offset, TAIL_BYTES)
            )
        except SourceDown as e:
            if str(e) != self.error:
                self.query_one(Log).write_line(f"✖ {e}")
            self.error = str(e)
            return
        self.error = None
        log = self.query_one(Log)
        if chunk.overflow and self.log_offset:
            log.write_line("… (skipped: the log grew faster than it was read)")
        if chunk.text:
            log.write(chunk.text)
        self.log_offset = chunk.offset

"""Small modal screens: confirmation and help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Button, OptionList, Static
from textual.widgets.option_list import Option

from console.commands import KeyAction

PANELS_HELP = """\
[b]Queue[/]     waiting (not yet delivered), in flight, done, failed/dead, done/s and in/s (over the last 5 s); sparkline = depth from zero
          redis = Redis memory used/maxmemory; kept = finished jobs Redis retains, then the oldest one's age
[b]Engine[/]    the engine's /metrics: running/waiting requests, KV cache use, prefix cache hit rate
          (hits/queries over the last 5 s), prompt and generation tokens per second
[b]GPUs[/]      every node: up, draining or lost, in flight / capacity, share of the recent jobs,
          engine, prefix-cache hit rate (d drains one); per GPU: utilisation, temperature,
          power, VRAM, and which service holds the memory
[b]Services[/]  supervisord programs: state, pid, uptime (select one for r/s/S/l)
[b]Jobs[/]      recent jobs: tokens in/out, queue wait, engine (GPU) time, TTFT, end-to-end; Enter opens one
"""


class ConfirmScreen(ModalScreen[bool]):
    """Ask a yes/no question; dismisses with True for yes."""

    BINDINGS = [  # noqa: RUF012
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        """The question and two buttons."""
        with Vertical(id="confirm-box"):
            yield Static(escape(self.question), id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        """Default to no."""
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """A button answers."""
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        """A key answers."""
        self.dismiss(yes)


class PickScreen(ModalScreen[str | None]):
    """Pick one of a few names (e.g. the node to drain); dismisses with it, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]  # noqa: RUF012

    def __init__(self, title: str, names: list[str]) -> None:
        super().__init__()
        self.title_text = title
        self.names = names

    def compose(self) -> ComposeResult:
        """The title and the list."""
        with Vertical(id="pick-box"):
            yield Static(escape(self.title_text), id="pick-title")
            yield OptionList(*(Option(escape(n), id=n) for n in self.names), id="pick-list")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        """Enter (or a click) picks."""
        self.dismiss(event.option.id)


class HelpScreen(ModalScreen[None]):
    """The keys of the screen it was opened from (the same list the palette offers), and the panels."""

    BINDINGS = [  # noqa: RUF012
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, keys: list[KeyAction], readonly: bool, refresh_s: float) -> None:
        super().__init__()
        self.keys = keys
        self.readonly = readonly
        self.refresh_s = refresh_s

    def compose(self) -> ComposeResult:
        """Keys, then what each panel shows."""
        lines = ["[b]Keys[/] (ctrl+p offers the same list as commands)", ""]
        for k in self.keys:
            lines.append(f"  [b $accent]{escape(k.key):>8}[/]  {escape(k.description)}")
        lines.append(f"  [b $accent]{'ctrl+p':>8}[/]  command palette")
        lines += ["", "[b]Panels[/]", PANELS_HELP]
        mode = "read-only: no service control, no benchmark launch" if self.readonly else "full control"
        lines.append(f"refresh every {self.refresh_s:g}s · {mode}")
        with VerticalScroll(id="help-box"):
            yield Static("\n".join(lines), id="help-text")

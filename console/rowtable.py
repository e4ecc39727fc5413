"""A read-only table for live rows that change every refresh (the jobs table).

Textual's DataTable re-renders every visible cell whenever any cell changes, and re-measures
its columns; with jobs arriving every second that was most of the console's CPU. This
table renders each row once per distinct content and reuses the rendered line while the
row only moves down the list, so a refresh costs about one line per new or changed job.

Rows are ``(key, cells)`` with rich ``Text`` cells. The cursor stays on its row (by key)
as rows arrive above it; at the top it stays at the top and so follows the newest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

#: Blank cells on each side of a cell (as DataTable's default cell padding).
PAD = 1

Signature = tuple[tuple[str, object, tuple[object, ...]], ...]


def signature(cells: Sequence[Text]) -> Signature:
    """What a row looks like: its cells' text and styles (rows with equal signatures render alike)."""
    return tuple((c.plain, c.style, tuple(c.spans)) for c in cells)


class RowTable(ScrollView, can_focus=True):
    """A fast, read-only table with a row cursor and a fixed header."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"rowtable--header", "rowtable--cursor"}
    DEFAULT_CSS = """
    RowTable {
        background: $surface;
        color: $foreground;
        overflow-x: hidden;
        & > .rowtable--header {
            text-style: bold;
            color: $text-muted;
        }
        & > .rowtable--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
        }
        &:focus > .rowtable--cursor {
            background: $block-cursor-background;
            color: $block-cursor-foreground;
            text-style: $block-cursor-text-style;
        }
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "edge(-1)", "First", show=False),
        Binding("end", "edge(1)", "Last", show=False),
    ]

    cursor_row: reactive[int] = reactive(0)

    class RowSelected(Message):
        """A row was chosen (clicked twice, or Enter through the owner's binding)."""

        def __init__(self, table: RowTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> RowTable:
            """The table the row belongs to."""
            return self.table

    def __init__(self, columns: Sequence[str], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.columns = [Text(c) for c in columns]
        self._keys: list[str] = []
        self._cells: dict[str, tuple[Text, ...]] = {}
        self._sigs: dict[str, Signature] = {}
        self._widths_of: dict[str, tuple[int, ...]] = {}
        self._widths: tuple[int, ...] = tuple(c.cell_len for c in self.columns)
        self._lines: LRUCache[tuple[object, ...], Strip] = LRUCache(1024)

    # -- data ----------------------------------------------------------------------
    @property
    def row_count(self) -> int:
        """Number of rows."""
        return len(self._keys)

    @property
    def row_keys(self) -> list[str]:
        """Row keys, top to bottom."""
        return list(self._keys)

    def get_row_at(self, index: int) -> tuple[Text, ...]:
        """The cells of the row at ``index``."""
        return self._cells[self._keys[index]]

    @property
    def cursor_key(self) -> str | None:
        """Key of the row under the cursor."""
        if not self._keys:
            return None
        return self._keys[min(max(self.cursor_row, 0), len(self._keys) - 1)]

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Text]]]) -> None:
        """Show ``rows`` (key, cells) in this order; unchanged rows keep their rendering."""
        old_key = self.cursor_key if self.cursor_row > 0 else None
        keys: list[str] = []
        cells_of: dict[str, tuple[Text, ...]] = {}
        sigs: dict[str, Signature] = {}
        widths_of: dict[str, tuple[int, ...]] = {}
        for key, cells in rows:
            if key in cells_of:
                continue
            row = tuple(cells)
            sig = signature(row)
            keys.append(key)
            cells_of[key] = row
            sigs[key] = sig
            # Measure only rows that are new or changed.
            if self._sigs.get(key) == sig:
                widths_of[key] = self._widths_of[key]
            else:
                widths_of[key] = tuple(c.cell_len for c in row)
        widths = [c.cell_len for c in self.columns]
        for w in widths_of.values():
            for i, n in enumerate(w[: len(widths)]):
                if n > widths[i]:
                    widths[i] = n
        if keys == self._keys and sigs == self._sigs and tuple(widths) == self._widths:
            return  # nothing to draw
        self._keys, self._cells, self._sigs, self._widths_of = keys, cells_of, sigs, widths_of
        self._widths = tuple(widths)
        self.virtual_size = Size(sum(widths) + 2 * PAD * len(widths), len(keys) + 1)
        if old_key is not None and old_key in cells_of:
            self.cursor_row = keys.index(old_key)
        else:
            self.cursor_row = min(self.cursor_row, max(len(keys) - 1, 0))
        self._scroll_cursor_into_view()
        self.refresh()

    # -- cursor ----------------------------------------------------------------------
    def move_cursor(self, *, row: int) -> None:
        """Put the cursor on row ``row``."""
        self.cursor_row = min(max(row, 0), max(len(self._keys) - 1, 0))

    def watch_cursor_row(self) -> None:
        """Keep the cursor visible and redraw."""
        self._scroll_cursor_into_view()
        self.refresh()

    def _scroll_cursor_into_view(self) -> None:
        body = max(self.size.height - 1, 1)
        top = self.scroll_offset.y
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + body:
            self.scroll_to(y=self.cursor_row - body + 1, animate=False)

    def action_cursor(self, step: int) -> None:
        """Move the cursor by ``step`` rows."""
        self.move_cursor(row=self.cursor_row + step)

    def action_page(self, step: int) -> None:
        """Move the cursor by a page."""
        self.move_cursor(row=self.cursor_row + step * max(self.size.height - 2, 1))

    def action_edge(self, step: int) -> None:
        """Move the cursor to the first or last row."""
        self.move_cursor(row=0 if step < 0 else len(self._keys) - 1)

    def on_click(self, event: events.Click) -> None:
        """Click selects a row; clicking the selected row again opens it."""
        if event.y < 1:
            return
        index = self.scroll_offset.y + event.y - 1
        if not 0 <= index < len(self._keys):
            return
        if index == self.cursor_row:
            self.post_message(self.RowSelected(self, self._keys[index]))
        self.move_cursor(row=index)

    # -- rendering -------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        """Line ``y`` of the widget: the header, then rows from the scroll position."""
        width = self.size.width
        base = self.rich_style
        if y == 0:
            header = self.get_component_rich_style("rowtable--header")
            return self._strip(("header",), self.columns, base + header, width)
        index = self.scroll_offset.y + y - 1
        if index >= len(self._keys):
            return Strip.blank(width, base)
        key = self._keys[index]
        cursor = index == self.cursor_row
        style = base + self.get_component_rich_style("rowtable--cursor") if cursor else base
        return self._strip((key, self._sigs[key], cursor, self.has_focus), self._cells[key], style, width)

    def _strip(self, ident: tuple[object, ...], cells: Sequence[Text], style: Style, width: int) -> Strip:
        cache_key = (*ident, self._widths, width, style)
        strip = self._lines.get(cache_key)
        if strip is None:
            line = Text(no_wrap=True, overflow="crop", end="")
            for cell, w in zip(cells, self._widths, strict=False):
                line.append(" " * PAD)
                piece = cell.copy()
                piece.truncate(w, pad=True)
                line.append_text(piece)
                line.append(" " * PAD)
            segments = [
                Segment(s.text, style + s.style if s.style else style) for s in line.render(self.app.console)
            ]
            strip = Strip(segments).crop_extend(0, width, style)
            self._lines[cache_key] = strip
        return strip

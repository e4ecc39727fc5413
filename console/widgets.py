"""The overview's panels. Each one draws a part of a :class:`~console.model.Snapshot`.

Panels never fetch anything: :meth:`show` takes the view and redraws. A view
with an ``error`` makes the panel say so plainly in place of its data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.cells import cell_len
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.markup import escape
from textual.widget import Widget
from textual.widgets import DataTable, Static

from console.model import (
    DASH,
    EngineView,
    GpusView,
    GpuView,
    JobsView,
    NodeView,
    QueueView,
    ServicesView,
    ServiceView,
    bar,
    fmt_bytes,
    fmt_bytes_pair,
    fmt_num,
    fmt_pct,
    fmt_rate,
    fmt_s,
    fmt_uptime,
    spark_rows,
)
from console.rowtable import RowTable
from services.contracts import JobState, JobView

#: Styles of supervisord states and job states.
SERVICE_STYLES = {
    "RUNNING": "green",
    "STARTING": "yellow",
    "STOPPING": "yellow",
    "BACKOFF": "bold red",
    "FATAL": "bold red",
    "EXITED": "red",
    "STOPPED": "dim",
    "UNKNOWN": "magenta",
}
JOB_STYLES = {
    JobState.QUEUED: "cyan",
    JobState.RUNNING: "yellow",
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "bold red",
    JobState.DEAD: "bold magenta",
}


def set_text(widget: Static, markup: str) -> None:
    """Update a Static only when its text changes (an update re-lays out the screen)."""
    if getattr(widget, "_llmc_markup", None) != markup:
        widget._llmc_markup = markup  # type: ignore[attr-defined]
        widget.update(markup)


def error_markup(message: str) -> str:
    """A panel's 'source down' line."""
    return f"[$error]✖[/] {escape(message)}"


def sync_rows(table: DataTable[Any], rows: Sequence[tuple[str, Sequence[Any]]]) -> None:
    """Make ``table`` show ``rows`` (key, cells) in that order, touching as little as possible.

    Rows that stay keep their rendered cells (only changed cells are updated), new rows are
    added, gone rows removed, then the table is re-ordered. A full rebuild every refresh
    would re-measure every row and costs most of the console's CPU on a busy stack. The
    first cell of each row must be a unique string (it is what the re-ordering sorts on).
    The cursor stays on its row (by key); at the top it stays at the top, following new rows.
    """
    wanted: dict[str, Sequence[Any]] = {}
    for key, cells in rows:
        wanted.setdefault(key, cells)
    keys = list(wanted)
    shown = [r.key.value for r in table.ordered_rows]
    if shown == keys:
        _update_cells(table, wanted)
        return
    selected: str | None = None
    if table.row_count and 0 < table.cursor_row < table.row_count:
        selected = shown[table.cursor_row]
    gone = [k for k in shown if k not in wanted]
    if len(gone) > len(shown) // 2:
        table.clear()
        shown = []
    else:
        for key in gone:
            table.remove_row(key)
    present = set(shown) - set(gone)
    _update_cells(table, {k: c for k, c in wanted.items() if k in present})
    for key, cells in wanted.items():
        if key not in present:
            table.add_row(*cells, key=key)
    if [r.key.value for r in table.ordered_rows] != keys:
        position = {str(cells[0]): i for i, cells in enumerate(wanted.values())}
        table.sort(key=lambda values: position.get(str(values[0]), len(position)))
    if selected in wanted:
        table.move_cursor(row=keys.index(selected), animate=False)


def _update_cells(table: DataTable[Any], rows: dict[str, Sequence[Any]]) -> None:
    columns = list(table.columns.items())
    for key, cells in rows.items():
        old = table.get_row(key)
        for col, (before, after) in enumerate(zip(old, cells, strict=False)):
            if before != after:
                column_key, column = columns[col]
                # Widen the column if the new value needs it; never ask the table to
                # re-measure a whole column for a narrower value (that scan is expensive).
                width = after.cell_len if isinstance(after, Text) else cell_len(str(after))
                table.update_cell(key, column_key, after, update_width=width > column.content_width)


class Panel(Vertical):
    """A bordered box with a title."""

    DEFAULT_CLASSES = "panel"

    def __init__(self, title: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.border_title = title
        self._subtitle = ""

    def subtitle(self, markup: str) -> None:
        """Set the border subtitle only when it changes (setting it redraws the panel)."""
        if markup != self._subtitle:
            self._subtitle = markup
            self.border_subtitle = markup


class DepthSpark(Widget):
    """Queue depth over the last refreshes, from zero to the peak, as wide and tall as it is laid out."""

    DEFAULT_CSS = "DepthSpark { height: 2; }"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.values: tuple[float, ...] = ()

    def show(self, values: tuple[float, ...]) -> None:
        """New history: redraw."""
        if values != self.values:
            self.values = values
            self.refresh()

    def render(self) -> Text:
        """The bars (coloured by the stylesheet)."""
        rows = spark_rows(self.values, self.size.width, max(self.size.height, 1))
        if not rows:
            return Text()
        text = Text(no_wrap=True, end="")
        for row in rows[:-1]:
            text.append(row + "\n")
        # A dim baseline where the queue was empty, so an idle queue still draws a line.
        seen = min(len(self.values), len(rows[-1]))
        head, tail = rows[-1][: len(rows[-1]) - seen], rows[-1][len(rows[-1]) - seen :]
        text.append(head)
        for ch in tail:
            if ch == " ":
                text.append("▁", style="dim")
            else:
                text.append(ch)
        return text


class QueuePanel(Panel):
    """Depth, in flight, done, failed/dead, throughput, and a sparkline of depth."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("Queue", **kw)

    def compose(self) -> ComposeResult:
        """Figures on top, the depth sparkline under them."""
        yield Static(id="queue-text")
        yield DepthSpark(id="queue-spark")

    def show(self, q: QueueView) -> None:
        """Draw ``q``."""
        text = self.query_one("#queue-text", Static)
        self.query_one("#queue-spark", DepthSpark).show(q.depth_history)
        if q.error:
            set_text(text, error_markup(q.error))
            self.subtitle("")
            return
        set_text(
            text,
            f"waiting [b]{q.waiting:>7,}[/]  in flight [b]{q.in_flight:>5,}[/]\n"
            f"done    [b $success]{q.succeeded:>7,}[/]  failed/dead "
            f"[b {'$error' if q.failed or q.dead else ''}]{q.failed:,}/{q.dead:,}[/]\n"
            f"done/s  [b]{fmt_rate(q.done_per_s, ''):>7}[/]  in/s [b]{fmt_rate(q.submitted_per_s, '')}[/]"
            + _retention_lines(q),
        )
        peak = max(q.depth_history, default=0)
        self.subtitle(f"depth peak {peak:,.0f} · {q.consumers} consumers")


def _retention_lines(q: QueueView) -> str:
    """One line: Redis memory used/limit, final jobs retained and the oldest one's age."""
    if q.redis_used is None:
        return ""
    share = q.redis_used / q.redis_limit if q.redis_limit else None
    style = "$error" if share is not None and share >= 0.9 else "$warning" if share and share >= 0.75 else "b"
    if q.redis_limit:
        mem = fmt_bytes_pair(q.redis_used, q.redis_limit)
    else:
        mem = f"{fmt_bytes(q.redis_used)}/∞"
    for unit in ("TiB", "GiB", "MiB", "KiB"):  # '0.4/6.0 GiB' → '0.4/6.0G': the line fits 32 columns
        mem = mem.replace(f" {unit}", unit[0])
    kept = DASH if q.retained is None else _count(q.retained)
    age = f" [dim]{fmt_uptime(int(q.oldest_age_s))}[/]" if q.oldest_age_s is not None else ""
    return f"\nredis [{style}]{mem}[/] kept [b]{kept}[/]{age}"


def _count(n: int) -> str:
    """48210 → '48.2k', 1234567 → '1.2M' (short, for one line)."""
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


class EnginePanel(Panel):
    """The engine's running/waiting requests, KV cache, prefix hits and token rates."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("Engine", **kw)

    def compose(self) -> ComposeResult:
        """One text block."""
        yield Static(id="engine-text")

    def show(self, e: EngineView, model: str = "") -> None:
        """Draw ``e`` (``model`` from the node heartbeat, if known)."""
        text = self.query_one("#engine-text", Static)
        self.subtitle(escape(model))
        if e.error:
            set_text(text, error_markup(e.error))
            return
        kv = e.kv_usage
        kv_style = (
            "$error" if kv is not None and kv > 0.9 else "$warning" if kv is not None and kv > 0.7 else ""
        )
        set_text(
            text,
            f"running [b]{fmt_num(e.running):>5}[/]  waiting [b]{fmt_num(e.waiting):>5}[/]\n"
            f"KV cache [{kv_style or 'b'}]{bar(kv, 12)}[/] [b]{fmt_pct(kv)}[/]\n"
            f"prefix cache hits [b]{fmt_pct(e.prefix_hit_rate)}[/]\n"
            f"tok/s prompt [b]{fmt_rate(e.prompt_tps, '')}[/]  gen [b]{fmt_rate(e.generation_tps, '')}[/]\n"
            f"[dim]finished {fmt_num(e.requests_total)} · preempted {fmt_num(e.preemptions)}[/]",
        )


#: GPU samples older than this are marked as old (nodes publish about every second).
STALE_GPU_S = 10.0


def _gpu_lines(g: GpuView, compact: bool) -> list[str]:
    util = DASH if g.util_pct is None else f"{g.util_pct:.0f}%"
    temp = DASH if g.temp_c is None else f"{g.temp_c:.0f}°C"
    power = DASH if g.power_w is None else f"{g.power_w:.0f}W"
    frac = None
    if g.vram_used_bytes is not None and g.vram_total_bytes:
        frac = g.vram_used_bytes / g.vram_total_bytes
    vram = fmt_bytes_pair(g.vram_used_bytes, g.vram_total_bytes)
    head = f"[b]{g.index}[/] {escape(g.name.removeprefix('NVIDIA '))} [b]{util}[/] {temp} {power}"
    if g.age_s is not None and g.age_s > STALE_GPU_S:
        # A node that stopped publishing: its last figures, marked as old.
        head += f" [$warning]{fmt_uptime(int(g.age_s))} old[/]"
    if compact:
        short = DASH
        if g.vram_used_bytes is not None and g.vram_total_bytes:
            short = f"{g.vram_used_bytes / 2**30:.0f}/{g.vram_total_bytes / 2**30:.0f}G"
        return [f"{head} [b]{short}[/]"]
    lines = [head, f"VRAM [$accent]{bar(frac, 10)}[/] [b]{vram}[/]"]
    for p in g.processes[:3]:
        who = f"[b]{escape(p.program)}[/] pid {p.pid}" if p.program else f"pid {p.pid}"
        lines.append(f"  {who} {fmt_bytes(p.vram_bytes)}")
    return lines


#: How each node state is drawn.
NODE_STATE_MARKUP = {
    "up": "[$success]up[/]",
    "draining": "[$warning]draining[/]",
    "lost": "[$error]lost[/]",
}


def node_lines(n: NodeView, sampled: bool) -> list[str]:
    """Two lines for a node: name, state, in flight / capacity, share of the recent jobs; then
    engine, prefix-cache hit rate and (when its GPUs publish no samples) its GPUs in words."""
    state = NODE_STATE_MARKUP.get(n.state, escape(n.state))
    if n.state == "lost":
        return [f"[b]{escape(n.node)}[/] {state}", "  [dim]no heartbeat: gets no jobs[/]"]
    cap = f"/{n.capacity}" if n.capacity else ""
    share = DASH if n.share is None else f"{n.share * 100:.0f}%"
    head = f"[b]{escape(n.node)}[/] {state} [b]{n.in_flight}{cap}[/] · {share} jobs"
    engine = n.engine.replace("(llmconsole simulator ", "").removesuffix(")") if n.engine else DASH
    detail = [f"hit {fmt_pct(n.hit_rate)}", escape(engine)]
    if n.gpus and not sampled:
        detail.append(escape(n.gpus))
    return [head, "  [dim]" + " · ".join(detail) + "[/]"]


class GpuPanel(Panel):
    """Every node (state, in flight / capacity, engine, hit rate, share of jobs) and its GPUs.

    Per GPU: name, utilisation, temperature, power, VRAM, and the services holding it.
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__("GPUs", **kw)

    def compose(self) -> ComposeResult:
        """A scrollable text block (many GPUs do not fit 80×24)."""
        scroll = VerticalScroll(id="gpu-scroll")
        scroll.can_focus = False  # Tab moves between the two tables only
        with scroll:
            yield Static(id="gpu-text")

    def show(self, g: GpusView) -> None:
        """Draw ``g``: every node (state, in flight / capacity, engine, hit rate, share), its GPUs."""
        text = self.query_one("#gpu-text", Static)
        nodes_up = sum(1 for n in g.nodes if n.state == "up")
        self.subtitle(f"{nodes_up}/{len(g.nodes)} nodes up" if g.nodes else "")
        lines: list[str] = []
        compact = len(g.gpus) > 1 or len(g.nodes) > 1
        shown: set[str] = set()
        for n in g.nodes:
            own = [gpu for gpu in g.gpus if gpu.node == n.node]
            lines += node_lines(n, bool(own))
            lines += [line for gpu in own for line in _gpu_lines(gpu, compact)]
            shown.add(n.node)
        # GPUs of no registered node (this host's NVML before its worker registers).
        last_node = None
        for gpu in (x for x in g.gpus if x.node not in shown):
            if g.nodes and gpu.node != last_node:
                lines.append(f"[dim]{escape(gpu.node)}[/]")
                last_node = gpu.node
            lines += _gpu_lines(gpu, compact)
        if not g.gpus:
            lines.append(f"[$warning]No GPU[/]: {escape(g.no_gpu_reason or 'no samples')}")
            if g.error:
                lines.append(error_markup(g.error))
            set_text(text, "\n".join(lines))
            return
        if compact:
            # One summary line per service across GPUs instead of per-GPU process lists.
            per: dict[str, int] = {}
            for gpu in g.gpus:
                for p in gpu.processes:
                    per[p.program or "other"] = per.get(p.program or "other", 0) + p.vram_bytes
            if per:
                lines.append(" ".join(f"[b]{escape(k)}[/] {fmt_bytes(v)}" for k, v in per.items()))
        if g.error:
            lines.append(error_markup(g.error))
        set_text(text, "\n".join(lines))


def service_cells(s: ServiceView) -> tuple[str, Text, str, str]:
    """The cells of one service row: name, state, pid, uptime."""
    return (
        s.full_name,
        Text(s.state, style=SERVICE_STYLES.get(s.state, "")),
        str(s.pid) if s.pid else DASH,
        fmt_uptime(s.uptime_s),
    )


class ServicesPanel(Panel):
    """Every supervisord program with state, pid and uptime; the selected row is what r/s/S/l act on."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("Services", **kw)
        self.services: tuple[ServiceView, ...] = ()

    def compose(self) -> ComposeResult:
        """A table, and the line that replaces it when supervisord is down."""
        table: DataTable[Any] = DataTable(id="services-table", cursor_type="row", zebra_stripes=False)
        table.add_column("program", key="name")
        table.add_column("state", key="state")
        table.add_column("pid", key="pid")
        table.add_column("uptime", key="uptime")
        yield table
        yield Static(id="services-error")

    def show(self, v: ServicesView, filter_text: str = "") -> None:
        """Draw ``v`` (rows matching ``filter_text`` only)."""
        table = self.query_one("#services-table", DataTable)
        err = self.query_one("#services-error", Static)
        if v.error:
            set_text(err, error_markup(v.error))
            err.display = True
            table.display = False
            self.services = ()
            self.subtitle("")
            return
        err.display = False
        table.display = True
        f = filter_text.lower()
        shown = tuple(s for s in v.services if not f or f in s.full_name.lower() or f in s.state.lower())
        self.services = shown
        sync_rows(table, [(s.full_name, service_cells(s)) for s in shown])
        running = sum(1 for s in v.services if s.state == "RUNNING")
        self.subtitle(f"{running}/{len(v.services)} running")

    def selected(self) -> ServiceView | None:
        """The service under the cursor."""
        table = self.query_one("#services-table", DataTable)
        if not self.services or not table.display or table.row_count == 0:
            return None
        row = min(max(table.cursor_row, 0), len(self.services) - 1)
        key = table.coordinate_to_cell_key((row, 0)).row_key.value
        return next((s for s in self.services if s.full_name == key), None)


def job_cells(j: JobView) -> tuple[Text, ...]:
    """The cells of one job row."""
    r = j.result
    spec = j.spec
    tok_in = r.prompt_tokens if r else (spec.input_tokens if spec else None)
    tok_out = r.completion_tokens if r else (spec.output_tokens if spec else None)
    ts = j.timestamps
    e2e = None
    if ts.get("t_received") and ts.get("t_finished"):
        e2e = (ts["t_finished"] - ts["t_received"]) / 1e9  # type: ignore[operator]
    run = (spec.label or spec.run_id or "") if spec else ""
    tps = r.completion_tokens / r.decode_s if r and r.decode_s > 0 else None
    plain = (
        j.job_id[-12:],  # the id's random tail: unique in practice, and what the table sorts on
        j.state.value,
        DASH if tok_in is None else f"{tok_in:,}",
        DASH if tok_out is None else f"{tok_out:,}",
        fmt_s(j.stages_s.get("queue_wait")),
        fmt_s(r.engine_time_s if r else None),
        fmt_s(r.ttft_s if r else None),
        fmt_s(e2e),
        run[:16],
        fmt_rate(tps, ""),
        str(j.attempt),
        (j.worker or DASH)[:20],
        (r.node if r else DASH)[:20],
    )
    # Text cells, not str: the table would parse every str as markup on every render.
    cells = [Text(v) for v in plain]
    cells[1] = Text(plain[1], style=JOB_STYLES.get(j.state, ""))
    return tuple(cells)


JOB_COLUMNS = (
    ("job", "id"),
    ("state", "state"),
    ("in", "in"),
    ("out", "out"),
    ("wait", "wait"),
    ("engine", "engine"),
    ("ttft", "ttft"),
    ("e2e", "e2e"),
    ("run", "run"),
    ("tok/s", "tps"),
    ("try", "attempt"),
    ("worker", "worker"),
    ("node", "node"),
)


def job_matches(j: JobView, f: str) -> bool:
    """True if the filter text appears in the job's id, state, run, label or worker."""
    if not f:
        return True
    spec = j.spec
    hay = [j.job_id, j.state.value, j.worker or "", j.error or ""]
    if spec:
        hay += [spec.run_id or "", spec.label or ""]
    f = f.lower()
    return any(f in h.lower() for h in hay)


class JobsPanel(Panel):
    """A live table of recent jobs; Enter opens one."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("Jobs", **kw)
        self.jobs: tuple[JobView, ...] = ()
        self._cell_cache: dict[str, tuple[JobView, tuple[Text, ...]]] = {}

    def _cells(self, job: JobView) -> tuple[Text, ...]:
        # Final jobs come back as the same objects every refresh (the source caches them):
        # their cells are built once.
        hit = self._cell_cache.get(job.job_id)
        if hit is not None and hit[0] is job:
            return hit[1]
        cells = job_cells(job)
        self._cell_cache[job.job_id] = (job, cells)
        if len(self._cell_cache) > 4 * max(len(self.jobs), 100):
            keep = {j.job_id for j in self.jobs}
            self._cell_cache = {k: v for k, v in self._cell_cache.items() if k in keep}
        return cells

    def compose(self) -> ComposeResult:
        """The table, and the line shown when Redis is down."""
        yield RowTable([label for label, _key in JOB_COLUMNS], id="jobs-table")
        yield Static(id="jobs-error")

    def show(self, v: JobsView, filter_text: str = "") -> None:
        """Draw ``v`` (rows matching ``filter_text`` only)."""
        table = self.query_one("#jobs-table", RowTable)
        err = self.query_one("#jobs-error", Static)
        if v.error:
            set_text(err, error_markup(v.error))
            err.display = True
            table.display = False
            self.jobs = ()
            self.subtitle("")
            return
        err.display = False
        table.display = True
        shown = tuple(j for j in v.jobs if job_matches(j, filter_text))
        self.jobs = shown
        table.set_rows([(j.job_id, self._cells(j)) for j in shown])
        parts = [f"{len(shown)}/{len(v.jobs)}" if filter_text else f"{len(v.jobs)} recent"]
        if v.events_per_s is not None:
            parts.append(f"{fmt_rate(v.events_per_s, '')} events/s")
        if filter_text:
            parts.append(f"filter “{escape(filter_text)}”")
        self.subtitle(" · ".join(parts))

    def selected(self) -> JobView | None:
        """The job under the cursor."""
        key = self.query_one("#jobs-table", RowTable).cursor_key
        return next((j for j in self.jobs if j.job_id == key), None)

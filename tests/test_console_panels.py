"""Pilot tests of the console's overview, detail, logs and control, on fake sources."""

from __future__ import annotations

from typing import Any

import pytest
from textual.widgets import DataTable, Input, Static

from console.app import ConsoleApp
from console.commands import key_actions
from console.fakes import FakeBench, FakeClock, FakeSupervisor, fake_sources, fixed_wall
from console.rowtable import RowTable
from console.screens.dialogs import ConfirmScreen, HelpScreen
from console.screens.job import JobScreen
from console.screens.logs import LogScreen
from console.screens.overview import OverviewScreen
from console.sources import Sources


def make_app(sources: Sources | None = None, **kw: Any) -> ConsoleApp:
    """An app on fake sources with a fake clock; it refreshes only when a test asks."""
    return ConsoleApp(
        sources or fake_sources(),
        bench=FakeBench(),
        refresh_s=3600,
        clock=FakeClock(),
        wall=fixed_wall,
        **kw,
    )


async def settle(app: ConsoleApp, collects: int = 1) -> None:
    """Let the first (on-mount) collection finish, then collect ``collects`` more times."""
    await app.workers.wait_for_complete()
    for _ in range(collects):
        await app.collect_now()


def text(app: ConsoleApp, selector: str) -> str:
    """The plain text a Static shows."""
    return str(app.screen.query_one(selector, Static).render())


def rows(app: ConsoleApp, selector: str) -> list[list[str]]:
    """Every row of a table (DataTable or RowTable) as plain strings."""
    table: Any = app.screen.query_one(selector)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_overview_shows_every_panel() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, 2)
        await pilot.pause()
        assert isinstance(app.screen, OverviewScreen)
        queue = text(app, "#queue-text")
        # Third call of the fake queue: depth 8 of the wave, counters at 1,200 + 12·2.
        assert "waiting       8" in queue
        assert "in flight     4" in queue
        assert "1,215" in queue and "6/3" in queue
        assert "12.0" in queue  # done/s from the counter delta over one fake second
        engine = text(app, "#engine-text")
        assert "running     3" in engine
        assert "42.0%" in engine and "60.0%" in engine
        assert "2,048" in engine and "512" in engine
        gpus = text(app, "#gpu-text")
        assert "H200" in gpus and "87%" in gpus and "61°C" in gpus and "412W" in gpus
        assert "126.5/140.4 GiB" in gpus
        # VRAM held by the engine's child process is attributed to the engine program.
        assert "engine pid 4150" in gpus
        services = rows(app, "#services-table")
        assert [r[0] for r in services] == [
            "engine",
            "inference_worker",
            "ingestion",
            "proxy_worker",
            "redis",
        ]
        assert all(r[1] == "RUNNING" for r in services)
        assert services[0][2] == "4102" and services[0][3] == "3h07m"
        jobs = rows(app, "#jobs-table")
        assert len(jobs) == 20
        assert jobs[0][:2] == ["job0040demo", "queued"]
        succeeded = next(r for r in jobs if r[0] == "job0037demo")
        # in, out, queue wait, engine time, TTFT, end-to-end
        assert succeeded[1:8] == ["succeeded", "512", "128", "70ms", "1.04s", "90ms", "1.12s"]
        assert {r[1] for r in jobs} == {"queued", "running", "succeeded", "failed", "dead"}


async def test_no_gpu_panel_says_so_and_the_rest_works() -> None:
    app = make_app(fake_sources(gpu=False))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        gpus = text(app, "#gpu-text")
        assert "No GPU" in gpus
        assert "NVML library not found" in gpus
        assert "waiting" in text(app, "#queue-text")
        assert len(rows(app, "#services-table")) == 5
        assert len(rows(app, "#jobs-table")) == 20


async def test_supervisor_down_says_so_and_the_rest_works() -> None:
    app = make_app(fake_sources(supervisor_down=True))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        assert "supervisord is not running" in text(app, "#services-error")
        assert not app.screen.query_one("#services-table", DataTable).display
        assert "running     3" in text(app, "#engine-text")
        assert len(rows(app, "#jobs-table")) == 20
        # GPU memory cannot be attributed without program pids: shown by pid only.
        assert "pid 4150" in text(app, "#gpu-text") and "engine pid" not in text(app, "#gpu-text")
        # Control keys say there is nothing to act on instead of failing.
        await pilot.press("s")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)


async def test_redis_down_says_so_in_queue_and_jobs() -> None:
    app = make_app(fake_sources(redis_down=True))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        assert "Redis down at 127.0.0.1:6379" in text(app, "#queue-text")
        assert "Redis down" in text(app, "#jobs-error")
        assert "running     3" in text(app, "#engine-text")
        assert len(rows(app, "#services-table")) == 5


async def test_engine_down_says_so() -> None:
    app = make_app(fake_sources(engine_down=True))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        assert "engine down at http://127.0.0.1:8000" in text(app, "#engine-text")
        assert "waiting" in text(app, "#queue-text")


async def test_enter_opens_the_job_stage_breakdown_and_escape_returns() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        table = app.screen.query_one("#jobs-table", RowTable)
        table.focus()
        table.move_cursor(row=3)  # job0037demo, succeeded
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, JobScreen)
        detail = text(app, "#job-text")
        assert "job0037demo" in detail and "succeeded" in detail
        for stage, dur in (("queue_wait", "70ms"), ("engine_ttft", "90ms"), ("decode", "950ms")):
            line = next(ln for ln in detail.splitlines() if ln.startswith(stage))
            assert dur in line and "█" in line
        assert "TTFT 90ms" in detail and "engine (GPU) time 1.04s" in detail
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, OverviewScreen)


async def test_stop_asks_first_then_stops_restart_and_start_act() -> None:
    sources = fake_sources()
    sup = sources.supervisor
    assert isinstance(sup, FakeSupervisor)
    app = make_app(sources)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        table = app.screen.query_one("#services-table", DataTable)
        table.focus()
        table.move_cursor(row=3)  # proxy_worker
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert sup.actions == []
        await pilot.press("s")
        await pilot.pause()
        await pilot.press("y")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert sup.actions == [("stop", "proxy_worker")]
        assert rows(app, "#services-table")[3][1:3] == ["STOPPED", "–"]
        await pilot.press("S")
        await app.workers.wait_for_complete()
        await pilot.press("r")
        await app.workers.wait_for_complete()
        assert sup.actions[1:] == [("start", "proxy_worker"), ("restart", "proxy_worker")]


async def test_log_view_tails_the_selected_program() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        table = app.screen.query_one("#services-table", DataTable)
        table.focus()
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(app.screen, LogScreen)
        await app.screen.workers.wait_for_complete()
        await pilot.pause()
        from textual.widgets import Log

        lines = app.screen.query_one(Log).lines
        assert lines[:2] == ["engine: log line 0", "engine: log line 1"]


async def test_readonly_hides_every_action() -> None:
    sources = fake_sources()
    app = make_app(sources, readonly=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        actions = {k.action for k in key_actions(app.screen)}
        assert not actions & {"restart", "stop", "start"}
        assert {"filter", "logs", "help", "quit"} <= actions
        app.screen.query_one("#services-table", DataTable).focus()
        for key in ("s", "r", "S"):
            await pilot.press(key)
            await pilot.pause()
        assert not isinstance(app.screen, ConfirmScreen)
        assert sources.supervisor.actions == []  # type: ignore[attr-defined]
        assert "read-only" in app.sub_title


async def test_full_console_offers_the_actions() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.pause()
        actions = {k.action for k in key_actions(app.screen)}
        assert {
            "restart",
            "stop",
            "start",
            "logs",
            "filter",
            "open",
            "help",
            "pause",
            "bench",
            "quit",
        } <= actions


async def test_filter_narrows_jobs_and_escape_clears() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        await pilot.press("slash")
        await pilot.pause()
        assert isinstance(app.focused, Input)
        await pilot.press(*"dead")
        await pilot.pause()
        assert [r[0] for r in rows(app, "#jobs-table")] == ["job0027demo"]
        await pilot.press("escape")
        await pilot.pause()
        assert len(rows(app, "#jobs-table")) == 20


async def test_pause_stops_refreshing() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        seq = app.snapshot.seq if app.snapshot else 0
        await pilot.press("p")
        assert app.paused and "PAUSED" in app.sub_title
        app.tick()
        await app.workers.wait_for_complete()
        assert app.snapshot is not None and app.snapshot.seq == seq
        await pilot.press("p")
        await app.workers.wait_for_complete()
        assert not app.paused
        assert app.snapshot.seq == seq + 1


async def test_help_lists_the_keys() -> None:
    app = make_app()
    async with app.run_test(size=(80, 40)) as pilot:
        await settle(app)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        help_text = text(app, "#help-text")
        for word in ("Restart", "Stop", "Start", "Logs", "Filter", "Pause", "Quit", "ctrl+p"):
            assert word in help_text
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, OverviewScreen)


async def test_command_palette_runs_a_binding() -> None:
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app)
        app.screen.query_one("#services-table", DataTable).focus()
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Stop")
        from textual.command import CommandPalette
        from textual.widgets import OptionList

        palette = app.screen
        assert isinstance(palette, CommandPalette)
        options = palette.query_one(OptionList)
        for _ in range(200):  # the palette searches in a worker: wait for its first hit
            if options.option_count:
                break
            await pilot.pause(0.01)
        assert "Stop" in str(options.get_option_at_index(0).prompt)
        await pilot.press("enter")
        for _ in range(100):
            if isinstance(app.screen, ConfirmScreen):
                break
            await pilot.pause(0.01)
        assert isinstance(app.screen, ConfirmScreen)


def test_refresh_below_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match=r"at least 0\.25"):
        ConsoleApp(fake_sources(), refresh_s=0.1)


async def test_sync_rows_keeps_order_and_the_selected_row() -> None:
    from textual.app import App, ComposeResult

    from console.widgets import sync_rows

    class One(App[None]):
        def compose(self) -> ComposeResult:
            t: DataTable[str] = DataTable()
            t.add_columns("id", "v")
            yield t

    app = One()
    async with app.run_test() as pilot:
        table = app.query_one(DataTable)

        def show(*ids: str, v: str = "x") -> list[list[str]]:
            sync_rows(table, [(i, (i, f"{v}{i}")) for i in ids])
            return [[str(c) for c in table.get_row_at(n)] for n in range(table.row_count)]

        assert show("c", "b", "a") == [["c", "xc"], ["b", "xb"], ["a", "xa"]]
        table.move_cursor(row=1)  # on "b"
        # Newer rows arrive on top, the oldest falls off, one value changes.
        assert show("e", "d", "c", "b", v="y")[:2] == [["e", "ye"], ["d", "yd"]]
        assert [str(table.get_row_at(n)[0]) for n in range(table.row_count)] == ["e", "d", "c", "b"]
        assert table.get_row_at(table.cursor_row)[0] == "b"  # the selection stayed with its row
        table.move_cursor(row=0)
        show("f", "e", "d")
        assert table.cursor_row == 0  # at the top it follows the newest
        assert show() == []
        await pilot.pause()


async def test_row_table_keeps_order_cursor_and_redraws_only_what_changed() -> None:
    from rich.text import Text
    from textual.app import App, ComposeResult

    class One(App[None]):
        def compose(self) -> ComposeResult:
            yield RowTable(["id", "v"])

    app = One()
    async with app.run_test(size=(40, 10)) as pilot:
        table = app.query_one(RowTable)

        def show(*ids: str, v: str = "x") -> list[list[str]]:
            table.set_rows([(i, (Text(i), Text(f"{v}{i}"))) for i in ids])
            return [[c.plain for c in table.get_row_at(n)] for n in range(table.row_count)]

        assert show("c", "b", "a") == [["c", "xc"], ["b", "xb"], ["a", "xa"]]
        await pilot.pause()
        assert table.render_line(0).text.split() == ["id", "v"]
        assert table.render_line(1).text.split() == ["c", "xc"]
        table.move_cursor(row=1)  # on "b"
        assert show("e", "d", "c", "b", v="y") == [["e", "ye"], ["d", "yd"], ["c", "yc"], ["b", "yb"]]
        assert table.cursor_key == "b"  # the selection stayed with its row
        table.move_cursor(row=0)
        show("f", "e", "d")
        assert table.cursor_key == "f"  # at the top it follows the newest
        # A row that only moved is not rendered again: its line comes from the cache.
        await pilot.pause()
        table.render_line(2)
        cached = len(table._lines)
        show("g", "f", "e", "d")
        table.render_line(3)  # "e", one row lower now
        assert len(table._lines) == cached
        assert show() == []
        assert table.cursor_key is None


def test_depth_sparkline_is_scaled_from_zero() -> None:
    from console.model import spark_rows

    top, bottom = spark_rows([0, 8, 16], 3, 2)
    assert (top, bottom) == ("  █", " ██")
    # A steady queue is a full bar (zero is the baseline), an empty one is blank.
    assert spark_rows([100, 100], 2, 1) == ["██"]
    assert spark_rows([0, 0], 2, 1) == ["  "]
    # Newest at the right; more values than columns keep each column's peak.
    assert spark_rows([1, 2], 4, 1) == ["  ▄█"]
    assert spark_rows([8, 0, 0, 0], 2, 1) == ["█ "]

"""Snapshot tests of the console's main screens on fixed fake data (no clocks on screen).

Update after an intended change with ``pytest tests/test_console_snapshots.py --snapshot-update``
and look at the report before committing the new snapshots.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input

from console.app import ConsoleApp
from console.fakes import FakeBench, FakeClock, fake_sources, fixed_wall
from console.rowtable import RowTable

SnapCompare = Callable[..., bool]

#: Collections before the screenshot: enough for rates and a sparkline with some shape.
COLLECTS = 12


def make_app(**sources: Any) -> ConsoleApp:
    return ConsoleApp(
        fake_sources(**sources), bench=FakeBench(), refresh_s=3600, clock=FakeClock(), wall=fixed_wall
    )


def prepared(
    then: Callable[[Pilot[Any]], Awaitable[None]] | None = None,
) -> Callable[[Pilot[Any]], Awaitable[None]]:
    """run_before: finish the on-mount collection, collect a fixed number of times, then ``then``."""

    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, ConsoleApp)
        await app.workers.wait_for_complete()
        for _ in range(COLLECTS):
            await app.collect_now()
        await pilot.pause()
        if then is not None:
            await then(pilot)
        await app.workers.wait_for_complete()
        await pilot.pause()

    return run_before


def test_overview_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=prepared())


def test_overview_wide_and_tall(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(gpus=2), terminal_size=(160, 44), run_before=prepared())


def test_overview_no_gpu_supervisor_down(snap_compare: SnapCompare) -> None:
    assert snap_compare(
        make_app(gpu=False, supervisor_down=True), terminal_size=(80, 24), run_before=prepared()
    )


async def _open_job(pilot: Pilot[Any]) -> None:
    table = pilot.app.screen.query_one("#jobs-table", RowTable)
    table.focus()
    table.move_cursor(row=3)
    await pilot.press("enter")


def test_job_detail(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 30), run_before=prepared(_open_job))


async def _help(pilot: Pilot[Any]) -> None:
    await pilot.press("question_mark")


def test_help(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(100, 36), run_before=prepared(_help))


async def _bench_form_with_errors(pilot: Pilot[Any]) -> None:
    await pilot.press("b")
    await pilot.pause()
    screen = pilot.app.screen
    screen.query_one("#f-input_tokens", Input).value = "0"
    screen.query_one("#f-prefix_share", Input).value = "1.5"
    # Focus off the inputs so no cursor is drawn.
    screen.query_one("#f-path").focus()


def test_bench_launcher_validation(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=prepared(_bench_form_with_errors))


async def _run_and_show_ttft(pilot: Pilot[Any]) -> None:
    await pilot.press("b")
    await pilot.pause()
    screen = pilot.app.screen
    screen.query_one("#f-requests", Input).value = "40"
    await pilot.press("ctrl+r")
    await screen.workers.wait_for_complete()
    await pilot.pause()
    await pilot.press("n")  # the TTFT plot tab


def test_run_result_plot(snap_compare: SnapCompare) -> None:
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=prepared(_run_and_show_ttft))

"""The benchmark launcher: form validation, a run with progress, the runs list, comparison."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from textual.widgets import Button, DataTable, Input, Select, Static, TabbedContent

from bench.config import ProgressEvent
from console.app import ConsoleApp
from console.fakes import FakeBench, FakeClock, fake_sources, fixed_wall
from console.screens.bench import BenchScreen, CompareScreen, RunScreen, describe_progress, form_to_config

VALID = {
    "input_tokens": "64",
    "output_tokens": "16",
    "prefix_share": "0.25",
    "requests": "12",
    "load_value": "3",
    "label": "smoke",
}


def plain(widget: Static) -> str:
    """What a Static shows, as text (Rich tables included)."""
    content = widget.content
    if isinstance(content, str):
        return str(widget.render())
    console = Console(width=140, file=io.StringIO(), record=True)
    console.print(content)
    return console.export_text()


def test_form_builds_the_config() -> None:
    cfg, errors = form_to_config(VALID, "concurrency", "both")
    assert errors == {}
    assert cfg is not None
    assert (cfg.input_tokens, cfg.output_tokens, cfg.prefix_share) == (64, 16, 0.25)
    assert (cfg.requests, cfg.concurrency, cfg.rate, cfg.path, cfg.label) == (12, 3, None, "both", "smoke")
    cfg, errors = form_to_config({**VALID, "load_value": "2.5"}, "rate", "direct")
    assert errors == {} and cfg is not None
    assert (cfg.rate, cfg.concurrency, cfg.path) == (2.5, None, "direct")


def test_empty_token_fields_take_the_stack_defaults() -> None:
    cfg, errors = form_to_config({**VALID, "input_tokens": "", "prefix_share": ""}, "concurrency", "pipeline")
    assert errors == {} and cfg is not None
    assert cfg.input_tokens is None and cfg.prefix_share is None


@pytest.mark.parametrize(
    ("field", "value", "kind", "message"),
    [
        ("input_tokens", "0", "concurrency", "input tokens: at least 1"),
        ("input_tokens", "999999999", "concurrency", "input tokens: at most 131072"),
        ("output_tokens", "abc", "concurrency", "output tokens: a whole number"),
        ("prefix_share", "1.5", "concurrency", "prefix share: at most 1"),
        ("requests", "", "concurrency", "requests: required"),
        ("load_value", "2.5", "concurrency", "concurrency: a whole number"),
        ("load_value", "0", "rate", "rate: more than 0"),
        ("label", "x" * 200, "concurrency", "label: "),
    ],
)
def test_form_rejects_bad_values_with_a_message(field: str, value: str, kind: str, message: str) -> None:
    cfg, errors = form_to_config({**VALID, field: value}, kind, "pipeline")
    assert cfg is None
    assert errors[field].startswith(message)


def make_app(bench: FakeBench | None = None, **kw: object) -> ConsoleApp:
    return ConsoleApp(
        fake_sources(), bench=bench or FakeBench(), refresh_s=3600, clock=FakeClock(), wall=fixed_wall, **kw
    )


async def fill(screen: BenchScreen, values: dict[str, str]) -> None:
    for name, value in values.items():
        screen.query_one(f"#f-{name}", Input).value = value


async def test_form_validates_as_you_type_and_a_run_shows_its_results() -> None:
    bench = FakeBench()
    app = make_app(bench)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BenchScreen)
        await fill(screen, {**VALID, "prefix_share": "2"})
        await pilot.pause()
        assert "prefix share: at most 1" in str(screen.query_one("#form-errors", Static).render())
        assert screen.query_one("#start", Button).disabled
        assert screen.query_one("#f-prefix_share", Input).has_class("-invalid")
        await pilot.press("ctrl+r")  # refused while the form is invalid
        await pilot.pause()
        assert bench.configs == []
        await fill(screen, VALID)
        screen.query_one("#f-path", Select).value = "direct"
        await pilot.pause()
        assert "ready" in str(screen.query_one("#form-errors", Static).render())
        assert not screen.query_one("#start", Button).disabled
        await pilot.press("ctrl+r")
        for _ in range(200):
            if isinstance(app.screen, RunScreen):
                break
            await pilot.pause(0.01)
        assert isinstance(app.screen, RunScreen)
        (cfg,) = bench.configs
        assert (cfg.input_tokens, cfg.output_tokens, cfg.requests, cfg.concurrency, cfg.path) == (
            64,
            16,
            12,
            3,
            "direct",
        )
        summary = plain(app.screen.query_one("#run-summary-text", Static))
        assert "Successful requests" in summary and "12" in summary
        await pilot.press("escape")
        await pilot.pause()
        assert "finished" in str(screen.query_one("#bench-status", Static).render())


async def test_failed_run_says_why() -> None:
    app = make_app(FakeBench(fail="ingestion is not reachable at http://127.0.0.1:1"))
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BenchScreen)
        await fill(screen, VALID)
        await pilot.press("ctrl+r")
        await screen.workers.wait_for_complete()
        await pilot.pause()
        assert "ingestion is not reachable" in str(screen.query_one("#bench-status", Static).render())
        assert not screen.running


async def test_runs_list_reopens_and_compares_runs() -> None:
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BenchScreen)
        await pilot.press("ctrl+t")
        await screen.workers.wait_for_complete()
        await pilot.pause()
        assert screen.query_one(TabbedContent).active == "runs"
        table = screen.query_one("#runs-table", DataTable)
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == ["run-fake-b", "run-fake-a"]
        await pilot.press("enter")
        await screen.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, RunScreen) and app.screen.result.run_id == "run-fake-b"
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("space", "down", "space", "c")
        await screen.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, CompareScreen)
        assert (app.screen.a.run_id, app.screen.b.run_id) == ("run-fake-b", "run-fake-a")
        table_text = plain(app.screen.query_one("#compare-text", Static))
        assert "Request throughput" in table_text and "better" in table_text


async def test_readonly_console_only_browses_runs() -> None:
    bench = FakeBench()
    app = make_app(bench, readonly=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await app.workers.wait_for_complete()
        await pilot.press("b")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BenchScreen)
        tabs = screen.query_one(TabbedContent)
        assert tabs.active == "runs"
        assert not tabs.get_tab("launch").display
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert bench.configs == []


def test_the_status_line_carries_a_stall_notice_escaped() -> None:
    from textual.content import Content

    ev = ProgressEvent("r", "run", 1, 4, warning="no request has finished [x] (3 in flight)")
    line = describe_progress(ev)
    assert str(Content.from_markup(line)) == "run 1/4 · 0.0s · no request has finished [x] (3 in flight)"
    assert "[$warning]" in line
    assert "$warning" not in describe_progress(ProgressEvent("r", "run", 1, 4))

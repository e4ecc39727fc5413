"""The ``llmconsole`` command line: flags, their errors, and the ``bench`` dispatch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from console.cli import build_parser, child_argv, main
from services.settings import REPO_ROOT


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--refresh", "0.1"], "must be at least 0.25 seconds (got 0.1)"),
        (["--refresh", "-1"], "must be at least 0.25 seconds"),
        (["--refresh", "nan"], "must be at least 0.25 seconds"),
        (["--refresh", "soon"], "expected a number of seconds, got 'soon'"),
        (["--web", "--port", "70000"], "must be between 1 and 65535"),
        (["--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_flags_are_refused_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_flags_and_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.refresh, args.readonly, args.web, args.port, args.host, args.demo) == (
        1.0, False, False, 8765, "127.0.0.1", False,
    )  # fmt: skip
    args = build_parser().parse_args(["--refresh", "0.25", "--readonly", "--demo", "--web", "--port", "9000"])
    assert args.refresh == 0.25 and args.readonly and args.demo
    # The web server's app processes get the same console, without --web.
    assert child_argv(args) == ["--refresh", "0.25", "--readonly", "--demo"]
    # Every flag it documents, each parsed to its own field (an unknown one is refused above).
    parser = build_parser()
    assert parser.prog == "llmconsole"
    flags = {o for a in parser._actions for o in a.option_strings}
    assert flags == {"-h", "--help", "--readonly", "--refresh", "--web", "--port", "--host", "--demo"}
    args = parser.parse_args(["--host", "0.0.0.0"])
    assert (args.host, args.port, args.web) == ("0.0.0.0", 8765, False)


def test_bench_subcommand_is_the_benchmark_cli(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["bench", "--help"])
    except SystemExit as e:  # argparse's own --help exits
        code = int(e.code or 0)
    assert code == 0
    assert "--input-tokens" in capsys.readouterr().out
    # Its errors come back as its exit code, not a traceback.
    assert main(["bench", "--requests", "0"]) == 2
    assert "--requests" in capsys.readouterr().err


@pytest.mark.slow  # runs the installed console script as a process
def test_console_script_is_installed() -> None:
    exe = Path(REPO_ROOT) / ".venv" / "bin" / "llmconsole"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--readonly" in out.stdout and "--refresh SECONDS" in out.stdout and "--web" in out.stdout

"""The command line: bad input is a clear message and exit code 2; settings give the defaults."""

from __future__ import annotations

import pytest

from bench.cli import main
from bench.config import BenchConfig, parse_goodput, parse_percentiles, parse_sweep
from services.settings import load_settings
from tests.stackutil import free_port


@pytest.fixture(autouse=True)
def _no_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("LLMC_ENV_FILE", "/nonexistent/llmconsole.env")
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("REDIS_PORT", str(free_port()))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--requests", "0"], "--requests"),
        (["--rate", "fast"], "--rate"),
        (["--concurrency", "-3"], "--concurrency"),
        (["--path", "sideways"], "--path"),
        (["--goodput", "ttft=500"], "NAME:MILLISECONDS"),
        (["--goodput", "latency:5"], "goodput metric 'latency'"),
        (["--percentiles", "50,abc"], "percentiles"),
        (["--percentiles", "0"], "percentile 0.0"),
        (["--sweep", "rate"], "rate sweep needs"),
        (["--sweep", "speed:1,2"], "concurrency:"),
        (["--sweep", "concurrency:4,2"], "increasing"),
        (["--sweep", "concurrency:1,2", "--concurrency", "4"], "concurrency sweep sets"),
        (["--prefix-share", "1.5"], "--prefix-share"),
        (["--range-ratio", "1"], "--range-ratio"),
        (["--dataset", "x.jsonl", "--input-tokens", "5"], "dataset brings its own prompts"),
        (["--run-id", "bad id!"], "--run-id"),
        (["--input-tokens", "1000000"], "--input-tokens"),
        (["--bogus"], "unrecognized arguments"),
        (["compare", "only-one"], "DIR_B"),
        (["compare", "/nonexistent/a", "/nonexistent/b"], "no summary.json"),
        (["show", "/nonexistent/a"], "no summary.json"),
        (["calibrate"], "--out"),
        (["calibrate", "--out", "bad/name"], "profile name"),
        (["calibrate", "--out", "x", "--lengths", "10,zero"], "whole numbers"),
    ],
)
def test_bad_input_is_exit_code_2_with_a_clear_message(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err + cap.out
    assert needle in err
    assert "Traceback" not in err


def test_help_is_exit_code_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--input-tokens" in out and "--goodput" in out and "--path" in out
    assert main(["compare", "--help"]) == 0


def test_nothing_listening_is_exit_code_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ENGINE_PORT", str(free_port()))
    monkeypatch.setenv("INGESTION_PORT", str(free_port()))
    assert main(["--path", "direct", "--requests", "2", "-q", "--no-store"]) == 1
    err = capsys.readouterr().err
    assert "engine is not reachable" in err and "Traceback" not in err
    assert main(["--requests", "2", "-q", "--no-store"]) == 1
    assert "ingestion is not reachable" in capsys.readouterr().err


def test_bad_settings_from_the_environment_are_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INPUT_TOKENS", "many")
    assert main(["--requests", "1"]) == 2
    assert "input_tokens" in capsys.readouterr().err


def test_seed_env_defaults_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INPUT_TOKENS", "321")
    monkeypatch.setenv("OUTPUT_TOKENS", "45")
    s = load_settings()
    cfg = BenchConfig().resolved(s)
    assert (cfg.input_tokens, cfg.output_tokens, cfg.prefix_share) == (321, 45, s.prefix_share)
    assert cfg.concurrency == 16  # a closed loop unless a rate is given
    assert BenchConfig(rate=5).resolved(s).concurrency is None
    assert BenchConfig(input_tokens=7).resolved(s).input_tokens == 7


def test_parsers() -> None:
    assert parse_goodput(["ttft:500", "tpot:50,e2el:1e4"]) == {"ttft": 500, "tpot": 50, "e2el": 10000}
    assert parse_percentiles("50, 90,99.9") == [50, 90, 99.9]
    sw = parse_sweep("rate:1,2,4.5")
    assert sw.param == "rate" and sw.values == [1, 2, 4.5]
    assert parse_sweep("concurrency").values[:3] == [1, 2, 4]
    with pytest.raises(ValueError):
        parse_sweep("concurrency:1,2.5")

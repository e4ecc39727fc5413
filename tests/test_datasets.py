"""vLLM's dataset flags and formats on ``llmconsole bench``: ShareGPT, custom JSONL, prefix_repetition."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.cli import config_from_args as _config_from_args
from bench.cli import main, run_parser
from bench.config import BenchConfig
from bench.datasets import (
    DatasetError,
    check_dataset,
    dataset_kind,
    load_prompts,
    read_sharegpt,
    sample_sharegpt,
)
from bench.workload import build_workload
from services.engine_client import EngineClient
from services.settings import REPO_ROOT, Settings
from tests.stackutil import Stack, free_port, settings_env

LLMCONSOLE = REPO_ROOT / ".venv" / "bin" / "llmconsole"


def _settings() -> Settings:
    return Settings(_env_file=None)  # type: ignore[call-arg]


def config_from_args(argv: list[str]) -> BenchConfig:
    """The BenchConfig the CLI builds from ``argv`` (default settings)."""
    s = _settings()
    return _config_from_args(run_parser(s).parse_args(argv), s)


def sharegpt(convs: list[list[tuple[str, str]]]) -> list[dict[str, Any]]:
    """ShareGPT entries from lists of (speaker, text) turns."""
    return [
        {"id": f"c{i}", "conversations": [{"from": who, "value": text} for who, text in turns]}
        for i, turns in enumerate(convs)
    ]


def words(n: int, tag: str) -> str:
    """``n`` distinct-looking words (the simulator's tokenizer: one token a word)."""
    return " ".join(f"{tag}{k}" for k in range(n))


# --- malformed and empty files: one sentence naming the file and the entry or line ---------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "the file is empty"),
        ("  \n", "the file is empty"),
        ("[]", "the list is empty"),
        ('{"conversations": []}', "expected a JSON list of conversations (ShareGPT), got a JSON dict"),
        ('[{"conversations": [{"from": "human", "value": "hi"}]', "line 1 column"),
        ('{"a": 1}\n{"a": 2}\n', "line 2 column 1: not valid ShareGPT JSON (Extra data)"),
        ('[{"conversations": []}, "text"]', "entry 2: expected an object with 'conversations', got str"),
        ('[{"id": "x7", "turns": []}]', "entry 1 (id 'x7'): needs a 'conversations' list"),
        ('[{"conversations": [{"from": "human", "value": 3}]}]', "entry 1: turn 1 needs a string 'value'"),
        (
            '[{"conversations": [{"from": "human", "value": "a b c"}]}]',
            "none of its 1 entries has a human turn",
        ),
    ],
)
def test_malformed_sharegpt_gets_one_sentence(tmp_path: Path, text: str, needle: str) -> None:
    ds = tmp_path / "sg.json"
    ds.write_text(text)
    with pytest.raises(DatasetError) as err:
        read_sharegpt(ds)
    msg = str(err.value)
    assert needle in msg, msg
    assert msg.startswith(f"dataset {ds}") and "\n" not in msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "the file is empty"),
        ("\n\n", "the file is empty"),
        ('[{"prompt": "x"},\n{"prompt": "y"}]\n', "line 1: not a JSON object per line"),
        ('{"prompt": "ok"}\n{"prompt": "no end}\n', "line 2: not a JSON object per line"),
        ('{"prompt": "ok"}\n{"text": "x"}\n', "line 2: needs a non-empty string 'prompt'"),
    ],
)
def test_malformed_custom_jsonl_gets_one_sentence(tmp_path: Path, text: str, needle: str) -> None:
    ds = tmp_path / "p.jsonl"
    ds.write_text(text)
    with pytest.raises(DatasetError) as err:
        check_dataset(BenchConfig(dataset_name="custom", dataset=str(ds)))
    msg = str(err.value)
    assert needle in msg and msg.startswith(f"dataset {ds}") and "\n" not in msg, msg


def test_a_json_list_given_as_custom_says_sharegpt(tmp_path: Path) -> None:
    ds = tmp_path / "sg.json"
    ds.write_text(json.dumps(sharegpt([[("human", "a b c d"), ("gpt", "e f g h")]]), indent=1))
    with pytest.raises(DatasetError, match="is --dataset-name sharegpt"):
        check_dataset(BenchConfig(dataset_name="custom", dataset=str(ds)))


@pytest.mark.slow  # runs the CLI as a subprocess
def test_cli_exit_code_2_and_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}]')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    env = settings_env({"engine_port": 9, "ingestion_port": 9})  # nothing is contacted
    for args, needle in (
        (["--dataset-name", "sharegpt", "--dataset-path", str(bad)], f"dataset {bad} entry 1: turn 2 needs"),
        (["--dataset-path", str(empty)], f"dataset {empty}: the file is empty"),
        (["--dataset-name", "sharegpt", "--dataset-path", str(tmp_path / "nope.json")], "no such file"),
        (["--dataset-name", "sharegpt"], "reads a file: give it with --dataset-path FILE"),
    ):
        res = subprocess.run(
            [LLMCONSOLE, "bench", *args, "--num-prompts", "20", "-q"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr + res.stdout
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) <= 2, res.stderr  # the sentence (and, for flags, "invalid benchmark options:")


# --- which dataset, and vLLM's flags mapped onto the project's own --------------------------------


def test_dataset_kind_without_a_name(tmp_path: Path) -> None:
    sg, jl = tmp_path / "a.json", tmp_path / "b.jsonl"
    sg.write_text('\n  [{"conversations": []}]')
    jl.write_text('{"prompt": "x"}\n')
    assert dataset_kind(BenchConfig()) == "random"
    assert dataset_kind(BenchConfig(dataset=str(sg))) == "sharegpt"
    assert dataset_kind(BenchConfig(dataset=str(jl))) == "custom"
    assert dataset_kind(BenchConfig(dataset=str(sg), dataset_name="custom")) == "custom"


def test_vllm_random_flags_map_to_the_projects_own() -> None:
    cfg = config_from_args(
        ["--dataset-name", "random", "--random-input-len", "300", "--random-prefix-len", "100",
         "--random-output-len", "40", "--random-range-ratio", "0.2", "--num-prompts", "7"]
    )  # fmt: skip
    assert (cfg.input_tokens, cfg.output_tokens, cfg.range_ratio, cfg.requests) == (400, 40, 0.2, 7)
    assert cfg.prefix_share == pytest.approx(0.25)
    assert round(400 * cfg.prefix_share) == 100
    # the project's own flags keep working, and mean the same
    own = config_from_args(["--input-tokens", "400", "--prefix-share", "0.25", "--output-tokens", "40",
                            "--range-ratio", "0.2", "--requests", "7"])  # fmt: skip
    assert own.model_dump() == cfg.model_dump() | {"dataset_name": None}


def test_vllm_prefix_repetition_flags_map_to_prefix_groups() -> None:
    cfg = config_from_args(
        ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "96",
         "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", "4",
         "--prefix-repetition-output-len", "8", "--num-prompts", "12"]
    )  # fmt: skip
    assert (cfg.input_tokens, cfg.output_tokens, cfg.prefix_groups, cfg.dataset) == (128, 8, 4, None)
    assert round(128 * cfg.prefix_share) == 96
    defaults = config_from_args(["--dataset-name", "prefix_repetition"])
    assert (defaults.input_tokens, defaults.prefix_share, defaults.prefix_groups) == (512, 0.5, 10)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--dataset-name", "prefix_repetition", "--input-tokens", "5"], "sets --input-tokens itself"),
        (["--prefix-repetition-prefix-len", "5"], "belong to --dataset-name prefix_repetition"),
        (
            ["--dataset-name", "prefix_repetition", "--num-prompts", "5"],
            "(10) must not exceed --num-prompts (5)",
        ),
        (["--random-prefix-len", "5", "--prefix-share", "0.1"], "drop --prefix-share"),
        (
            ["--dataset-name", "sharegpt", "--dataset-path", "x.json", "--random-prefix-len", "5"],
            "random dataset",
        ),
        (["--dataset-name", "random", "--dataset-path", "x.json"], "generates its prompts"),
        (["--dataset-path", "x.json", "--random-input-len", "5"], "dataset brings its own prompts"),
    ],
)
def test_clashing_flags_are_usage_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("LLMC_ENV_FILE", "/nonexistent/llmconsole.env")
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_warmup_prompts_come_after_the_measured_ones() -> None:
    from bench.workload import DatasetPrompt

    ds = [DatasetPrompt(f"p{i}", 4, input_tokens=3) for i in range(10)]
    cfg = BenchConfig(dataset="x.jsonl", requests=6, warmup=3).resolved(_settings())
    run, warm = build_workload(cfg, 6, "step0", ds), build_workload(cfg, 3, "warmup", ds)
    assert [it.prompt for it in run] == [f"p{i}" for i in range(6)]
    assert [it.prompt for it in warm] == ["p6", "p7", "p8"]
    assert {it.input_tokens for it in run} == {3}


async def test_no_engine_to_measure_sharegpt_on_is_said(tmp_path: Path) -> None:
    ds = tmp_path / "sg.json"
    ds.write_text(json.dumps(sharegpt([[("human", "a b c d"), ("gpt", "e f g h")]])))
    s = Settings(_env_file=None, engine_port=free_port())  # type: ignore[call-arg]
    with pytest.raises(DatasetError, match=r"could not measure the sharegpt prompts on the engine's tokenizer: "
                       r"engine not reachable"):  # fmt: skip
        await load_prompts(BenchConfig(dataset=str(ds)), s, 5)


# --- against the simulator: the pipeline, the engine's usage ---------------------------------------


def _sharegpt_file(path: Path) -> dict[str, str]:
    """A small ShareGPT file: 24 usable conversations and some vLLM skips; returns prompt → reply."""
    convs: list[list[tuple[str, str]]] = []
    pairs: dict[str, str] = {}
    for i in range(24):
        prompt, reply = words(5 + 3 * i, f"q{i}x"), words(4 + i % 7, f"a{i}x")
        pairs[prompt] = reply
        turns = [("human", prompt), ("gpt", reply), ("human", "and then?"), ("gpt", "more words here")]
        if i % 5 == 0:
            turns.insert(0, ("system", "you are terse"))  # the first *human* turn is the prompt
        convs.append(turns)
    convs.append([("human", "only a question without reply")])  # fewer than two turns: skipped
    convs.append([("human", "hi"), ("gpt", "a longer reply of words")])  # prompt under 4 tokens: skipped
    convs.append([("human", words(1100, "long")), ("gpt", "a reply of five words")])  # prompt over 1024
    path.write_text(json.dumps(sharegpt(convs)))
    return pairs


@pytest.mark.slow
def test_sharegpt_through_the_pipeline_matches_the_engines_usage(stack: Stack, tmp_path: Path) -> None:
    ds = tmp_path / "sharegpt.json"
    pairs = _sharegpt_file(ds)
    out = tmp_path / "run"
    res = subprocess.run(
        [LLMCONSOLE, "bench", "--dataset-name", "sharegpt", "--dataset-path", str(ds), "--num-prompts", "20",
         "--concurrency", "4", "--out", str(out), "--no-plots", "--no-store", "-q"],
        env=stack.env, cwd="/tmp", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr + stack.logs()
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert summary["completed"] == 20 and summary["failed"] == 0 and summary["token_mismatches"] == 0
    assert summary["config"]["dataset_name"] == "sharegpt" and len(recs) == 20

    s = stack.settings
    seen: set[str] = set()
    engine_key = s.engine_api_key.get_secret_value()
    with httpx.Client(timeout=30) as c:

        def tokens(text: str) -> int:
            headers = {"Authorization": f"Bearer {engine_key}"} if engine_key else {}
            r = c.post(f"{s.engine_url}/tokenize", json={"prompt": text}, headers=headers)
            return len(r.json()["tokens"])

        for rec in recs:
            job = c.get(f"{s.ingestion_url}/v1/jobs/{rec['job_id']}", headers=stack.headers).json()
            prompt = job["spec"]["prompt"]
            assert prompt in pairs, prompt[:60]  # a first human turn of a usable conversation
            seen.add(prompt)
            usage = job["result"]
            # the results' prompt tokens are the engine's usage, and what the bench measured beforehand
            assert (
                rec["prompt_tokens"]
                == usage["prompt_tokens"]
                == tokens(prompt)
                == rec["requested_input_tokens"]
            )
            # the reply's length (counted as vLLM counts it) is the output length asked and served
            assert rec["completion_tokens"] == usage["completion_tokens"] == tokens(pairs[prompt])
            assert job["spec"]["output_tokens"] == tokens(pairs[prompt])
    assert len(seen) == 20  # 20 different conversations, none of the skipped ones
    assert summary["total_input_tokens"] == sum(r["prompt_tokens"] for r in recs)


@pytest.mark.slow
def test_sharegpt_output_tokens_flag_replaces_the_reply_length(stack: Stack, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    ds = tmp_path / "sharegpt.json"
    _sharegpt_file(ds)
    monkeypatch.setenv("LLMC_ENV_FILE", "/nonexistent/llmconsole.env")
    for k, v in stack.values.items():
        monkeypatch.setenv(k.upper(), str(v))
    out = tmp_path / "run"
    code = main(["--dataset-path", str(ds), "--sharegpt-output-len", "3", "--num-prompts", "6", "--path", "both",
                 "--out", str(out), "--no-plots", "--no-store", "-q", "--json"])  # fmt: skip
    assert code == 0
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and {r["completion_tokens"] for r in recs} == {3}
    assert all(r["prompt_tokens"] == r["requested_input_tokens"] for r in recs)


@pytest.mark.slow
async def test_sharegpt_prompts_fit_the_engines_context(stack: Stack, tmp_path: Path) -> None:
    ds = tmp_path / "sharegpt.json"
    pairs = _sharegpt_file(ds)
    s = stack.settings
    engine = EngineClient(s.engine_url, s.engine_api_key.get_secret_value())
    try:
        got = await sample_sharegpt(engine, ds, 100, seed=0, output_tokens=None, context=40)
        assert got and all(d.input_tokens is not None and d.output_tokens is not None for d in got)
        assert all(d.input_tokens + d.output_tokens <= 40 for d in got)  # type: ignore[operator]
        assert len(got) < len(pairs)  # the longer ones were left out
        again = await sample_sharegpt(engine, ds, 100, seed=0, output_tokens=None, context=40)
        other = await sample_sharegpt(engine, ds, 100, seed=1, output_tokens=None, context=40)
        assert again == got and sorted(p.prompt for p in other) == sorted(p.prompt for p in got)
        assert [p.prompt for p in other] != [p.prompt for p in got]  # shuffled by the seed, as vLLM does
        with pytest.raises(
            DatasetError, match=r"none of its 26 conversations can be used: .*context length 8"
        ):
            await sample_sharegpt(engine, ds, 5, seed=0, output_tokens=None, context=8)
    finally:
        await engine.aclose()


@pytest.mark.slow
def test_prefix_repetition_runs_as_prefix_groups(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMC_ENV_FILE", "/nonexistent/llmconsole.env")
    for k, v in stack.values.items():
        monkeypatch.setenv(k.upper(), str(v))
    out = tmp_path / "rep"
    code = main(["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "32",
                 "--prefix-repetition-suffix-len", "16", "--prefix-repetition-num-prefixes", "3",
                 "--prefix-repetition-output-len", "4", "--num-prompts", "9", "--path", "both",
                 "--out", str(out), "--no-plots", "--no-store", "-q", "--json"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert (
        summary["config"]["prefix_groups"] == 3 and summary["config"]["dataset_name"] == "prefix_repetition"
    )
    assert len(recs) == 18 and summary["token_mismatches"] == 0
    assert {(r["prompt_tokens"], r["completion_tokens"]) for r in recs} == {(48, 4)}

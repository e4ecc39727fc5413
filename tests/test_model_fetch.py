"""The GPU engine's model download: file choice, progress, disk check, and plain failures.

The download runs for real: the engine venv's own ``huggingface_hub`` (the client vLLM uses)
fetches from a stand-in of the hub's HTTP API on loopback (the hub cannot be reached from the
test machines), through ``python -m services.lifecycle.engine_launch --fetch`` as install.sh runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.lifecycle import model_fetch as mf
from services.lifecycle.engine_launch import fetch_command, hub_cache_dir, hub_model
from services.settings import REPO_ROOT, Settings
from tests.hubstandin import COMMIT, StandInHub
from tests.stackutil import free_port

ENGINE_PY = REPO_ROOT / ".venv-engine" / "bin" / "python"
needs_engine_venv = pytest.mark.skipif(
    not ENGINE_PY.is_file(), reason="needs the engine venv (./install.sh --engine cpu --setup-only)"
)

REPO = "org/tiny-model"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _files() -> dict[str, bytes]:
    index = {"metadata": {}, "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1]}}
    return {
        "config.json": b'{"architectures": ["Qwen2ForCausalLM"]}',
        "tokenizer.json": b'{"version": "1.0"}',
        "generation_config.json": b"{}",
        "model.safetensors.index.json": json.dumps(index).encode(),
        # Big enough to span several of the hub client's 10 MB write chunks.
        SHARDS[0]: os.urandom(24_000_000),
        SHARDS[1]: os.urandom(16_000_000),
        "consolidated.safetensors": os.urandom(200_000),  # not in the index: vLLM skips it
        "original/consolidated.00.pth": os.urandom(100_000),  # a subfolder: skipped
        "README.md": b"a model",
    }


def _settings(tmp_path: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "engine_kind": "gpu",
        "model": REPO,
        "hf_home": str(tmp_path / "hf"),
        "engine_venv": str(REPO_ROOT / ".venv-engine"),
        "var_dir": str(tmp_path / "var"),
    }
    return Settings(_env_file=None, **{**base, **kw})  # type: ignore[arg-type]


# --- file choice, progress, disk (no network) -------------------------------------------------


def _rf(*names: str, size: int = 10) -> list[mf.RemoteFile]:
    return [mf.RemoteFile(n, size) for n in names]


def test_choice_follows_the_safetensors_index() -> None:
    files = _rf(
        "config.json", "tokenizer.json", *SHARDS, "consolidated.safetensors", "original/x.pth", "README.md"
    )
    chosen = [f.path for f in mf.choose_files(files, set(SHARDS))]
    assert chosen == sorted(["config.json", "tokenizer.json", *SHARDS, "README.md"])


def test_choice_without_index_takes_one_weight_format_in_vllms_order() -> None:
    both = _rf("config.json", "model.safetensors", "pytorch_model.bin")
    assert [f.path for f in mf.choose_files(both, None)] == ["config.json", "model.safetensors"]
    only_bin = _rf("config.json", "pytorch_model.bin", "model.gguf")
    assert [f.path for f in mf.choose_files(only_bin, None)] == ["config.json", "pytorch_model.bin"]


def test_choice_skips_big_non_weight_files_and_hidden_files() -> None:
    files = [
        *_rf("config.json", "model.safetensors", ".gitattributes"),
        mf.RemoteFile("dataset.jsonl", 2**30),
    ]
    assert [f.path for f in mf.choose_files(files, None)] == ["config.json", "model.safetensors"]


def test_progress_lines_give_share_rate_and_time_left() -> None:
    t = [0.0]
    p = mf.Progress(10_000_000_000, clock=lambda: t[0])
    t[0] = 10.0
    first = p.line(1_000_000_000)
    assert first == "1.0 GB of 10.0 GB (10.0 %), 100 MB/s, about 1 min 30 s left"
    t[0] = 20.0
    assert p.line(1_000_000_000) == "1.0 GB of 10.0 GB (10.0 %), about 3 min 00 s left"  # stalled: no rate
    t[0] = 21.0
    assert "time left" not in p.line(10_000_000_000) and "(100.0 %)" in p.line(10_000_000_000)


def test_progress_gives_no_time_left_from_a_trickle() -> None:
    t = [0.0]
    p = mf.Progress(65_000_000_000, clock=lambda: t[0])
    t[0] = 1.0
    assert "left" not in p.line(3_000)


def test_blob_bytes_counts_finished_and_incomplete_files(tmp_path: Path) -> None:
    assert mf.blob_bytes(tmp_path / "absent") == 0
    (tmp_path / "aaaa").write_bytes(b"x" * 5000)
    (tmp_path / "bbbb.1234abcd.incomplete").write_bytes(b"y" * 3000)
    with (tmp_path / "cccc.incomplete").open("wb") as f:
        f.truncate(10**9)  # sized but not yet written: counts as nothing
    assert mf.blob_bytes(tmp_path) == 8000


def test_disk_check_names_the_sizes_and_the_fix(tmp_path: Path) -> None:
    mf.check_disk(tmp_path, 1000)
    with pytest.raises(mf.FetchError) as err:
        mf.check_disk(tmp_path / "hub" / "deeper", 10**18)
    msg = str(err.value)
    assert "not enough disk space" in msg and "1000000000.0 GB" in msg and "HF_HOME" in msg


# --- settings → the command ----------------------------------------------------------------


def test_fetch_only_for_a_gpu_engine_with_a_hub_model(tmp_path: Path) -> None:
    assert hub_model(_settings(tmp_path)) == REPO
    assert hub_model(_settings(tmp_path, model="")) == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert hub_model(_settings(tmp_path, model_path=str(tmp_path))) is None
    assert hub_model(_settings(tmp_path, engine_kind="cpu")) is None
    assert fetch_command(_settings(tmp_path, engine_kind="sim")) is None


def test_fetch_command_gets_the_engines_cache_token_and_revision(tmp_path: Path) -> None:
    s = _settings(tmp_path, hf_token="hf_secret", model_revision="v2")
    cmd = fetch_command(s)
    assert cmd is not None
    argv, env = cmd
    assert argv[1:] == [
        "-m",
        "services.lifecycle.model_fetch",
        "--model",
        REPO,
        "--interval",
        "10.0",
        "--revision",
        "v2",
    ]
    assert env["HF_HOME"] == str(tmp_path / "hf") and env["HF_TOKEN"] == "hf_secret"
    assert hub_cache_dir(s) == tmp_path / "hf" / "hub"
    elsewhere = _settings(tmp_path, hf_hub_cache=str(tmp_path / "big-disk"))
    assert hub_cache_dir(elsewhere) == tmp_path / "big-disk"
    assert fetch_command(elsewhere)[1]["HF_HUB_CACHE"] == str(tmp_path / "big-disk")  # type: ignore[index]


# --- the real download against the stand-in hub --------------------------------------------


@pytest.fixture
def hub() -> Iterator[StandInHub]:
    # About 3 s for the 40 MB of weights: several progress lines at a 0.5 s interval.
    with StandInHub(REPO, _files(), bytes_per_s=15_000_000) as h:
        yield h


def _run_fetch(
    tmp_path: Path, endpoint: str, *extra: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    """``python -m services.lifecycle.engine_launch --fetch`` as install.sh runs it, settings from the env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LLMC_"))}
    env.update(
        LLMC_ENV_FILE=str(tmp_path / "absent.env"),
        ENGINE_KIND="gpu",
        MODEL=REPO,
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=endpoint,
    )
    env.update({k.upper(): v for k, v in settings.items()})
    return subprocess.run(
        [sys.executable, "-m", "services.lifecycle.engine_launch", "--fetch", *extra],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.slow
@needs_engine_venv
def test_download_shows_progress_and_lands_where_vllm_looks(tmp_path: Path, hub: StandInHub) -> None:
    r = _run_fetch(tmp_path, hub.url, "--interval", "0.5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"[model] {REPO} at {COMMIT[:12]}: 7 files, 40.0 MB; cache {tmp_path / 'hf' / 'hub'}" in lines
    progress = [ln for ln in lines if ln.startswith("[model] downloading: ")]
    assert progress, r.stdout  # at least one progress line during a multi-second download
    assert any(" MB of 40.0 MB (" in ln for ln in progress)
    assert any(ln.startswith("[model] downloaded 40.0 MB in ") for ln in lines)
    # Only what vLLM loads was fetched: the indexed shards, config and tokenizer files.
    assert sorted(set(hub.downloads)) == sorted(
        [
            "config.json",
            "tokenizer.json",
            "generation_config.json",
            "model.safetensors.index.json",
            *SHARDS,
            "README.md",
        ]
    )
    snap = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (snap / SHARDS[0]).stat().st_size == 24_000_000
    # The branch is recorded: vLLM (asking for main) finds the snapshot even offline.
    assert (snap.parent.parent / "refs" / "main").read_text() == COMMIT

    hub.downloads.clear()
    again = _run_fetch(tmp_path, hub.url)
    assert again.returncode == 0, again.stderr
    assert "every file is already in the cache: nothing to download" in again.stdout
    assert hub.downloads == []

    # An offline or firewalled host with the model cached installs too (vLLM starts from the cache).
    for extra in ({"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, {"HF_HUB_OFFLINE": "1"}):
        offline = _run_fetch(tmp_path, hub.url, **extra)
        assert offline.returncode == 0, offline.stderr
        assert "the hub cannot be reached" in offline.stdout and str(snap) in offline.stdout


@pytest.mark.slow
@needs_engine_venv
@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("gated", "is a gated model: accept its terms"),
        ("missing", f"the model {REPO} was not found on"),
    ],
)
def test_hub_refusals_are_plain_sentences(tmp_path: Path, mode: str, want: str) -> None:
    with StandInHub(REPO, _files(), mode=mode) as h:
        r = _run_fetch(tmp_path, h.url)
    assert r.returncode == 1
    assert want in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@needs_engine_venv
def test_no_connection_is_a_plain_sentence(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    r = _run_fetch(tmp_path, dead)
    assert r.returncode == 1
    assert f"cannot reach the model hub ({dead})" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@needs_engine_venv
def test_too_little_disk_is_refused_before_downloading(tmp_path: Path) -> None:
    files = _files()
    with StandInHub(REPO, files, claimed_sizes={SHARDS[0]: 10**18}) as h:
        r = _run_fetch(tmp_path, h.url)
    assert r.returncode == 1
    assert "not enough disk space" in r.stderr and "HF_HOME" in r.stderr
    assert not set(h.downloads) & set(SHARDS)


@pytest.mark.slow
def test_a_local_model_needs_no_download(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "services.lifecycle.engine_launch", "--fetch"],
        env={**os.environ, "LLMC_ENV_FILE": str(tmp_path / "absent.env"), "ENGINE_KIND": "cpu"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "nothing to download" in r.stdout


def test_a_local_folder_is_left_alone_and_a_missing_one_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mf.main(["--model", str(tmp_path)]) == 0
    assert "is a local folder: nothing to download" in capsys.readouterr().out
    assert mf.main(["--model", str(tmp_path / "nope")]) == 1
    assert f"there is no model folder at {tmp_path / 'nope'}" in capsys.readouterr().err

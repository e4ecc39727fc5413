"""The CPU model's preparation: the reuse check (marker), and the tokenizer / generation fixes.

The conversion itself needs the engine venv (transformers, gguf) and about a minute and a half;
it runs in ``./install.sh --engine cpu``. The ``cpu_engine`` test checks the installed folder.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jinja2
import pytest

from services.lifecycle import model_prep as mp
from services.settings import REPO_ROOT, load_settings

GGUF_SHA = "a" * 64


def _fake_folder(root: Path, digest: str) -> Path:
    """A folder shaped like a finished conversion, with a marker for ``digest``."""
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({**mp.EXPECTED_CONFIG, "vocab_size": 262144, "hidden_size": 640, "num_hidden_layers": 18})
    )
    for name in mp.REQUIRED_FILES:
        if not (folder / name).exists():
            (folder / name).write_text(f"content of {name}")
    marker = {"inputs_sha256": digest, "config": mp._checked_config(folder), "files": mp._file_sizes(folder)}
    (folder / mp.MARKER_NAME).write_text(json.dumps(marker))
    return folder


def test_digest_depends_on_the_gguf_and_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    a = mp.inputs_digest(GGUF_SHA)
    assert a == mp.inputs_digest(GGUF_SHA) and a != mp.inputs_digest("b" * 64)
    monkeypatch.setattr(mp, "RECIPE_VERSION", mp.RECIPE_VERSION + 1)
    assert mp.inputs_digest(GGUF_SHA) != a


def test_a_valid_folder_is_reused(tmp_path: Path) -> None:
    digest = mp.inputs_digest(GGUF_SHA)
    folder = _fake_folder(tmp_path, digest)
    assert mp.marker_problem(folder, digest) is None


def test_missing_or_unmarked_folders_are_redone(tmp_path: Path) -> None:
    digest = mp.inputs_digest(GGUF_SHA)
    assert mp.marker_problem(tmp_path / "absent", digest) == "not there yet"
    folder = _fake_folder(tmp_path, digest)
    (folder / mp.MARKER_NAME).unlink()
    assert mp.marker_problem(folder, digest) == "no marker"


def test_changed_inputs_files_or_config_are_caught(tmp_path: Path) -> None:
    digest = mp.inputs_digest(GGUF_SHA)
    folder = _fake_folder(tmp_path, digest)
    assert (
        mp.marker_problem(folder, mp.inputs_digest("c" * 64)) == "made from other inputs or an older recipe"
    )
    (folder / "model.safetensors").write_text("truncated")
    assert mp.marker_problem(folder, digest) == "files missing or changed"
    (tmp_path / "x").mkdir()
    folder2 = _fake_folder(tmp_path / "x", digest)
    cfg = json.loads((folder2 / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (folder2 / "config.json").write_text(json.dumps(cfg))
    assert "architectures" in (mp.marker_problem(folder2, digest) or "")


def test_tokenizer_fixes(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "post_processor": None, "model": {}})
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "chat_template": "x"})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "max_length": 10}))
    mp._fix_tokenizer(tmp_path)
    pp = json.loads((tmp_path / "tokenizer.json").read_text())["post_processor"]
    assert pp["type"] == "TemplateProcessing"
    assert pp["single"][0] == {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    assert pp["special_tokens"]["<bos>"]["ids"] == [2]
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and "chat_template" not in tc
    gc = json.loads((tmp_path / "generation_config.json").read_text())
    assert gc["eos_token_id"] == [1, 106] and gc["bos_token_id"] == 2 and gc["max_length"] == 10
    assert (tmp_path / "chat_template.jinja").read_text() == mp.CHAT_TEMPLATE


def _render(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    env = jinja2.Environment(autoescape=False)  # a chat prompt, not HTML

    def raise_exception(msg: str) -> None:
        raise ValueError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(mp.CHAT_TEMPLATE).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt
    )


def test_chat_template_renders_gemma_turns() -> None:
    out = _render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}])
    assert out == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    out = _render(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
        add_generation_prompt=False,
    )
    assert out == (
        "<bos><start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\nb<end_of_turn>\n"
        "<start_of_turn>user\nc<end_of_turn>\n"
    )
    with pytest.raises(ValueError, match="alternate"):
        _render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.slow
@pytest.mark.cpu_engine
def test_installed_model_folder_checks_out() -> None:
    s = load_settings()
    py = Path(s.engine_venv) / "bin" / "python"
    folder = Path(s.model_path) if s.model_path else Path(s.var_dir) / "models" / "gemma-3-270m"
    if not py.exists() or not folder.exists():
        pytest.skip("the CPU engine is not installed (./install.sh --engine cpu)")
    p = subprocess.run(
        [str(py), "-m", "services.lifecycle.model_prep", "--check", "--out", str(folder)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    marker = json.loads((folder / mp.MARKER_NAME).read_text())
    assert marker["checks"]["probe_ids"][0] == mp.BOS_ID

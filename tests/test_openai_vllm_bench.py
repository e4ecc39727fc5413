"""vLLM's own benchmark client, ``vllm bench serve`` (``vllm.benchmarks.serve``, engine venv), against
ingestion's OpenAI door on the simulator: every request succeeds with the requested output length."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from services.lifecycle.engine_launch import default_cpu_model_dir
from services.settings import REPO_ROOT, load_settings
from tests.stackutil import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NUM_PROMPTS = 24
OUTPUT_LEN = 16


def _engine_python_and_tokenizer() -> tuple[Path, Path]:
    s = load_settings()
    python = Path(s.engine_venv) / "bin" / "python"
    if not python.exists():
        pytest.skip(f"the engine venv is not installed ({python}); ./install.sh --engine cpu --setup-only")
    tokenizer = Path(s.model_path) if s.model_path else default_cpu_model_dir(s)
    if not (tokenizer / "tokenizer.json").exists():
        pytest.skip(f"no local tokenizer at {tokenizer} (./install.sh --engine cpu fetches the model)")
    return python, tokenizer


def test_vllm_bench_serve_through_the_pipeline(stack: Stack, tmp_path: Path) -> None:
    python, tokenizer = _engine_python_and_tokenizer()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))},
        "OPENAI_API_KEY": stack.values["api_key"],
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    args = [
        str(python),
        str(REPO_ROOT / "scripts" / "vllm_bench_serve.py"),
        "--backend",
        "openai",
        "--base-url",
        stack.settings.ingestion_url,
        "--model",
        "llmconsole-sim",
        "--tokenizer",
        str(tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        "64",
        "--random-output-len",
        str(OUTPUT_LEN),
        "--num-prompts",
        str(NUM_PROMPTS),
        "--max-concurrency",
        "4",
        "--ignore-eos",
        "--disable-tqdm",
        "--ready-check-timeout-sec",
        "30",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "pipeline.json",
    ]
    p = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}\n{stack.logs()}"
    result = json.loads((tmp_path / "pipeline.json").read_text())
    assert result["completed"] == NUM_PROMPTS and result["failed"] == 0, result.get("errors")
    assert result["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS
    assert result["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert result["mean_ttft_ms"] > 0 and result["mean_tpot_ms"] > 0

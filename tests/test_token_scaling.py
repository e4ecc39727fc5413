"""scripts/token_scaling.py at tiny sizes against a real simulator: every figure is there and positive.

No timing assertions: CPU figures vary on shared machines. The script is the benchmark.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.stackutil import load_script

pytestmark = pytest.mark.slow  # starts the simulator process

SIZES = [8, 32]


def _script() -> ModuleType:
    """scripts/token_scaling.py as a module."""
    return load_script("token_scaling")


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, dict[str, Any]]:
    """The script's core run at 8 and 32 tokens, 2 repetitions, against its own simulator."""
    mod = _script()
    log: Path = tmp_path_factory.mktemp("tokscale") / "sim.log"
    port = mod.free_port()
    proc = mod.start_sim(port, log, max_model_len=2048)
    try:
        r = mod.measure(f"http://127.0.0.1:{port}", SIZES, 2, itl_ms=42.0, interval_s=0.1)
    finally:
        mod.stop_sim(proc)
    assert proc.poll() is not None
    return mod, r


def test_every_stage_has_positive_figures_per_size(figures: tuple[ModuleType, dict[str, Any]]) -> None:
    """Each stage: a positive CPU time per job and per token at each size, and a fitted line."""
    mod, r = figures
    assert r["sizes"] == SIZES and r["reps"] == 2
    assert set(r["stages"]) == set(mod.STAGES)
    for stage, st in r["stages"].items():
        for n in SIZES:
            assert st["cpu_us"][str(n)] > 0, stage
            assert st["per_token_us"][str(n)] > 0, stage
            assert st["per_token_us"][str(n)] == pytest.approx(st["cpu_us"][str(n)] / n, rel=0.01, abs=0.01)
        assert isinstance(st["fixed_us"], float) and isinstance(st["slope_us_per_token"], float)


def test_sizes_and_sampler_frames(figures: tuple[ModuleType, dict[str, Any]]) -> None:
    """Byte sizes grow with the ITLs; the stored field (packed ITLs) is smaller than the worker's body."""
    _, r = figures
    for key in ("worker_body", "result_field"):
        assert 0 < r["bytes"][key]["8"] < r["bytes"][key]["32"]
    assert r["bytes"]["result_field"]["32"] < r["bytes"]["worker_body"]["32"]
    # 32 tokens × 42 ms / 0.1 s ≈ 13 hub frames, plus the opening and closing readings.
    assert r["sampler_frames"]["32"] >= 14
    assert r["sampler_us_per_frame"] > 0


def test_render_and_fit(figures: tuple[ModuleType, dict[str, Any]]) -> None:
    """The printed table names every stage and size; the line fit is exact on a line."""
    mod, r = figures
    text = mod.render(r)
    for stage in mod.STAGES:
        assert stage in text
    assert "32 tok" in text and "µs per frame" in text
    a, b = mod.fit_line([1, 2, 4], [3.0, 5.0, 9.0])
    assert a == pytest.approx(1.0) and b == pytest.approx(2.0)

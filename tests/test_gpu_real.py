"""NVML on a real NVIDIA GPU: what the inference worker records per job, read from the hardware.

Runs where NVML sees a GPU (``pytest -m gpu``). Where this host has an NVIDIA GPU (a
``/dev/nvidia*`` device node, or ``nvidia-smi -L`` listing one) but NVML cannot read it (a broken
or mismatched driver, no permission), every test here FAILS with NVML's reason: that is a machine
the console would show without GPU figures. Only a host with no GPU at all skips them. The
fake-backed tests in ``test_telemetry.py`` cover the logic; these check that the real driver
answers the calls the way the code expects.
"""

from __future__ import annotations

import asyncio
import glob
import shutil
import subprocess

import pytest

from services.telemetry import JobGpuSampler, NvmlBackend, gpu_report


def gpu_present() -> str | None:
    """What shows this host has an NVIDIA GPU, whatever NVML says; None if nothing does."""
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if nodes:
        return f"{nodes[0]} exists"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    listed = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
    return f"nvidia-smi -L lists {listed[0]!r}" if listed else None


_nvml = NvmlBackend()
_present = gpu_present()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _nvml.available() and _present is None, reason=f"no GPU here: {_nvml.reason}"),
]


@pytest.fixture(autouse=True)
def _nvml_reads_the_gpu_this_host_has() -> None:
    if not _nvml.available():
        pytest.fail(f"this host has an NVIDIA GPU ({_present}) but NVML cannot read it: {_nvml.reason}")


def test_every_gpu_answers_the_readings_a_job_needs() -> None:
    first = _nvml.sample()
    assert first, "NVML listed GPUs but gave no sample"
    for s in first:
        assert s.name and s.uuid.startswith(("GPU-", "MIG-"))
        assert s.vram_total_bytes is not None and s.vram_total_bytes > 2**30
        assert s.vram_used_bytes is not None and 0 <= s.vram_used_bytes <= s.vram_total_bytes
        # Utilisation is "not supported" on a GPU split with MIG: None then, never a crash.
        assert s.util_pct is None or 0 <= s.util_pct <= 100
        if s.power_w is not None:
            assert 0 < s.power_w < 2000
    asyncio.run(asyncio.sleep(0.5))
    second = _nvml.sample()
    for a, b in zip(first, second, strict=True):
        assert b.t > a.t
        if a.energy_mj is not None and b.energy_mj is not None:
            assert b.energy_mj >= a.energy_mj  # a counter since the driver loaded


async def test_a_job_window_gives_per_job_figures() -> None:
    sampler = JobGpuSampler(_nvml, interval_s=0.05)
    async with sampler:
        await asyncio.sleep(0.6)
    stats = sampler.stats(completion_tokens=100)
    assert stats.available and stats.gpu_count == len(_nvml.sample())
    assert stats.samples is not None and stats.samples >= 3
    assert stats.vram_peak_bytes is not None and stats.vram_total_bytes is not None
    if stats.energy_j is not None:
        assert stats.energy_j >= 0 and stats.energy_per_output_token_j == pytest.approx(stats.energy_j / 100)


def test_llmconsole_gpu_report_on_the_real_gpu() -> None:
    text, stats = gpu_report(_nvml, seconds=0.5, interval_s=0.1)
    assert text.startswith("GPU 0  ") and stats.available

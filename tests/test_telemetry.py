"""GPU telemetry: the NVML backend's guards, the fake, per-job reduction, the sampler, publishing.

No NVIDIA driver exists on the test machines, so the NVML backend is driven through a stand-in
binding module that raises pynvml's own error classes; the NoGpu path runs for real.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
import redis.asyncio as aioredis

from services.contracts import GPU_SAMPLES_MAXLEN, GpuSample, Keys, new_id
from services.settings import REPO_ROOT
from services.telemetry import (
    SAMPLES_FIELD,
    FakeGpu,
    FakeGpuBackend,
    GpuBackend,
    JobGpuSampler,
    NoGpuBackend,
    NvmlBackend,
    make_backend,
    publish_samples,
    read_gpu_samples,
    reduce_samples,
)
from tests.stackutil import RedisServer

GiB = 2**30


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its subclass


class StandInNvml(SimpleNamespace):
    """The slice of pynvml that NvmlBackend uses, for a machine without a driver."""

    def __init__(self, gpus: list[dict[str, Any]], init_error: int | None = None) -> None:
        super().__init__()
        self.gpus = gpus
        self.init_error = init_error
        self.calls: dict[str, int] = {}
        for name in dir(pynvml):
            if name.startswith("NVMLError"):
                setattr(self, name, getattr(pynvml, name))
        self.NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def _field(self, h: int, what: str) -> Any:
        self.calls[what] = self.calls.get(what, 0) + 1
        v = self.gpus[h].get(what)
        if isinstance(v, int) and what in self.gpus[h].get("raise", ()):
            raise _err(v)
        if v is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return v

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise _err(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> Any:
        return self._field(h, "name")

    def nvmlDeviceGetUUID(self, h: int) -> Any:
        return self._field(h, "uuid")

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return self._field(h, "util")

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return self._field(h, "memory")

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> Any:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._field(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h: int) -> Any:
        return self._field(h, "power_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> Any:
        return self._field(h, "energy_mj")

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> Any:
        return self._field(h, "procs")


def _full_gpu(**kw: Any) -> dict[str, Any]:
    g: dict[str, Any] = {
        "name": "NVIDIA H200",
        "uuid": "GPU-aaaa",
        "util": SimpleNamespace(gpu=87, memory=41),
        "memory": SimpleNamespace(used=70 * GiB, total=141 * GiB, free=71 * GiB),
        "temp": 64,
        "power_mw": 612_345,
        "energy_mj": 9_000_000,
        "procs": [
            SimpleNamespace(pid=4242, usedGpuMemory=68 * GiB),
            SimpleNamespace(pid=7, usedGpuMemory=None),
        ],
    }
    g.update(kw)
    return g


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


def test_make_backend_on_this_machine_says_why_there_is_no_gpu() -> None:
    nvml = NvmlBackend()
    backend = make_backend()
    assert isinstance(backend, GpuBackend)
    if nvml.available():  # a GPU machine
        assert backend.available() and backend.sample()
        return
    assert isinstance(backend, NoGpuBackend)
    assert not backend.available() and backend.sample() == []
    assert backend.reason == nvml.reason and backend.reason
    assert "NVIDIA" in backend.reason or "NVML" in backend.reason or "nvidia-ml-py" in backend.reason


def test_nvml_backend_reads_every_field() -> None:
    nv = StandInNvml([_full_gpu(), _full_gpu(name=b"NVIDIA H200 NVL", uuid="GPU-bbbb")])
    b = NvmlBackend(nv, clock=lambda: 123)
    assert b.available() and b.reason is None
    s0, s1 = b.sample()
    assert s0 == GpuSample(
        index=0,
        name="NVIDIA H200",
        uuid="GPU-aaaa",
        t=123,
        util_pct=87.0,
        mem_util_pct=41.0,
        vram_used_bytes=70 * GiB,
        vram_total_bytes=141 * GiB,
        temp_c=64.0,
        power_w=612.345,
        energy_mj=9_000_000,
        processes={4242: 68 * GiB},  # a process without a memory figure is left out
    )
    assert (s1.index, s1.name, s1.uuid) == (1, "NVIDIA H200 NVL", "GPU-bbbb")


def test_nvml_backend_gives_none_for_fields_a_gpu_lacks_and_stops_asking() -> None:
    nv = StandInNvml([_full_gpu(power_mw=None, energy_mj=None, procs=None, temp=None, name=None, uuid=None)])
    b = NvmlBackend(nv)
    for _ in range(3):
        (s,) = b.sample()
        assert (s.power_w, s.energy_mj, s.temp_c, s.processes) == (None, None, None, {})
        assert (s.name, s.uuid) == ("GPU 0", "")
        assert s.util_pct == 87.0 and s.vram_used_bytes == 70 * GiB
    assert nv.calls["power_mw"] == 1 and nv.calls["energy_mj"] == 1  # "not supported" is remembered
    assert nv.calls["util"] == 3


def test_nvml_backend_survives_transient_errors() -> None:
    gpu = _full_gpu(util=pynvml.NVML_ERROR_GPU_IS_LOST)
    gpu["raise"] = ("util",)
    nv = StandInNvml([gpu])
    b = NvmlBackend(nv)
    (s,) = b.sample()
    assert s.util_pct is None and s.mem_util_pct is None and s.power_w == 612.345
    b.sample()
    assert nv.calls["util"] == 2  # a transient error is asked again next time


@pytest.mark.parametrize(
    ("code", "want"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver (libnvidia-ml.so not found)"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "the NVIDIA driver is not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "versions differ"),
        (pynvml.NVML_ERROR_UNKNOWN, "NVML could not start"),
    ],
)
def test_nvml_start_failures_are_plain_sentences(code: int, want: str) -> None:
    b = NvmlBackend(StandInNvml([], init_error=code))
    assert not b.available() and b.sample() == []
    assert want in (b.reason or "")


def test_nvml_without_gpus_is_unavailable() -> None:
    b = NvmlBackend(StandInNvml([]))
    assert not b.available() and b.reason == "NVML found no GPU"


def test_fake_energy_counter_follows_power_and_clock() -> None:
    now = iter(range(0, 10**12, 500_000_000))  # each sample 0.5 s later
    fake = FakeGpuBackend(
        [FakeGpu(power_w=200.0, energy_mj=1000), FakeGpu(power_w=None)], clock=lambda: next(now)
    )
    a = fake.sample()
    fake.gpus[0].power_w = 400.0
    b = fake.sample()
    assert b[0].energy_mj - a[0].energy_mj == 200_000  # 400 W x 0.5 s
    assert b[0].t - a[0].t == 500_000_000
    assert a[1].power_w is None and b[1].energy_mj == a[1].energy_mj  # no power, no counting
    assert fake.calls == 2


def test_fake_frames_are_replayed_then_the_last_repeats() -> None:
    f1 = [GpuSample(index=0, name="g", t=0, util_pct=10.0)]
    f2 = [GpuSample(index=0, name="g", t=0, util_pct=90.0)]
    fake = FakeGpuBackend(frames=[f1, f2], clock=lambda: 77)
    assert [fake.sample()[0].util_pct for _ in range(3)] == [10.0, 90.0, 90.0]
    assert fake.sample()[0].t == 77


# ---------------------------------------------------------------------------
# Reduction to per-job figures
# ---------------------------------------------------------------------------


def _s(i: int, t_s: float, **kw: Any) -> GpuSample:
    return GpuSample(index=i, name=f"gpu{i}", t=int(t_s * 1e9), **kw)


def test_reduce_two_gpus_counter_energy() -> None:
    frames = [
        [
            _s(0, 0, util_pct=10, vram_used_bytes=5, vram_total_bytes=100, power_w=100, energy_mj=1_000),
            _s(1, 0, util_pct=30, vram_used_bytes=7, vram_total_bytes=100, power_w=200, energy_mj=5_000),
        ],
        [
            _s(0, 1, util_pct=50, vram_used_bytes=9, vram_total_bytes=100, power_w=300, energy_mj=201_000),
            _s(1, 1, util_pct=70, vram_used_bytes=8, vram_total_bytes=100, power_w=400, energy_mj=305_000),
        ],
    ]
    st = reduce_samples(frames, completion_tokens=50)
    assert st.available and st.gpu_count == 2 and st.samples == 2
    assert st.util_mean_pct == pytest.approx(40.0)
    assert st.vram_peak_bytes == 17 and st.vram_total_bytes == 200
    assert st.power_mean_w == pytest.approx((300 + 700) / 2)
    assert st.energy_j == pytest.approx(200 + 300)
    assert st.energy_per_output_token_j == pytest.approx(10.0)


def test_reduce_falls_back_to_the_power_integral() -> None:
    # GPU without an energy counter: trapezoid over power; a counter that went backwards
    # (driver reload) also falls back.
    frames = [
        [_s(0, 0.0, power_w=100), _s(1, 0.0, power_w=100, energy_mj=9_000)],
        [_s(0, 1.0, power_w=300), _s(1, 1.0, power_w=100, energy_mj=10)],
        [_s(0, 3.0, power_w=300), _s(1, 3.0, power_w=100, energy_mj=20)],
    ]
    st = reduce_samples(frames, completion_tokens=0)
    assert st.energy_j == pytest.approx((200 + 600) + (100 + 200))
    assert st.energy_per_output_token_j is None  # no tokens, no per-token figure


def test_reduce_without_figures_gives_none_not_zero() -> None:
    st = reduce_samples([[_s(0, 0)], [_s(0, 1)]], completion_tokens=10)
    assert st.available and st.samples == 2
    assert (st.util_mean_pct, st.vram_peak_bytes, st.power_mean_w, st.energy_j) == (None, None, None, None)
    assert st.vram_total_bytes is None


def test_reduce_unavailable_and_empty() -> None:
    st = reduce_samples([], 10, available=False, reason="no NVIDIA driver (libnvidia-ml.so not found)")
    assert (
        not st.available and st.reason == "no NVIDIA driver (libnvidia-ml.so not found)" and st.samples == 0
    )
    st = reduce_samples([[], []], 10)
    assert st.available and st.samples == 0 and st.energy_j is None


# ---------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------


async def test_job_sampler_covers_the_window_with_the_energy_counter() -> None:
    fake = FakeGpuBackend([FakeGpu(power_w=250.0, util_pct=80.0, vram_used_bytes=3 * GiB)])
    async with JobGpuSampler(fake, 0.02) as sampler:
        await asyncio.sleep(0.2)
        fake.gpus[0].vram_used_bytes = 5 * GiB
        await asyncio.sleep(0.1)
    st = sampler.stats(completion_tokens=20)
    frames = sampler.frames
    assert len(frames) >= 2 and st.samples == len(frames)
    assert frames[0][0].t < frames[-1][0].t
    window_s = (frames[-1][0].t - frames[0][0].t) / 1e9
    assert st.energy_j == pytest.approx((frames[-1][0].energy_mj - frames[0][0].energy_mj) / 1000)
    assert st.energy_j == pytest.approx(250.0 * window_s, rel=0.01)
    assert st.energy_per_output_token_j == pytest.approx(st.energy_j / 20)
    assert st.util_mean_pct == 80.0 and st.vram_peak_bytes == 5 * GiB and st.power_mean_w == 250.0
    assert sampler.hub._task is None  # no sampling loop lingers after the job


async def test_concurrent_jobs_share_one_sampling_loop() -> None:
    fake = FakeGpuBackend()
    a, b = JobGpuSampler(fake, 0.02), JobGpuSampler(fake, 0.02)
    assert a.hub is b.hub
    async with a:
        async with b:
            await asyncio.sleep(0.15)
        await asyncio.sleep(0.05)
    loop_frames_a = len(a.frames) - 2
    loop_frames_b = len(b.frames) - 2
    # Each tick of the shared loop lands in every open window: calls = loop ticks + 2 per window.
    assert fake.calls == loop_frames_a + 4
    assert loop_frames_b <= loop_frames_a
    assert a.hub._task is None


async def test_sampler_without_gpu_records_why() -> None:
    backend = NoGpuBackend("no NVIDIA driver (libnvidia-ml.so not found)")
    async with JobGpuSampler(backend, 0.01) as sampler:
        await asyncio.sleep(0.03)
    st = sampler.stats(100)
    assert (
        not st.available and st.reason == "no NVIDIA driver (libnvidia-ml.so not found)" and st.samples == 0
    )


async def test_a_failing_backend_never_breaks_the_job() -> None:
    class Broken(FakeGpuBackend):
        def sample(self) -> list[GpuSample]:
            raise RuntimeError("GPU fell off the bus")

    async with JobGpuSampler(Broken(), 0.01) as sampler:
        await asyncio.sleep(0.05)
    st = sampler.stats(5)
    assert st.available and st.samples == 0 and st.energy_j is None


# ---------------------------------------------------------------------------
# Publishing to Redis
# ---------------------------------------------------------------------------


@pytest.fixture
def keys() -> Keys:
    return Keys(f"t{new_id()}:")


@pytest.fixture
async def rconn(redis_server: RedisServer) -> Iterator[aioredis.Redis]:
    r = aioredis.Redis(port=redis_server.port, password=redis_server.password or None)
    yield r
    await r.aclose()


async def test_publish_and_read_back(rconn: aioredis.Redis, keys: Keys) -> None:
    fake = FakeGpuBackend([FakeGpu(name="A"), FakeGpu(name="B", uuid="GPU-b")])
    await publish_samples(rconn, keys, "node-1", fake, 0.001, count=3)
    assert await rconn.xlen(keys.gpu_samples("node-1")) == 3
    (_id, fields), *_ = await rconn.xrange(keys.gpu_samples("node-1"), count=1)
    assert list(fields) == [SAMPLES_FIELD.encode()]
    ticks = await read_gpu_samples(rconn, keys, "node-1", count=5)
    assert len(ticks) == 3 and all(len(t) == 2 for t in ticks)
    assert [s.name for s in ticks[-1]] == ["A", "B"] and ticks[-1][1].uuid == "GPU-b"
    assert ticks[0][0].t <= ticks[-1][0].t  # oldest first
    assert await read_gpu_samples(rconn, keys, "other-node") == []


async def test_publish_caps_the_stream(rconn: aioredis.Redis, keys: Keys) -> None:
    fake = FakeGpuBackend(frames=[[GpuSample(index=0, name="g", t=1)]])
    extra = 400  # approximate trimming works in whole nodes of 100 entries
    await publish_samples(rconn, keys, "n", fake, 0, count=GPU_SAMPLES_MAXLEN + extra)
    n = await rconn.xlen(keys.gpu_samples("n"))
    assert GPU_SAMPLES_MAXLEN <= n < GPU_SAMPLES_MAXLEN + extra


async def test_publish_without_gpu_writes_nothing(rconn: aioredis.Redis, keys: Keys) -> None:
    await asyncio.wait_for(publish_samples(rconn, keys, "n", NoGpuBackend("none"), 0.01), timeout=5)
    assert await rconn.exists(keys.gpu_samples("n")) == 0


async def test_publish_runs_until_cancelled(redis_server: RedisServer, keys: Keys) -> None:
    r = aioredis.Redis(port=redis_server.port, password=redis_server.password or None, decode_responses=True)
    try:
        task = asyncio.create_task(publish_samples(r, keys, "n", FakeGpuBackend(), 0.01))
        for _ in range(1000):
            if await r.xlen(keys.gpu_samples("n")) >= 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        ticks = await read_gpu_samples(r, keys, "n", count=2)  # decoded strings work too
        assert len(ticks) == 2
    finally:
        await r.aclose()


@pytest.mark.parametrize("delay_s", [0, 0.0001, 0.0003, 0.001, 0.003])
async def test_publish_stops_when_cancelled_mid_command(
    rconn: aioredis.Redis, keys: Keys, delay_s: float
) -> None:
    # A cancel that lands inside redis-py's XADD can be swallowed by the client; the loop must
    # still stop (the task would otherwise publish forever).
    for _ in range(5):
        task = asyncio.create_task(publish_samples(rconn, keys, "n", FakeGpuBackend(), 0))
        await asyncio.sleep(delay_s)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def test_gpu_report_reads_every_gpu_and_reduces_the_window() -> None:
    from services.telemetry import gpu_report

    gpus = [
        FakeGpu(name="NVIDIA H200", power_w=400.0),
        FakeGpu(name="NVIDIA H200", energy_mj=None, util_pct=None),
    ]
    text, stats = gpu_report(FakeGpuBackend(gpus), seconds=0.3, interval_s=0.05)
    lines = text.splitlines()
    assert lines[0].startswith("GPU 0  NVIDIA H200") and lines[2].startswith("GPU 1  NVIDIA H200")
    assert "VRAM 10.0 GiB of 80.0 GiB · util 50 %" in lines[1] and "400.0 W" in lines[1]
    assert "util n/a" in lines[3] and "energy counter n/a" in lines[3]
    assert stats.gpu_count == 2 and stats.samples is not None and stats.samples >= 3
    assert stats.util_mean_pct == 50.0 and stats.vram_peak_bytes == 20 * GiB
    # GPU 0's counter and GPU 1's power integral: about 700 W over the window.
    assert stats.energy_j is not None and stats.energy_j > 0
    assert lines[-1].startswith(f"over {stats.samples} samples in 0.3 s")


def _llmconsole_gpu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "console.cli", "gpu", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_llmconsole_gpu_reads_this_hosts_gpus_or_says_why_not() -> None:
    r = _llmconsole_gpu("--seconds", "0.2")
    here = make_backend()
    if here.available():  # a GPU machine: the real readings
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("GPU 0  ") and " samples in 0.2 s" in r.stdout
    else:
        assert r.returncode == 1, r.stderr
        assert r.stdout.strip() == f"No GPU: {here.reason}"
    bad = _llmconsole_gpu("--seconds", "-1")
    assert bad.returncode == 2 and "--seconds must be in (0, 600]" in bad.stderr

"""GPU telemetry behind a small interface: NVML, none, and a fake for tests.

* :class:`GpuBackend` — ``available()``, ``reason``, ``sample() -> list[GpuSample]``.
* :class:`NvmlBackend` — NVIDIA's NVML through nvidia-ml-py. Every field is read on its own: a
  GPU that lacks one (no power sensor, no energy counter, MIG) gives None there, never a crash.
* :class:`NoGpuBackend` — says why there is no GPU ("no NVIDIA driver (libnvidia-ml.so not found)").
* :class:`FakeGpuBackend` — scriptable figures with an injectable clock, for tests.
* :class:`JobGpuSampler` — ``async with`` around a job's engine window; ``stats(tokens)`` reduces
  the samples to :class:`~services.contracts.GpuJobStats`. Concurrent jobs on one backend share
  one sampling loop (a :class:`GpuSampleHub`), so 64 running jobs do not mean 64 NVML pollers.
* :func:`publish_samples` — XADDs the GPU samples of a node to Redis for the console, and
  :func:`read_gpu_samples` reads them back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType, TracebackType
from typing import Any, Protocol, runtime_checkable

from services.contracts import GPU_SAMPLES_MAXLEN, GpuJobStats, GpuSample, Keys

log = logging.getLogger(__name__)

#: The field of a GPU-sample stream entry: a JSON list of GpuSample (one per GPU, one tick).
SAMPLES_FIELD = "samples"

#: NVML marks "not available" per-process memory with this value in older bindings.
_NVML_VALUE_NOT_AVAILABLE = 2**64 - 1


@runtime_checkable
class GpuBackend(Protocol):
    """Where GPU readings come from."""

    @property
    def reason(self) -> str | None:
        """Why there are no readings (None when available)."""
        ...

    def available(self) -> bool:
        """True when :meth:`sample` reads at least one GPU."""
        ...

    def sample(self) -> list[GpuSample]:
        """One reading of every GPU (empty without GPUs). Never raises."""
        ...


# ---------------------------------------------------------------------------
# No GPU
# ---------------------------------------------------------------------------


class NoGpuBackend:
    """The backend of a machine without a usable NVIDIA GPU; ``reason`` says why."""

    def __init__(self, reason: str = "no NVIDIA GPU") -> None:
        self._reason = reason

    @property
    def reason(self) -> str:
        """Why there is no GPU."""
        return self._reason

    def available(self) -> bool:
        """Always False."""
        return False

    def sample(self) -> list[GpuSample]:
        """Always empty."""
        return []


# ---------------------------------------------------------------------------
# NVML
# ---------------------------------------------------------------------------


def _nvml_init_reason(nvml: Any, exc: Exception) -> str:
    """A plain sentence for an NVML start failure."""
    known = {
        "NVMLError_LibraryNotFound": "no NVIDIA driver (libnvidia-ml.so not found)",
        "NVMLError_DriverNotLoaded": "the NVIDIA driver is not loaded",
        "NVMLError_NoPermission": "no permission to query the NVIDIA driver (NVML)",
        "NVMLError_LibRmVersionMismatch": "NVIDIA driver and library versions differ (reboot after a driver update?)",
    }
    for name, sentence in known.items():
        cls = getattr(nvml, name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return sentence
    return f"NVML could not start: {exc}"


@dataclass
class _Device:
    index: int
    handle: Any
    name: str
    uuid: str
    #: Readers that answered "not supported" once; not asked again.
    unsupported: set[str] = field(default_factory=set)


class NvmlBackend:
    """GPU readings through NVML (nvidia-ml-py's ``pynvml``).

    ``nvml`` is the binding module (``pynvml`` by default); tests pass a stand-in because no
    NVIDIA driver exists on the test machines.
    """

    def __init__(self, nvml: ModuleType | Any | None = None, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._devices: list[_Device] = []
        self._reason: str | None = None
        self._nvml: Any = nvml
        if self._nvml is None:
            try:
                import pynvml

                self._nvml = pynvml
            except ImportError:
                self._reason = "nvidia-ml-py is not installed"
                return
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # any NVMLError, or OSError from a broken library
            self._reason = _nvml_init_reason(self._nvml, exc)
            return
        try:
            count = int(self._nvml.nvmlDeviceGetCount())
            for i in range(count):
                h = self._nvml.nvmlDeviceGetHandleByIndex(i)
                name = self._guard_static(lambda h=h: self._nvml.nvmlDeviceGetName(h), f"GPU {i}")
                uuid = self._guard_static(lambda h=h: self._nvml.nvmlDeviceGetUUID(h), "")
                self._devices.append(_Device(i, h, name, uuid))
        except Exception as exc:
            self._reason = f"NVML could not list the GPUs: {exc}"
            self._devices = []
            return
        if not self._devices:
            self._reason = "NVML found no GPU"

    @staticmethod
    def _guard_static(fn: Callable[[], Any], default: str) -> str:
        try:
            v = fn()
        except Exception:
            return default
        return v.decode() if isinstance(v, bytes) else str(v)

    @property
    def reason(self) -> str | None:
        """Why there are no readings (None when NVML sees GPUs)."""
        return self._reason

    def available(self) -> bool:
        """True when NVML started and sees at least one GPU."""
        return bool(self._devices)

    def _read(self, dev: _Device, what: str, fn: Callable[[], Any]) -> Any:
        """One guarded NVML call: None when the GPU cannot answer it."""
        if what in dev.unsupported:
            return None
        try:
            return fn()
        except Exception as exc:
            not_supported = getattr(self._nvml, "NVMLError_NotSupported", None)
            if isinstance(not_supported, type) and isinstance(exc, not_supported):
                dev.unsupported.add(what)
            else:
                log.debug("NVML %s on GPU %d failed: %s", what, dev.index, exc)
            return None

    def _processes(self, dev: _Device) -> dict[int, int]:
        procs = self._read(
            dev, "processes", lambda: self._nvml.nvmlDeviceGetComputeRunningProcesses(dev.handle)
        )
        out: dict[int, int] = {}
        for p in procs or []:
            used = getattr(p, "usedGpuMemory", None)
            if used is not None and used != _NVML_VALUE_NOT_AVAILABLE:
                out[int(p.pid)] = int(used)
        return out

    def sample(self) -> list[GpuSample]:
        """One reading of every GPU; a field the GPU cannot give is None."""
        nv = self._nvml
        out: list[GpuSample] = []
        for dev in self._devices:
            h = dev.handle
            util = self._read(dev, "util", lambda h=h: nv.nvmlDeviceGetUtilizationRates(h))
            mem = self._read(dev, "memory", lambda h=h: nv.nvmlDeviceGetMemoryInfo(h))
            temp = self._read(
                dev,
                "temperature",
                lambda h=h: nv.nvmlDeviceGetTemperature(h, getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
            )
            power_mw = self._read(dev, "power", lambda h=h: nv.nvmlDeviceGetPowerUsage(h))
            energy = self._read(dev, "energy", lambda h=h: nv.nvmlDeviceGetTotalEnergyConsumption(h))
            out.append(
                GpuSample(
                    index=dev.index,
                    name=dev.name,
                    uuid=dev.uuid,
                    t=self._clock(),
                    util_pct=float(util.gpu) if util is not None else None,
                    mem_util_pct=float(util.memory) if util is not None else None,
                    vram_used_bytes=int(mem.used) if mem is not None else None,
                    vram_total_bytes=int(mem.total) if mem is not None else None,
                    temp_c=float(temp) if temp is not None else None,
                    power_w=power_mw / 1000.0 if power_mw is not None else None,
                    energy_mj=int(energy) if energy is not None else None,
                    processes=self._processes(dev),
                )
            )
        return out

    def close(self) -> None:
        """Shut NVML down (optional; the process exit does it too)."""
        if self._devices:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown failed: %s", exc)
            self._devices = []
            self._reason = "closed"


def make_backend() -> GpuBackend:
    """NVML when it starts and sees a GPU, else a :class:`NoGpuBackend` that says why."""
    nvml = NvmlBackend()
    if nvml.available():
        return nvml
    return NoGpuBackend(nvml.reason or "no NVIDIA GPU")


# ---------------------------------------------------------------------------
# Fake
# ---------------------------------------------------------------------------


@dataclass
class FakeGpu:
    """One scripted GPU; change its fields between samples. ``None`` fields read as "not supported".

    The energy counter advances by ``power_w`` × the clock time between samples (as a real
    counter would), unless ``energy_mj`` is None.
    """

    name: str = "Fake GPU 80GB"
    uuid: str = "GPU-00000000-fake"
    util_pct: float | None = 50.0
    mem_util_pct: float | None = 20.0
    vram_used_bytes: int | None = 10 * 2**30
    vram_total_bytes: int | None = 80 * 2**30
    temp_c: float | None = 60.0
    power_w: float | None = 300.0
    energy_mj: int | None = 1_000_000
    processes: dict[int, int] = field(default_factory=dict)


class FakeGpuBackend:
    """Scriptable GPU readings for tests.

    ``gpus`` are live :class:`FakeGpu` objects the test may change; ``clock`` gives each
    sample's ``t`` (ns) and drives the energy counters. ``frames``, if given, are consumed one
    per :meth:`sample` call instead (the last one repeats), with ``t`` filled from the clock.
    """

    def __init__(
        self,
        gpus: Sequence[FakeGpu] | None = None,
        *,
        frames: Sequence[Sequence[GpuSample]] | None = None,
        clock: Callable[[], int] = time.time_ns,
        reason: str | None = None,
    ) -> None:
        self.gpus = list(gpus) if gpus is not None else [FakeGpu()]
        self._frames = [list(f) for f in frames] if frames is not None else None
        self._clock = clock
        self._reason = reason
        self._last_t: int | None = None
        self.calls = 0

    @property
    def reason(self) -> str | None:
        """Why there are no readings (set to simulate an unavailable backend)."""
        return self._reason

    def available(self) -> bool:
        """True unless constructed with a ``reason``."""
        return self._reason is None

    def sample(self) -> list[GpuSample]:
        """The next scripted reading."""
        self.calls += 1
        if not self.available():
            return []
        now = self._clock()
        if self._frames is not None:
            frame = self._frames[min(self.calls - 1, len(self._frames) - 1)]
            return [s.model_copy(update={"t": now}) if s.t == 0 else s for s in frame]
        dt_s = (now - self._last_t) / 1e9 if self._last_t is not None else 0.0
        self._last_t = now
        out = []
        for i, g in enumerate(self.gpus):
            if g.energy_mj is not None and g.power_w is not None:
                g.energy_mj += round(g.power_w * dt_s * 1000)
            out.append(
                GpuSample(
                    index=i,
                    name=g.name,
                    uuid=g.uuid,
                    t=now,
                    util_pct=g.util_pct,
                    mem_util_pct=g.mem_util_pct,
                    vram_used_bytes=g.vram_used_bytes,
                    vram_total_bytes=g.vram_total_bytes,
                    temp_c=g.temp_c,
                    power_w=g.power_w,
                    energy_mj=g.energy_mj,
                    processes=dict(g.processes),
                )
            )
        return out


# ---------------------------------------------------------------------------
# Per-job statistics
# ---------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _energy_one_gpu(series: list[GpuSample]) -> float | None:
    """Joules used by one GPU over its samples: counter difference, else the power integral."""
    counted = [s for s in series if s.energy_mj is not None]
    if len(counted) >= 2:
        diff = counted[-1].energy_mj - counted[0].energy_mj  # type: ignore[operator]
        if diff >= 0:  # a driver reload resets the counter: fall back to power then
            return diff / 1000.0
    powered = [s for s in series if s.power_w is not None]
    if len(powered) < 2:
        return None
    joules = 0.0
    for a, b in itertools.pairwise(powered):
        joules += (a.power_w + b.power_w) / 2 * max(0, b.t - a.t) / 1e9  # type: ignore[operator]
    return joules


def reduce_samples(
    frames: Sequence[Sequence[GpuSample]],
    completion_tokens: int | None,
    *,
    available: bool = True,
    reason: str | None = None,
) -> GpuJobStats:
    """Reduce a job window's readings (one frame per tick, one sample per GPU) to per-job figures.

    Utilisation is the mean over all GPUs and samples; peak VRAM and mean power add the GPUs of
    a frame up (a tensor-parallel job uses them all); energy is the sum over GPUs of each energy
    counter's difference, or of the power integral where a GPU has no counter. The figures are
    the whole GPUs', so jobs running at the same time share them.
    """
    if not available:
        return GpuJobStats(available=False, reason=reason or "no GPU")
    frames = [f for f in frames if f]
    if not frames:
        return GpuJobStats(available=True, reason=reason or "no samples in the job window")
    utils = [s.util_pct for f in frames for s in f if s.util_pct is not None]
    vram_sums = [sum(s.vram_used_bytes for s in f if s.vram_used_bytes is not None) for f in frames]
    vram_has = [any(s.vram_used_bytes is not None for s in f) for f in frames]
    totals = [sum(s.vram_total_bytes for s in f if s.vram_total_bytes is not None) for f in frames]
    powers = [
        sum(s.power_w for s in f if s.power_w is not None)
        for f in frames
        if any(s.power_w is not None for s in f)
    ]
    by_gpu: dict[int, list[GpuSample]] = {}
    for f in frames:
        for s in f:
            by_gpu.setdefault(s.index, []).append(s)
    per_gpu = [_energy_one_gpu(sorted(series, key=lambda s: s.t)) for series in by_gpu.values()]
    energies = [e for e in per_gpu if e is not None]
    energy = sum(energies) if energies else None
    per_token = energy / completion_tokens if energy is not None and completion_tokens else None
    peak = max((v for v, has in zip(vram_sums, vram_has, strict=True) if has), default=None)
    return GpuJobStats(
        available=True,
        reason=reason,
        gpu_count=len(by_gpu),
        samples=len(frames),
        util_mean_pct=_mean(utils),
        vram_peak_bytes=peak,
        vram_total_bytes=max(totals) or None,
        power_mean_w=_mean(powers),
        energy_j=energy,
        energy_per_output_token_j=per_token,
    )


async def _take(backend: GpuBackend) -> list[GpuSample]:
    """One reading off the event loop (NVML calls block); a failing backend gives nothing."""
    try:
        return await asyncio.to_thread(backend.sample)
    except Exception as exc:  # a backend must never break a job
        log.warning("GPU sample failed: %s", exc)
        return []


class GpuSampleHub:
    """One sampling loop per backend, shared by every job window open on it.

    The loop runs only while a window is open and stops by itself after the last one closes.
    """

    def __init__(self, backend: GpuBackend, interval_s: float) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self._windows: set[JobGpuSampler] = set()
        self._task: asyncio.Task[None] | None = None

    def job(self) -> JobGpuSampler:
        """A new job window on this hub."""
        return JobGpuSampler(self)

    def _open(self, window: JobGpuSampler) -> None:
        self._windows.add(window)
        task, loop = self._task, asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._loop(), name="gpu-sampler")

    def _close(self, window: JobGpuSampler) -> None:
        self._windows.discard(window)
        if not self._windows and self._task is not None:
            self._task.cancel()  # idle: no loop lingers after the last job
            self._task = None

    async def _loop(self) -> None:
        while self._windows:
            await asyncio.sleep(self.interval_s)
            if not self._windows:
                break
            frame = await _take(self.backend)
            for w in list(self._windows):
                w.frames.append(frame)


#: One hub per (backend, interval): concurrent jobs of a worker share the sampling.
_hubs: weakref.WeakKeyDictionary[Any, dict[float, GpuSampleHub]] = weakref.WeakKeyDictionary()


def _hub_for(backend: GpuBackend, interval_s: float) -> GpuSampleHub:
    try:
        per = _hubs.setdefault(backend, {})
    except TypeError:  # not weak-referenceable: a private hub
        return GpuSampleHub(backend, interval_s)
    return per.setdefault(interval_s, GpuSampleHub(backend, interval_s))


class JobGpuSampler:
    """Samples the GPUs over one job's engine window: ``async with`` it, then ``stats(tokens)``.

    Takes a reading when the window opens and when it closes (so the energy counter spans the
    whole window) and, in between, every ``interval_s`` from the shared hub. Without a GPU it
    samples nothing and ``stats`` says why.
    """

    def __init__(self, source: GpuBackend | GpuSampleHub, interval_s: float = 0.1) -> None:
        self.hub = source if isinstance(source, GpuSampleHub) else _hub_for(source, interval_s)
        self.frames: list[list[GpuSample]] = []
        self._available = self.hub.backend.available()

    async def __aenter__(self) -> JobGpuSampler:
        if self._available:
            self.frames.append(await _take(self.hub.backend))
            self.hub._open(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._available:
            self.hub._close(self)
            self.frames.append(await _take(self.hub.backend))

    def stats(self, completion_tokens: int | None) -> GpuJobStats:
        """The window's per-job figures (energy per output token from ``completion_tokens``)."""
        return reduce_samples(
            self.frames, completion_tokens, available=self._available, reason=self.hub.backend.reason
        )


# ---------------------------------------------------------------------------
# Publishing to Redis
# ---------------------------------------------------------------------------


def encode_samples(samples: Sequence[GpuSample]) -> str:
    """The stream entry's value: a JSON list of samples."""
    return json.dumps([s.model_dump(mode="json") for s in samples], separators=(",", ":"))


def decode_samples(raw: str | bytes) -> list[GpuSample]:
    """Inverse of :func:`encode_samples`."""
    return [GpuSample.model_validate(d) for d in json.loads(raw)]


def _raise_if_cancel_swallowed() -> None:
    """Re-raise a cancellation that a Redis call swallowed.

    redis-py's asyncio client can return normally from a command during which its task was
    cancelled (seen with 8.1; cf. redis/redis-py#2028), and a loop would then never stop. The
    task still counts the pending cancel request, so it is honoured here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def publish_samples(
    redis: Any, keys: Keys, node_id: str, backend: GpuBackend, interval: float, *, count: int | None = None
) -> None:
    """XADD one entry per tick (all GPUs of the node) to ``keys.gpu_samples(node_id)``, capped.

    Runs until cancelled (or ``count`` entries, for tests); returns at once without a GPU.
    Redis errors propagate: the caller reconnects and calls again.
    """
    if not backend.available():
        log.info("no GPU samples to publish: %s", backend.reason)
        return
    stream = keys.gpu_samples(node_id)
    sent = 0
    while count is None or sent < count:
        samples = await _take(backend)
        if samples:
            await redis.xadd(
                stream, {SAMPLES_FIELD: encode_samples(samples)}, maxlen=GPU_SAMPLES_MAXLEN, approximate=True
            )
            _raise_if_cancel_swallowed()
            sent += 1
        if count is None or sent < count:
            await asyncio.sleep(interval)


async def read_gpu_samples(redis: Any, keys: Keys, node_id: str, count: int = 1) -> list[list[GpuSample]]:
    """The newest ``count`` ticks of a node's GPU samples, oldest first."""
    entries = await redis.xrevrange(keys.gpu_samples(node_id), count=count)
    out: list[list[GpuSample]] = []
    for _id, fields in reversed(entries):
        raw = fields.get(SAMPLES_FIELD) if SAMPLES_FIELD in fields else fields.get(SAMPLES_FIELD.encode())
        if raw is not None:
            out.append(decode_samples(raw))
    return out


# ---------------------------------------------------------------------------
# ``llmconsole gpu``: what NVML reads on this host, and what a job would record
# ---------------------------------------------------------------------------


def _fmt(v: float | None, unit: str, scale: float = 1.0, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v / scale:.{digits}f}{unit}"


def gpu_report(backend: GpuBackend, seconds: float = 2.0, interval_s: float = 0.1) -> tuple[str, GpuJobStats]:
    """Sample ``backend`` for ``seconds`` as a job's sampler would; the readable report and the stats.

    The report has one line per GPU (its last reading) and the figures a job of that window
    would store (mean utilisation, peak VRAM, mean power, energy from the counter).
    """
    if not backend.available():
        reason = backend.reason or "no NVIDIA GPU"
        return f"No GPU: {reason}", reduce_samples([], None, available=False, reason=reason)
    frames: list[list[GpuSample]] = []
    deadline = time.monotonic() + seconds
    while True:
        frames.append(backend.sample())
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    lines = []
    for s in frames[-1]:
        lines.append(
            f"GPU {s.index}  {s.name}  {s.uuid}\n"
            f"    VRAM {_fmt(s.vram_used_bytes, ' GiB', 2**30, 1)} of {_fmt(s.vram_total_bytes, ' GiB', 2**30, 1)}"
            f" · util {_fmt(s.util_pct, ' %')} (memory {_fmt(s.mem_util_pct, ' %')})"
            f" · {_fmt(s.temp_c, ' °C')} · {_fmt(s.power_w, ' W', 1, 1)}"
            f" · energy counter {_fmt(s.energy_mj, ' J', 1000, 1)}"
            f" · {len(s.processes)} processes holding VRAM"
        )
    st = reduce_samples(frames, None)
    lines.append(
        f"over {len(frames)} samples in {seconds:g} s (what a job of this window records): "
        f"util mean {_fmt(st.util_mean_pct, ' %', 1, 1)}, peak VRAM {_fmt(st.vram_peak_bytes, ' GiB', 2**30, 2)}, "
        f"power mean {_fmt(st.power_mean_w, ' W', 1, 1)}, energy {_fmt(st.energy_j, ' J', 1, 2)}"
    )
    return "\n".join(lines), st


def main(argv: Sequence[str] | None = None) -> int:
    """``llmconsole gpu`` / ``python -m services.telemetry``: read this host's GPUs through NVML once."""
    import argparse

    ap = argparse.ArgumentParser(prog="llmconsole gpu", description=main.__doc__)
    ap.add_argument("--seconds", type=float, default=2.0, help="sampling window (default 2)")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between samples (default 0.1)")
    ap.add_argument("--json", action="store_true", help="print the last samples and the stats as JSON")
    args = ap.parse_args(argv)
    if not (0 < args.seconds <= 600 and 0.01 <= args.interval <= 60):
        ap.error("--seconds must be in (0, 600] and --interval in [0.01, 60]")
    backend = make_backend()
    text, stats = gpu_report(backend, args.seconds, args.interval)
    if args.json:
        last = backend.sample() if backend.available() else []
        print(json.dumps({"samples": [s.model_dump() for s in last], "stats": stats.model_dump()}, indent=1))
    else:
        print(text)
    return 0 if backend.available() else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())

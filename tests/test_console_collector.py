"""The collector: rates over a window, failures kept per panel, GPU memory attributed to services."""

from __future__ import annotations

from console.collector import Collector
from console.fakes import FakeClock, fake_sources, fixed_wall
from services.queue import QueueStats


class ScriptedQueue:
    """A queue whose 'succeeded' counter follows a script, one value per read."""

    def __init__(self, done: list[int]) -> None:
        self.done = done
        self.reads = 0

    async def queue_stats(self) -> QueueStats:
        value = self.done[min(self.reads, len(self.done) - 1)]
        self.reads += 1
        return QueueStats(0, 0, 0, 0, 1, {"succeeded": value, "submitted": value})


async def test_rates_are_taken_over_a_few_seconds() -> None:
    sources = fake_sources()
    sources.queue = ScriptedQueue([0, 10, 10, 10, 10, 10, 10, 10])
    c = Collector(sources, clock=FakeClock(), wall=fixed_wall)
    rates = [(await c.collect()).queue.done_per_s for _ in range(8)]
    # 10 jobs in the first second, then none: the rate fades over the 5 s window, then reads 0.
    assert rates == [None, 10.0, 5.0, 10 / 3, 2.5, 2.0, 0.0, 0.0]


async def test_a_counter_reset_gives_no_rate_instead_of_a_negative_one() -> None:
    sources = fake_sources()
    sources.queue = ScriptedQueue([100, 200, 5])
    c = Collector(sources, clock=FakeClock(), wall=fixed_wall)
    rates = [(await c.collect()).queue.done_per_s for _ in range(3)]
    assert rates == [None, 100.0, None]


async def test_one_failing_source_does_not_blank_the_others() -> None:
    class Broken:
        async def queue_stats(self) -> QueueStats:
            raise RuntimeError("bug in a source")

    sources = fake_sources(engine_down=True)
    sources.queue = Broken()
    snap = await Collector(sources, clock=FakeClock(), wall=fixed_wall).collect()
    assert snap.queue.error == "queue: RuntimeError: bug in a source"
    assert snap.engine.error is not None and "engine down" in snap.engine.error
    assert len(snap.services.services) == 5 and len(snap.jobs.jobs) == 20


async def test_gpu_memory_is_attributed_to_the_program_whose_child_holds_it() -> None:
    snap = await Collector(fake_sources(gpus=2), clock=FakeClock(), wall=fixed_wall).collect()
    assert [g.index for g in snap.gpus.gpus] == [0, 1]
    procs = snap.gpus.gpus[0].processes
    assert [(p.pid, p.program) for p in procs] == [(4150, "engine"), (7777, "")]
    assert snap.gpus.no_gpu_reason is None


async def test_no_gpu_reason_says_where() -> None:
    snap = await Collector(fake_sources(gpu=False), clock=FakeClock(), wall=fixed_wall).collect()
    assert snap.gpus.gpus == ()
    reason = snap.gpus.no_gpu_reason or ""
    assert "this host" in reason and "gpu-node-1" in reason


async def test_sources_down_raise_plain_sentences() -> None:
    sources = fake_sources(redis_down=True, supervisor_down=True)
    snap = await Collector(sources, clock=FakeClock(), wall=fixed_wall).collect()
    assert snap.queue.error == "Redis down at 127.0.0.1:6379 (ConnectionError)"
    assert snap.jobs.error == snap.queue.error
    assert snap.services.error is not None and snap.services.error.startswith("supervisord is not running")


async def test_local_gpus_come_from_the_telemetry_backend() -> None:
    from console.sources import NvmlGpu
    from services.settings import load_settings
    from services.telemetry import FakeGpu, FakeGpuBackend

    settings = load_settings(node_id="here")
    backend = FakeGpuBackend([FakeGpu(name="NVIDIA H200", processes={4150: 2**30})], clock=lambda: 10**18)
    reading = await NvmlGpu(settings, backend=backend).read()
    assert reading.reason is None
    assert [(s.name, s.processes) for s in reading.samples] == [("NVIDIA H200", {4150: 2**30})]
    none = await NvmlGpu(settings, backend=FakeGpuBackend(reason="no NVIDIA driver")).read()
    assert none.samples == () and none.reason == "no NVIDIA driver"
    # On this machine, whatever NVML says, the answer is a reading, never an exception: the
    # GPUs NVML sees, or no sample and NVML's own reason.
    from services.telemetry import make_backend

    expected = make_backend()
    here = await NvmlGpu(settings).read()
    if expected.available():
        assert here.reason is None and len(here.samples) == len(expected.sample())
    else:
        assert (here.samples, here.reason) == ((), expected.reason)

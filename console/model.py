"""The immutable snapshot the console draws, and the small formatters it uses.

The collector builds one :class:`Snapshot` per refresh in a worker; widgets
only read snapshots, so drawing never waits on I/O and a panel whose source
failed carries the reason instead of data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.contracts import JobView


@dataclass(frozen=True)
class QueueView:
    """Queue depth and throughput (from ``JobQueue.stats`` and counter deltas)."""

    waiting: int = 0
    in_flight: int = 0
    active: int = 0
    consumers: int = 0
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    dead: int = 0
    refused: int = 0
    redelivered: int = 0
    #: Jobs finished (any final state) per second over the last few seconds.
    done_per_s: float | None = None
    #: Jobs submitted per second over the last few seconds.
    submitted_per_s: float | None = None
    #: Recent values of ``waiting`` (oldest first) for the sparkline.
    depth_history: tuple[float, ...] = ()
    #: Redis memory used and its maxmemory (0 = none), bytes.
    redis_used: int | None = None
    redis_limit: int | None = None
    #: Final jobs Redis retains, and how long ago the oldest of them finished (s).
    retained: int | None = None
    oldest_age_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class EngineView:
    """The engine's own view of its load, from its Prometheus ``/metrics``."""

    url: str = ""
    running: float | None = None
    waiting: float | None = None
    #: KV cache usage as a fraction 0..1.
    kv_usage: float | None = None
    #: Prefix cache hits / queries over the last few seconds (lifetime when nothing new happened).
    prefix_hit_rate: float | None = None
    prompt_tps: float | None = None
    generation_tps: float | None = None
    requests_total: float | None = None
    preemptions: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class GpuProcess:
    """VRAM held by one process, attributed to a supervised program where possible."""

    pid: int
    program: str  # supervisord program name, or "" if the pid is not one of ours
    vram_bytes: int


@dataclass(frozen=True)
class GpuView:
    """One GPU as last sampled (locally through NVML, or from a node's sample stream)."""

    node: str
    index: int
    name: str
    util_pct: float | None = None
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    temp_c: float | None = None
    power_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    #: Seconds since the sample was taken.
    age_s: float | None = None


@dataclass(frozen=True)
class NodeView:
    """An inference worker node from its Redis heartbeat, with its share of the recent jobs."""

    node: str
    engine: str = ""
    model: str = ""
    gpu: str = ""
    in_flight: int = 0
    alive: bool = True
    age_s: float | None = None
    #: GPUs in words ("2× NVIDIA H100 80GB HBM3"), "" when none or unknown.
    gpus: str = ""
    #: Jobs routers may have in flight on it (engine max_num_seqs × factor); 0 = unknown.
    capacity: int = 0
    #: up (takes jobs), draining (finishes its own, takes none) or lost (heartbeat expired).
    state: str = "up"
    #: Of the recent jobs that finished on a node: this node's share, and its prefix-cache
    #: hit rate (Σ cached / Σ prompt tokens); None when it finished none of them.
    share: float | None = None
    hit_rate: float | None = None


@dataclass(frozen=True)
class GpusView:
    """The GPU panel: every GPU seen, the nodes, and why there is no GPU if so."""

    gpus: tuple[GpuView, ...] = ()
    nodes: tuple[NodeView, ...] = ()
    #: Why no GPU is shown (no driver, no NVML, no node publishing samples).
    no_gpu_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ServiceView:
    """One supervisord program."""

    name: str
    group: str
    state: str
    pid: int
    uptime_s: int | None
    description: str

    @property
    def full_name(self) -> str:
        """The name supervisord's control calls take (``group:name`` inside a group)."""
        return self.name if self.group == self.name else f"{self.group}:{self.name}"


@dataclass(frozen=True)
class ServicesView:
    """The services panel."""

    services: tuple[ServiceView, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class JobsView:
    """Recent jobs, newest first."""

    jobs: tuple[JobView, ...] = ()
    events_per_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything the overview shows, as of one refresh."""

    seq: int = 0
    #: Wall-clock time of the refresh (unix seconds); shown only as a clock, never in tests.
    taken_at: float = 0.0
    queue: QueueView = field(default_factory=QueueView)
    engine: EngineView = field(default_factory=EngineView)
    gpus: GpusView = field(default_factory=GpusView)
    services: ServicesView = field(default_factory=ServicesView)
    jobs: JobsView = field(default_factory=JobsView)
    #: How long the collection took (seconds).
    collect_s: float = 0.0


# ---------------------------------------------------------------------------
# Formatters (shared by panels and screens)
# ---------------------------------------------------------------------------

DASH = "–"


def fmt_bytes(n: int | float | None) -> str:
    """1536 → '1.5 KiB'; None → '–'."""
    if n is None:
        return DASH
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - loop always returns


def fmt_bytes_pair(used: int | None, total: int | None) -> str:
    """'126.5/140.4 GiB': both in the unit of the total (the larger one)."""
    if used is None or total is None:
        return f"{fmt_bytes(used)}/{fmt_bytes(total)}"
    value, unit = float(total), "B"
    scale = 1.0
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
        scale *= 1024
    if unit == "B":
        return f"{used}/{total} B"
    return f"{used / scale:.1f}/{total / scale:.1f} {unit}"


def fmt_s(seconds: float | None) -> str:
    """A latency: '850ms', '1.25s', '2m05s'; None → '–'."""
    if seconds is None:
        return DASH
    if seconds < 0:
        return f"-{fmt_s(-seconds)}"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def fmt_uptime(seconds: int | None) -> str:
    """Uptime as '45s', '12m03s', '3h07m', '2d04h'; None → '–'."""
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_rate(value: float | None, unit: str = "/s") -> str:
    """A rate with a sensible number of digits; None → '–'."""
    if value is None:
        return DASH
    if value >= 100:
        return f"{value:,.0f}{unit}"
    if value >= 10:
        return f"{value:.1f}{unit}"
    return f"{value:.2f}{unit}"


def fmt_pct(frac: float | None) -> str:
    """0.123 → '12.3%'; None → '–'."""
    return DASH if frac is None else f"{frac * 100:.1f}%"


def fmt_num(value: float | None) -> str:
    """A count: 1234 → '1,234'; None → '–'."""
    if value is None:
        return DASH
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def bar(frac: float | None, width: int) -> str:
    """A text bar of ``width`` cells filled to ``frac`` (eighths for a smooth edge)."""
    if frac is None or width <= 0:
        return " " * max(width, 0)
    frac = min(max(frac, 0.0), 1.0)
    eighths = round(frac * width * 8)
    if frac > 0 and eighths == 0:
        eighths = 1  # something, however small, is not nothing
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part else ""
    return ("█" * full + partial).ljust(width)


SPARK_BARS = " ▁▂▃▄▅▆▇█"


def spark_rows(values: Sequence[float], width: int, height: int) -> list[str]:
    """A sparkline of ``values`` (oldest first) in ``height`` text rows, scaled from zero to the peak.

    The newest values fill the right edge; with more values than columns, each column
    shows the largest value it covers. Zero is the baseline (a flat queue of 100 is a full
    bar, not an empty one), and any non-zero value shows at least the lowest bar.
    """
    if width <= 0 or height <= 0:
        return []
    vals = list(values)[-width * 8 :]
    if len(vals) > width:
        step = len(vals) / width
        vals = [max(vals[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    peak = max(vals, default=0.0)
    levels = height * 8
    cols = []
    for v in vals:
        n = 0 if peak <= 0 or v <= 0 else max(1, round(v / peak * levels))
        cols.append(n)
    pad = width - len(cols)
    rows = []
    for r in range(height - 1, -1, -1):  # top row first
        line = []
        for n in cols:
            part = min(max(n - r * 8, 0), 8)
            line.append(SPARK_BARS[part])
        rows.append(" " * pad + "".join(line))
    return rows

"""What a benchmark run is asked to do, and what it reports while running.

:class:`BenchConfig` is the one description of a run, shared by the CLI and the
console's launcher form; it validates itself (pydantic), so a bad value is a
clear message, never a traceback. Missing workload values take the
:class:`~services.settings.Settings` defaults (``INPUT_TOKENS``,
``OUTPUT_TOKENS``, ``PREFIX_SHARE``) via :meth:`BenchConfig.resolved`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.contracts import ID_PATTERN, MAX_INPUT_TOKENS, MAX_LABEL_CHARS, MAX_OUTPUT_TOKENS, RoutingPolicy
from services.settings import Settings

PathName = Literal["pipeline", "direct", "both"]
#: vLLM's ``--dataset-name`` values this benchmark reads (see :mod:`bench.datasets`).
DatasetName = Literal["random", "sharegpt", "prefix_repetition", "custom"]
SweepParam = Literal["concurrency", "rate"]

#: Names of the service level objectives vLLM's ``--goodput`` accepts (milliseconds).
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
#: Percentiles reported when none are asked for.
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
#: Concurrency used when neither a rate nor a concurrency is given (a closed loop,
#: rather than vLLM's default of every request at once).
DEFAULT_CONCURRENCY = 16


class SweepSpec(BaseModel):
    """A sweep: the same workload at increasing load until the system saturates.

    Step ``i`` saturates when its marginal throughput gain
    ``(T_i / T_{i-1} - 1) / (L_i / L_{i-1} - 1)`` (1.0 = throughput grows as fast as
    the load) falls below ``min_gain``, or when its median TTFT exceeds
    ``latency_factor`` times the first step's. The knee is the last step before
    the first saturated one.
    """

    model_config = ConfigDict(extra="forbid")

    param: SweepParam = Field(description="What the sweep varies: 'concurrency' or 'rate' (req/s).")
    values: list[float] = Field(min_length=2, max_length=64, description="Increasing load levels.")
    min_gain: float = Field(
        0.25, ge=0.0, le=1.0, description="Marginal throughput gain below which a step saturates."
    )
    latency_factor: float = Field(
        10.0, gt=1.0, description="Median TTFT growth over the first step that counts as saturated."
    )
    stop_at_knee: bool = Field(True, description="Stop after the first saturated step.")

    @field_validator("values")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(x <= 0 or not math.isfinite(x) for x in v):
            raise ValueError("sweep values must be positive numbers")
        if any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError("sweep values must be strictly increasing")
        return v

    @model_validator(mode="after")
    def _integer_concurrency(self) -> SweepSpec:
        if self.param == "concurrency" and any(x != int(x) for x in self.values):
            raise ValueError("concurrency sweep values must be whole numbers")
        return self


class BenchConfig(BaseModel):
    """One benchmark run (or sweep). Every field has a CLI flag of the same name."""

    model_config = ConfigDict(extra="forbid")

    # --- workload ---------------------------------------------------------
    input_tokens: int | None = Field(
        None, ge=1, le=MAX_INPUT_TOKENS, description="Prompt length in tokens (default: INPUT_TOKENS)."
    )
    output_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_OUTPUT_TOKENS,
        description="Tokens to generate per request (default: OUTPUT_TOKENS).",
    )
    prefix_share: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Share of the prompt that is the run's shared prefix (default: PREFIX_SHARE).",
    )
    range_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Lengths vary uniformly in [n·(1−r), n·(1+r)], as vLLM's random dataset.",
    )
    dataset: str | None = Field(
        None,
        description="Dataset file (vLLM's --dataset-path): JSONL of {'prompt': str, 'output_tokens': int?} "
        "lines (custom), or ShareGPT JSON (sharegpt).",
    )
    dataset_name: DatasetName | None = Field(
        None,
        description="vLLM's --dataset-name: random and prefix_repetition are synthetic (prefix_repetition = "
        "prefix groups), sharegpt and custom (JSONL) read the dataset file. None: random without a file, "
        "else guessed from the file (a JSON list is sharegpt).",
    )
    requests: int = Field(
        100, ge=1, le=1_000_000, description="Measured requests (per path, per sweep step)."
    )
    prefix_groups: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Prefix groups: each request belongs to one (seeded, balanced), and each group has "
        "its own shared prefix (SGLang's generated-shared-prefix, vLLM's prefix_repetition).",
    )
    warmup: int = Field(0, ge=0, le=100_000, description="Requests sent first and not counted.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of lengths, suffixes and arrival times.")

    # --- load ---------------------------------------------------------------
    concurrency: int | None = Field(None, ge=1, le=100_000, description="Most requests in flight at once.")
    rate: float | None = Field(
        None, gt=0, description="Requests per second (Poisson/gamma arrivals); None = ∞."
    )
    burstiness: float = Field(
        1.0, gt=0, description="Gamma shape of inter-arrival times: 1 = Poisson, <1 bursty."
    )
    sweep: SweepSpec | None = None

    # --- what to measure and how -------------------------------------------
    path: PathName = Field("pipeline", description="pipeline, direct (engine API), or both interleaved.")
    routing: RoutingPolicy | None = Field(
        None, description="Routing policy of the run's jobs (default: the proxy workers' ROUTING)."
    )
    pipeline_api: Literal["jobs", "openai"] = Field(
        "jobs",
        description="How the pipeline path sends: the job API (engine-side timings), or the OpenAI door "
        "(streamed; TTFT, TPOT and ITL timed by the client as on the direct path).",
    )
    goodput: dict[str, float] = Field(
        default_factory=dict, description="SLOs in ms for goodput, keys ttft/tpot/e2el (vLLM's --goodput)."
    )
    percentiles: list[float] = Field(
        default_factory=lambda: list(DEFAULT_PERCENTILES), min_length=1, max_length=20
    )
    timeout_s: float = Field(
        1800.0, gt=0, description="Per-request limit; a request over it counts as failed."
    )
    poll_wait_s: float = Field(30.0, gt=0, le=60, description="Long-poll wait per GET on the pipeline path.")
    stall_notice_s: float = Field(
        60.0,
        ge=1,
        le=86_400,
        description="Say so (with what the queue shows) when no request has finished for this long while "
        "some are in flight; again after each further such period. A notice, not a limit.",
    )

    # --- identity and output -------------------------------------------------
    label: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    run_id: str | None = Field(None, pattern=ID_PATTERN)
    out: str | None = Field(None, description="Results folder (default: RESULTS_DIR/<run_id>).")
    store: bool = Field(True, description="Also store the run in Redis (for the console).")
    plots: bool = Field(True, description="Write PNG plots.")

    @field_validator("goodput")
    @classmethod
    def _goodput_names(cls, v: dict[str, float]) -> dict[str, float]:
        for name, ms in v.items():
            if name not in GOODPUT_METRICS:
                raise ValueError(f"goodput metric {name!r} is not one of {', '.join(GOODPUT_METRICS)}")
            if not (ms >= 0 and math.isfinite(ms)):
                raise ValueError(f"goodput SLO for {name} must be a non-negative number of ms")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentile_range(cls, v: list[float]) -> list[float]:
        for p in v:
            if not 0 < p <= 100:
                raise ValueError(f"percentile {p} is not in (0, 100]")
        return sorted(set(v))

    @model_validator(mode="after")
    def _consistent(self) -> BenchConfig:
        if self.dataset is not None and (self.input_tokens is not None or self.range_ratio):
            raise ValueError("a dataset brings its own prompts: drop input_tokens / range_ratio")
        name = self.dataset_name
        if name in ("sharegpt", "custom") and self.dataset is None:
            raise ValueError(f"dataset_name {name} reads a file: give it with --dataset-path FILE")
        if name in ("random", "prefix_repetition") and self.dataset is not None:
            raise ValueError(f"dataset_name {name} generates its prompts: drop the dataset file")
        if self.dataset is not None and self.prefix_groups is not None:
            raise ValueError("prefix groups are a synthetic workload: drop the dataset or prefix_groups")
        if self.routing is not None and self.path == "direct":
            raise ValueError("routing applies to the pipeline: use path pipeline or both, or drop routing")
        if self.sweep is not None and self.sweep.param == "rate" and self.rate is not None:
            raise ValueError("a rate sweep sets the rate itself: drop rate")
        if self.sweep is not None and self.sweep.param == "concurrency" and self.concurrency is not None:
            raise ValueError("a concurrency sweep sets the concurrency itself: drop concurrency")
        return self

    def resolved(self, settings: Settings) -> BenchConfig:
        """A copy with the settings' defaults filled in (token counts, prefix share, concurrency)."""
        upd: dict[str, object] = {}
        if self.dataset is None and self.input_tokens is None:
            upd["input_tokens"] = settings.input_tokens
        if self.output_tokens is None:
            upd["output_tokens"] = settings.output_tokens
        if self.prefix_share is None:
            upd["prefix_share"] = settings.prefix_share
        closed_loop_sweep = self.sweep is not None and self.sweep.param == "concurrency"
        if self.rate is None and self.concurrency is None and not closed_loop_sweep:
            upd["concurrency"] = DEFAULT_CONCURRENCY
        return self.model_copy(update=upd)

    @property
    def paths(self) -> list[str]:
        """The request paths this run drives."""
        return ["pipeline", "direct"] if self.path == "both" else [self.path]


# ---------------------------------------------------------------------------
# Parsing helpers for the CLI and the console form
# ---------------------------------------------------------------------------


def parse_goodput(items: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` → ``{"ttft": 500.0, "tpot": 50.0}`` (vLLM's syntax)."""
    out: dict[str, float] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            name, sep, value = part.partition(":")
            if not sep:
                raise ValueError(f"goodput {part!r}: write NAME:MILLISECONDS, e.g. ttft:500")
            try:
                out[name.strip().lower()] = float(value)
            except ValueError:
                raise ValueError(f"goodput {part!r}: {value!r} is not a number of milliseconds") from None
    return out


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` → ``[50.0, 90.0, 99.0]``."""
    try:
        return [float(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ValueError(f"percentiles {text!r}: write numbers separated by commas, e.g. 50,90,99") from None


def parse_sweep(text: str) -> SweepSpec:
    """``"concurrency:1,2,4,8"`` or ``"rate:1,2,4"`` → :class:`SweepSpec`.

    ``"concurrency"`` alone means 1, 2, 4, … 128.
    """
    param, _, values = text.partition(":")
    param = param.strip().lower()
    if param not in ("concurrency", "rate"):
        raise ValueError(f"sweep {text!r}: start with 'concurrency:' or 'rate:', e.g. concurrency:1,2,4,8")
    if not values.strip():
        if param == "rate":
            raise ValueError("a rate sweep needs its values, e.g. rate:1,2,4,8")
        return SweepSpec(param="concurrency", values=[float(2**i) for i in range(8)])
    try:
        vals = [float(v) for v in values.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"sweep {text!r}: values must be numbers separated by commas") from None
    return SweepSpec(param=param, values=vals)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """What a running benchmark reports to its caller (CLI bar, console screen).

    ``phase`` is ``prepare`` (building prompts), ``warmup``, ``run`` (one per
    finished request), ``step`` (a sweep step finished) or ``done``.
    """

    run_id: str
    phase: Literal["prepare", "warmup", "run", "step", "done"]
    done: int
    total: int
    failed: int = 0
    elapsed_s: float = 0.0
    step: int = 0
    steps: int = 1
    load: str = ""
    message: str = ""
    #: Set on an event that only reports a stall (nothing finished for a while): what to tell the user.
    warning: str = ""

"""One measured request: what was asked, when it went out, what came back.

Times ending in ``_s`` are seconds; offsets (``intended_s``, ``sent_s``,
``first_token_s``) are from the start of the run's step, on the client's
monotonic clock (the pipeline's ``first_token_s`` comes from the worker's wall
clock, aligned to the step start's wall clock).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from services.contracts import STAGE_NAMES

#: The pipeline's stages plus the client's own share (see :attr:`RequestRecord.client_s`).
BREAKDOWN_NAMES: tuple[str, ...] = (*STAGE_NAMES, "client")


@dataclass
class RequestRecord:
    """A request of a benchmark run, on one path."""

    index: int
    path: str  # "pipeline" | "direct"
    step: int = 0
    load: float | None = None  # the sweep step's concurrency or rate
    success: bool = False
    error: str = ""
    requested_input_tokens: int | None = None
    requested_output_tokens: int = 0
    #: ``usage.prompt_tokens`` / ``usage.completion_tokens`` as the engine reported them.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    token_mismatch: list[str] = field(default_factory=list)
    # --- client timing -----------------------------------------------------
    intended_s: float = 0.0  # when the schedule wanted it sent
    sent_s: float = 0.0  # when it went out
    schedule_lag_s: float = 0.0  # sent - intended
    client_queue_s: float = 0.0  # waiting for a concurrency slot (vLLM's client_queue_time)
    start_ns: int = 0  # wall clock at send
    #: E2EL: send → last token (direct) or → terminal job state seen (pipeline).
    latency_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    first_token_s: float | None = None
    # --- pipeline only -------------------------------------------------------
    job_id: str | None = None
    attempt: int | None = None
    state: str | None = None
    stages_s: dict[str, float | None] = field(default_factory=dict)
    server_e2e_s: float | None = None  # t_received → t_finished
    client_s: float | None = None  # latency - server_e2e: HTTP, long-poll wake-up, retries
    engine_time_s: float | None = None  # t_engine_start → t_engine_end
    gpu: dict[str, Any] | None = None
    submit_retries: int = 0  # POST retries: 503, connection errors (429s are counted apart)
    refused_429: int = 0  # times ingestion answered 429 (over its active-job bound) before accepting
    engine: str | None = None
    model: str | None = None
    node: str | None = None
    # --- routing (pipeline only) ----------------------------------------------
    #: The routing policy that placed the job (as the proxy worker recorded it).
    policy: str | None = None
    #: The request's prefix group (``--prefix-groups``), and its shared-prefix tokens as built.
    prefix_group: int | None = None
    prefix_tokens: int | None = None
    #: Dispatched to the node → result back at the proxy, as step offsets (the node's in-flight window).
    node_start_s: float | None = None
    node_end_s: float | None = None

    @property
    def output_len(self) -> int:
        """Output tokens as vLLM counts them (usage, else 1 for a successful request)."""
        if self.completion_tokens:
            return self.completion_tokens
        return 1 if self.success else 0

    @property
    def input_len(self) -> int:
        """Prompt tokens as vLLM counts them (usage, else the requested length)."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.requested_input_tokens or 0

    @property
    def tpot_s(self) -> float | None:
        """vLLM's TPOT: (latency − TTFT) / (output_len − 1), for output_len > 1.

        On the pipeline path the client's latency includes queueing and the
        job API, so TPOT uses the engine's own stream time (TTFT + ΣITL) there;
        on the direct path that equals the client latency, as in vLLM.
        """
        if not self.success or self.ttft_s is None or self.output_len <= 1:
            return None
        return (self.stream_latency_s - self.ttft_s) / (self.output_len - 1)

    @property
    def stream_latency_s(self) -> float:
        """First byte sent to last token, as the engine stream was timed (TTFT + ΣITL)."""
        return (self.ttft_s or 0.0) + sum(self.itl_s)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (one JSONL line)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        """Inverse of :meth:`to_dict` (unknown keys ignored, so old files still load)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def csv_row(self) -> dict[str, Any]:
        """A flat row for ``requests.csv`` (ITL as count, mean and max; stages as columns)."""
        d = {
            k: v for k, v in self.to_dict().items() if k not in ("itl_s", "stages_s", "gpu", "token_mismatch")
        }
        d["tpot_s"] = self.tpot_s
        d["n_itl"] = len(self.itl_s)
        d["itl_mean_s"] = sum(self.itl_s) / len(self.itl_s) if self.itl_s else None
        d["itl_max_s"] = max(self.itl_s) if self.itl_s else None
        d["token_mismatch"] = "; ".join(self.token_mismatch)
        for name in STAGE_NAMES:
            d[f"stage_{name}_s"] = self.stages_s.get(name)
        gpu = self.gpu or {}
        for k in ("util_mean_pct", "vram_peak_bytes", "power_mean_w", "energy_j"):
            d[f"gpu_{k}"] = gpu.get(k)
        return d


CSV_COLUMNS: tuple[str, ...] = tuple(RequestRecord(index=0, path="direct").csv_row().keys())

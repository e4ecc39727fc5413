"""The one typed settings object of llmconsole.

Every process (services, bench, console) reads its configuration through
:func:`get_settings`. Values come from, in order of precedence: the process
environment, the env file that ``install.sh`` writes (``var/llmconsole.env``,
mode 0600), then the defaults below. Nothing else in the code base reads
``os.environ`` for configuration.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.contracts import RoutingPolicy

#: The repository root (the folder holding ``install.sh``).
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Where install.sh writes the env file; ``LLMC_ENV_FILE`` points elsewhere.
DEFAULT_ENV_FILE = REPO_ROOT / "var" / "llmconsole.env"

EngineKind = Literal["sim", "cpu", "gpu"]


def env_file_path() -> Path:
    """Return the env file this process reads (``LLMC_ENV_FILE`` or the default)."""
    # The only place outside pydantic-settings that looks at the environment:
    # the env file's own location cannot come from the env file.
    return Path(os.environ.get("LLMC_ENV_FILE", str(DEFAULT_ENV_FILE)))


class Settings(BaseSettings):
    """Configuration for every llmconsole process.

    Names match the environment variables (case-insensitive); the seed's
    ``INPUT_TOKENS`` / ``OUTPUT_TOKENS`` keep their names and defaults.
    """

    model_config = SettingsConfigDict(
        env_file=None,  # set per instance in get_settings()
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    # --- workload defaults (the seed's) ---------------------------------
    input_tokens: int = Field(1000, ge=1, description="Prompt length in tokens.")
    output_tokens: int = Field(500, ge=1, description="Tokens the engine must generate.")
    prefix_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of the prompt that is a fixed per-run prefix."
    )

    # --- network: everything on loopback unless configured ---------------
    ingestion_host: str = "127.0.0.1"
    ingestion_port: int = Field(8080, ge=1, le=65535)
    worker_host: str = "127.0.0.1"
    worker_port: int = Field(8001, ge=1, le=65535)
    #: Static nodes: proxy workers dispatch to these inference workers (comma-separated base
    #: URLs) instead of the node registry, each with capacity max_num_seqs × node_capacity_factor.
    worker_urls: str = ""
    #: Key an inference worker requires (Bearer); empty = API_KEY. Give joined nodes this one,
    #: not API_KEY, so a node's secrets cannot submit jobs.
    worker_api_key: SecretStr = SecretStr("")
    engine_host: str = "127.0.0.1"
    engine_port: int = Field(8000, ge=1, le=65535)
    redis_host: str = "127.0.0.1"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_password: SecretStr = SecretStr("")
    #: More addresses Redis listens on besides REDIS_HOST (space-separated): a head's LAN address
    #: for nodes that join it (``install.sh --listen``). Open that port to the nodes only.
    redis_bind: str = Field("", pattern=r"^[0-9A-Za-z.:\- ]{0,200}$")
    redis_db: int = Field(0, ge=0, le=15)
    #: Prefix for every Redis key, so several stacks can share one Redis.
    redis_prefix: str = Field("llmc:", pattern=r"^[A-Za-z0-9_.:-]{1,32}$")
    #: Redis's AOF fsync: ``everysec`` (a machine crash can lose about the last second of accepted
    #: jobs) or ``always`` (fsync before every reply: nothing acknowledged is lost, fewer jobs/s).
    redis_appendfsync: Literal["everysec", "always"] = "everysec"

    # --- security ---------------------------------------------------------
    #: API key for ingestion (Bearer or X-API-Key). Empty disables auth (tests only).
    api_key: SecretStr = SecretStr("")
    #: API key passed to the engine (vLLM's --api-key) and used by its clients.
    engine_api_key: SecretStr = SecretStr("")

    # --- engine -------------------------------------------------------------
    engine_kind: EngineKind = "sim"
    #: Served model name; empty = the engine kind's default.
    model: str = ""
    #: Local model folder (CPU engine: converted at install; GPU engine: instead of a hub download).
    model_path: str = ""
    #: Hub revision (branch, tag or commit) of a GPU engine's hub model; empty = main.
    model_revision: str = Field("", pattern=r"^[A-Za-z0-9._/-]{0,128}$")
    #: Hugging Face token for gated or private models (given to the engine and the download).
    hf_token: SecretStr = SecretStr("")
    #: Hugging Face home (the hub cache is ``<hf_home>/hub``); empty = ~/.cache/huggingface.
    hf_home: str = ""
    #: The hub cache itself, when it is not ``<hf_home>/hub`` (the hub's own HF_HUB_CACHE).
    hf_hub_cache: str = ""
    engine_venv: str = str(REPO_ROOT / ".venv-engine")
    max_model_len: int = Field(2048, ge=16, le=1_048_576)
    max_num_seqs: int = Field(64, ge=1, le=4096)
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(0, ge=0, le=64, description="0 = number of GPUs found.")
    cpu_kvcache_gib: int = Field(2, ge=1, le=512)
    cpu_threads_bind: str = "auto"

    # --- simulator timing model --------------------------------------------
    sim_profile: str = ""
    sim_ttft_base_ms: float = Field(20.0, ge=0)
    sim_prefill_ms_per_token: float = Field(0.05, ge=0)
    sim_itl_ms: float = Field(10.0, ge=0)
    sim_itl_jitter_ms: float = Field(1.0, ge=0)
    sim_itl_batch_ms: float = Field(0.05, ge=0, description="Extra ITL per running sequence.")
    sim_max_num_seqs: int = Field(64, ge=1, le=4096)
    #: Token budget of one step (vLLM's max_num_batched_tokens); 0 = whole prefills in one step.
    sim_max_num_batched_tokens: int = Field(8192, ge=0, le=1_048_576)
    sim_block_size: int = Field(16, ge=1, le=1024)
    sim_kv_blocks: int = Field(8192, ge=16)
    sim_seed: int = 0

    # --- queue and workers -------------------------------------------------
    #: Bound on waiting + in-flight jobs; above it ingestion answers 429.
    max_active_jobs: int = Field(10_000, ge=1)
    #: Upper bound on one proxy worker's jobs in flight; 0 = auto (the live nodes' capacity).
    proxy_concurrency: int = Field(0, ge=0, le=65_536)
    #: A job pending this long on a consumer that stopped renewing is reclaimed.
    lease_ms: int = Field(30_000, ge=100)
    max_attempts: int = Field(3, ge=1, le=100)
    retry_base_ms: int = Field(200, ge=1)
    retry_max_ms: int = Field(10_000, ge=1)
    job_timeout_s: float = Field(1800.0, gt=0)
    #: Longest a final job is kept (its hash and full result); retention may prune it sooner (below).
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    #: Lifetime of a job's token stream (the OpenAI door), renewed at its first and last write.
    token_stream_ttl_s: int = Field(300, ge=10)
    #: How long ingestion stays subscribed to the job-event channel after its last long-poll
    #: (``?wait=``) ended; with none, it does not read the channel at all.
    event_linger_s: float = Field(30.0, ge=0, le=3600)
    # --- retention and Redis memory (services/retention.py) ------------------
    #: Most final jobs kept in Redis; the oldest go first.
    job_retention_max: int = Field(1_000_000, ge=1)
    #: Bytes final jobs may take in Redis (MiB, estimated from sampled MEMORY USAGE); 0 = half of
    #: Redis's maxmemory.
    job_retention_mb: int = Field(0, ge=0)
    #: Most benchmark runs kept in Redis (summary + index; records live in the run's folder).
    run_retention_max: int = Field(1000, ge=1)
    #: Longest a benchmark run is kept in Redis.
    run_retention_s: int = Field(30 * 24 * 3600, ge=60)
    #: How often the proxy worker's retention pass runs.
    retention_interval_s: float = Field(1.0, gt=0)
    #: Redis's maxmemory in MiB (with noeviction); 0 = a quarter of this machine's RAM.
    redis_maxmemory_mb: int = Field(0, ge=0)
    #: Ingestion refuses new jobs (503) once Redis uses this share of its maxmemory, keeping the
    #: rest for the results of jobs already accepted; retention prunes old jobs from this level.
    redis_memory_refuse_pct: float = Field(90.0, gt=0, le=100)
    idempotency_ttl_s: int = Field(24 * 3600, ge=60)
    stream_trim_interval_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(20.0, ge=0)
    node_id: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    telemetry_interval_s: float = Field(0.1, gt=0)

    # --- nodes and routing -----------------------------------------------------
    #: A node's heartbeat expires this long after its last beat (beats come every TTL / 5).
    node_ttl_s: float = Field(6.0, ge=0.5, le=600)
    #: A node takes ``max_num_seqs × factor`` jobs in flight (the rest queue in Redis).
    node_capacity_factor: float = Field(2.0, gt=0, le=64)
    #: After a connection to a node's worker fails, it gets no new job for this long.
    node_suspect_s: float = Field(5.0, ge=0, le=600)
    #: How jobs pick their node. prefix_affinity: jobs that share a prompt prefix go where it is
    #: cached (with load guards); jobs without a shared prefix go to the least loaded node.
    routing: RoutingPolicy = "prefix_affinity"
    #: Imbalance guard (vLLM router / SGLang gateway): when (max - min) in flight > ABS and
    #: max > REL × min, a job goes to the least loaded node whatever its prefix.
    routing_balance_abs: int = Field(32, ge=0)
    routing_balance_rel: float = Field(1.5, ge=1.0)
    #: A prefix's node is passed over when it would be above FAIR_SHARE × its capacity-weighted
    #: share of all jobs in flight (+ ABS): one hot prefix then spreads to more nodes.
    routing_fair_share: float = Field(1.25, ge=1.0)
    routing_fair_share_abs: int = Field(4, ge=0)
    #: ... and only once that node is above this share of its capacity; empty = 1 / capacity
    #: factor, i.e. where its engine starts queueing (below it moving a job only costs its hits).
    routing_spill_load: float | None = Field(None, gt=0, le=1)
    #: How long routers remember which node served a prefix (vLLM router: 120 s).
    routing_prefix_ttl_s: int = Field(120, ge=1)
    #: Port on 127.0.0.1 that the inference worker binds and the engine's vLLM KV cache events
    #: connect to (vLLM connects to any non-wildcard endpoint); the worker mirrors the cached
    #: prefixes into Redis for ``kv_events`` routing. One per node; 0 = off.
    kv_events_port: int = Field(0, ge=0, le=65535)
    #: How often a proxy worker re-reads the node registry and in-flight counts.
    registry_refresh_s: float = Field(0.5, gt=0, le=60)
    #: Where the proxy worker serves Prometheus ``/metrics`` (its only HTTP port); port 0 = off.
    proxy_metrics_host: str = "127.0.0.1"
    proxy_metrics_port: int = Field(8002, ge=0, le=65535)

    # --- paths --------------------------------------------------------------
    var_dir: str = str(REPO_ROOT / "var")
    results_dir: str = str(REPO_ROOT / "var" / "runs")

    @field_validator("worker_urls")
    @classmethod
    def _strip_urls(cls, v: str) -> str:
        return ",".join(u.strip().rstrip("/") for u in v.split(",") if u.strip())

    # --- derived ------------------------------------------------------------
    @property
    def redis_url(self) -> str:
        """A redis:// URL with the password (never log it)."""
        pw = self.redis_password.get_secret_value()
        auth = f":{pw}@" if pw else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def ingestion_url(self) -> str:
        """Base URL of the ingestion API."""
        return f"http://{_client_host(self.ingestion_host)}:{self.ingestion_port}"

    @property
    def engine_url(self) -> str:
        """Base URL of the engine's OpenAI-compatible API."""
        return f"http://{_client_host(self.engine_host)}:{self.engine_port}"

    @property
    def worker_url(self) -> str:
        """Base URL of this host's inference worker (as a client reaches it)."""
        return f"http://{_client_host(self.worker_host)}:{self.worker_port}"

    @property
    def worker_url_list(self) -> list[str]:
        """Inference worker base URLs the proxy worker dispatches to."""
        return self.worker_urls.split(",") if self.worker_urls else [self.worker_url]

    @property
    def effective_worker_api_key(self) -> str:
        """The key inference workers require and proxy workers send ("" = none)."""
        return self.worker_api_key.get_secret_value() or self.api_key.get_secret_value()

    @property
    def supervisor_socket(self) -> Path:
        """supervisord's unix socket (mode 0700 folder)."""
        return Path(self.var_dir) / "supervisor.sock"

    @property
    def effective_node_id(self) -> str:
        """This host's node id (setting, else the hostname)."""
        if self.node_id:
            return self.node_id
        import socket

        return socket.gethostname()[:64]


def _client_host(bind_host: str) -> str:
    """A host a client can connect to, given the address a server binds."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "", "::") else bind_host  # noqa: S104


def load_settings(**overrides: object) -> Settings:
    """Build a fresh Settings (env + env file + overrides); not cached."""
    path = env_file_path()
    return Settings(_env_file=path if path.is_file() else None, **overrides)  # type: ignore[call-arg]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide Settings, read once."""
    return load_settings()

"""A simulator of vLLM's OpenAI-compatible server, with a real scheduler and prefix cache.

Serves the part of vLLM 0.32's API that llmconsole uses — ``/v1/completions``
(streamed and not), ``/tokenize``, ``/detokenize``, ``/v1/models``, ``/health``,
``/version`` and ``/metrics`` with vLLM's own metric names — on a word-level
tokenizer, so the whole pipeline runs without a model. It says it is a
simulator in ``/v1/models`` and ``/version``.

Run it with ``python -m services.sim_engine [--host H --port P --profile NAME ...]``
(``--help`` lists every flag); defaults come from :class:`~services.settings.Settings`.

Timing model
    One asyncio task plays vLLM's engine loop: each step runs the whole batch
    once. ``max_num_seqs`` sequences run at most; the rest wait in a FIFO queue.
    A step that prefills takes
    ``ttft_base_ms + prefill_ms_per_token × (the uncached prompt tokens it computes)``;
    if sequences are decoding, the step also takes
    ``itl_ms + itl_batch_ms × running + N(0, itl_jitter_ms)``. Each decoding
    sequence in the step gets one token at its end, so time to first token is
    queueing + the prefill steps, and inter-token latency grows with the batch
    (and spikes while others prefill, as in vLLM). Without ``ignore_eos`` a sequence stops
    with probability ``eos_prob`` per token once it has ``min_tokens``.
    A step computes at most ``max_num_batched_tokens`` tokens, as vLLM v1 with
    chunked prefill: the running sequences first (one token each to decode,
    or the next chunk of a prefill), then waiting ones while budget is left,
    the last admitted with a chunk of its prompt. A sequence's first token
    comes at the end of the step that computes the last chunk of its prompt.
    0 = no budget: every admitted prompt is prefilled whole in one step.

Prefix cache and KV blocks
    As in vLLM: the prompt's token ids are split into blocks of ``block_size``;
    each full block is hashed chained with its parent's hash, and enters the
    cache in the step that computes it (a chunked prompt, chunk by chunk). ``kv_blocks``
    blocks exist; running sequences hold the blocks of their prompt and output;
    freed blocks keep their hash and are reused on a hash hit until evicted in
    LRU order. A request's cached tokens are those of its longest cached block
    prefix (at most ``prompt - 1`` tokens, as vLLM always recomputes the last
    one). When a running sequence needs a block and none is free, the newest
    running sequence is preempted (recomputed later), as vLLM does. KV usage is
    ``1 - free blocks / kv_blocks``.

Profiles
    A profile is a JSON object in ``services/sim_profiles/NAME.json`` (shipped)
    or ``<var_dir>/sim_profiles/NAME.json`` (written by calibration; found
    first). Its keys are exactly :class:`SimConfig`'s fields, all optional::

        {
          "description": "what this profile rehearses",      # free text
          "source": "where the figures come from",           # free text
          "ttft_base_ms": 200.0,          # fixed cost of a step that prefills
          "prefill_ms_per_token": 1.8,    # per uncached prompt token in that step
          "itl_ms": 98.0,                 # decode step with one sequence running
          "itl_batch_ms": 17.0,           # extra decode step time per running sequence
          "itl_jitter_ms": 5.0,           # standard deviation of a gaussian on each decode step
          "max_num_seqs": 64,             # batch limit (running sequences)
          "max_num_batched_tokens": 8192, # tokens a step computes at most (0 = no budget)
          "block_size": 128,              # tokens per KV block (prefix cache granularity)
          "kv_blocks": 429,               # KV blocks in the cache
          "eos_prob": 0.01,               # per-token stop chance without ignore_eos
          "seed": 0                       # RNG seed (jitter and generated words)
        }

    Unknown keys are refused. :func:`load_profile`, :func:`list_profiles` and
    :func:`save_profile` read and write them. Precedence: command-line flags,
    then the profile (``--profile`` or ``Settings.sim_profile``), then
    ``Settings.sim_*``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import json
import logging
import math
import random
import re
import secrets
import sys
import time
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services import asgi, runtime
from services.contracts import VllmMetric
from services.routing import kv_events
from services.settings import Settings, get_settings

log = logging.getLogger("llmconsole.sim_engine")

#: The served model id when ``Settings.model`` is empty.
DEFAULT_MODEL = "llmconsole-sim"
#: A literal prompt containing this string gets a 500 every time (fault injection for tests).
FAIL_MARKER = "__llmconsole_fail_500__"
#: ``owned_by`` in ``/v1/models``: how a client tells the simulator from a real vLLM.
OWNER = "llmconsole-simulator"
#: The vLLM release whose API shapes this simulator follows.
VLLM_API_VERSION = "0.32.0"
#: Shipped profiles.
PROFILE_DIR = Path(__file__).resolve().parent / "sim_profiles"
_PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def valid_profile_name(name: str) -> bool:
    """True if ``name`` can name a profile file (letters, digits, ``_.-``; at most 64)."""
    return bool(_PROFILE_NAME_RE.match(name))


# ---------------------------------------------------------------------------
# Configuration and profiles
# ---------------------------------------------------------------------------


class SimConfig(BaseModel):
    """The simulator's timing model; its fields are exactly a profile's keys."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    source: str = ""
    ttft_base_ms: float = Field(20.0, ge=0, description="Fixed cost of a step that prefills.")
    prefill_ms_per_token: float = Field(0.05, ge=0, description="Cost per uncached prompt token.")
    itl_ms: float = Field(10.0, ge=0, description="Decode step time with one sequence running.")
    itl_jitter_ms: float = Field(1.0, ge=0, description="Std deviation of the decode step time.")
    itl_batch_ms: float = Field(0.05, ge=0, description="Extra decode step time per running sequence.")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Batch limit: running sequences.")
    max_num_batched_tokens: int = Field(
        8192,
        ge=0,
        le=1_048_576,
        description="Tokens one step computes at most (vLLM's max_num_batched_tokens): longer prefills "
        "are chunked over steps; 0 = no budget, every admitted prefill whole in one step.",
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    kv_blocks: int = Field(8192, ge=16, description="KV blocks in the cache.")
    eos_prob: float = Field(0.01, ge=0, le=1, description="Per-token stop chance without ignore_eos.")
    seed: int = Field(0, description="Seed of the jitter and generated-word RNG.")

    @classmethod
    def from_settings(cls, s: Settings, profile: str | None = None) -> SimConfig:
        """``Settings.sim_*`` values, overridden by a profile (``profile`` or ``s.sim_profile``)."""
        data: dict[str, Any] = {
            "ttft_base_ms": s.sim_ttft_base_ms,
            "prefill_ms_per_token": s.sim_prefill_ms_per_token,
            "itl_ms": s.sim_itl_ms,
            "itl_jitter_ms": s.sim_itl_jitter_ms,
            "itl_batch_ms": s.sim_itl_batch_ms,
            "max_num_seqs": s.sim_max_num_seqs,
            "max_num_batched_tokens": s.sim_max_num_batched_tokens,
            "block_size": s.sim_block_size,
            "kv_blocks": s.sim_kv_blocks,
            "seed": s.sim_seed,
        }
        name = s.sim_profile if profile is None else profile
        if name:
            data.update(load_profile(name, settings=s))
        return cls.model_validate(data)

    def prefill_ms(self, uncached_tokens: int) -> float:
        """Duration of a step that prefills ``uncached_tokens`` (0 when none)."""
        if uncached_tokens <= 0:
            return 0.0
        return self.ttft_base_ms + self.prefill_ms_per_token * uncached_tokens

    def decode_ms(self, running: int, jitter: float = 0.0) -> float:
        """Decode part of a step with ``running`` sequences; ``jitter`` is a N(0,1) draw."""
        if running <= 0:
            return 0.0
        return max(0.0, self.itl_ms + self.itl_batch_ms * running + self.itl_jitter_ms * jitter)


class ProfileError(ValueError):
    """A profile is missing, misnamed or malformed."""


def profile_dirs(settings: Settings | None = None) -> list[Path]:
    """Folders searched for profiles: the user's (``<var_dir>/sim_profiles``) first, then the shipped."""
    s = settings or get_settings()
    return [Path(s.var_dir) / "sim_profiles", PROFILE_DIR]


def _profile_path(name: str, settings: Settings | None) -> Path:
    if name.endswith(".json") and ("/" in name or Path(name).is_file()):
        return Path(name)  # an explicit file path
    if not _PROFILE_NAME_RE.match(name):
        raise ProfileError(f"bad profile name {name!r}: letters, digits, '.', '_', '-' only")
    for folder in profile_dirs(settings):
        path = folder / f"{name}.json"
        if path.is_file():
            return path
    known = ", ".join(list_profiles(settings)) or "none"
    raise ProfileError(f"no simulator profile named {name!r} (known: {known})")


def load_profile(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """The keys of profile ``name`` (a name in :func:`profile_dirs`, or a path to a .json file).

    Raises :class:`ProfileError` if it does not exist or is not a valid profile.
    """
    path = _profile_path(name, settings)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from e
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} must hold a JSON object")
    try:
        SimConfig.model_validate(data)
    except ValidationError as e:
        raise ProfileError(f"profile {path} is invalid: {_pydantic_message(e)}") from e
    return data


def list_profiles(settings: Settings | None = None) -> list[str]:
    """Names of every profile found (user and shipped), sorted."""
    names: set[str] = set()
    for folder in profile_dirs(settings):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.json") if _PROFILE_NAME_RE.match(p.stem))
    return sorted(names)


def save_profile(name: str, config: SimConfig, directory: Path | None = None) -> Path:
    """Write ``config`` as profile ``name`` (default folder: ``<var_dir>/sim_profiles``); return its path."""
    if not _PROFILE_NAME_RE.match(name):
        raise ProfileError(f"bad profile name {name!r}: letters, digits, '.', '_', '-' only")
    folder = directory or profile_dirs()[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config.model_dump(), indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Tokenizer: one whitespace-separated word = one token
# ---------------------------------------------------------------------------

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
#: Words of the vocabulary (generated, deterministic).
NUM_WORDS = 4096
#: Words outside the vocabulary hash into this many ids, so different unknown
#: words mostly get different ids and the prefix cache does not see false hits.
UNK_BUCKETS = 65_536
_WORD_BASE = len(SPECIAL_TOKENS)
_UNK_BASE = _WORD_BASE + NUM_WORDS


def _make_words() -> list[str]:
    consonants, vowels = "bdfghjklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    words = [a + b for a in syllables for b in syllables]
    random.Random(20261201).shuffle(words)
    return sorted(words[:NUM_WORDS])


class SimTokenizer:
    """Word-level tokenizer: every whitespace-separated word is exactly one token.

    Vocabulary words round-trip through :meth:`decode`; other words hash into
    ``UNK_BUCKETS`` ids that decode as ``<unk>``. Special tokens written as text
    (``<bos>`` …) map to their ids. With ``add_special_tokens`` a ``<bos>``
    (id 1) is prepended, as Gemma's tokenizer does.
    """

    def __init__(self) -> None:
        self.words = _make_words()
        self._ids = {w: _WORD_BASE + i for i, w in enumerate(self.words)}
        self._ids.update({t: i for i, t in enumerate(SPECIAL_TOKENS)})

    @property
    def vocab_size(self) -> int:
        """Number of token ids (specials, words, unknown-word buckets)."""
        return _UNK_BASE + UNK_BUCKETS

    def word_id(self, word: str) -> int:
        """The id of one word (a hashed unknown-word id if not in the vocabulary)."""
        tid = self._ids.get(word)
        if tid is not None:
            return tid
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return _UNK_BASE + int.from_bytes(digest, "big") % UNK_BUCKETS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        ids = [self.word_id(w) for w in text.split()]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def token_str(self, tid: int) -> str:
        """The text of one token id (``<unk>`` for hashed unknown words)."""
        if tid < _WORD_BASE:
            return SPECIAL_TOKENS[tid]
        if tid < _UNK_BASE:
            return self.words[tid - _WORD_BASE]
        return SPECIAL_TOKENS[UNK_ID]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: their words joined by single spaces."""
        return " ".join(self.token_str(t) for t in ids)

    def piece(self, tid: int) -> str:
        """Text a generated token adds to a completion (a leading space; EOS adds nothing)."""
        return "" if tid == EOS_ID else " " + self.token_str(tid)


# ---------------------------------------------------------------------------
# Prefix cache: chained block hashes over an LRU pool of KV blocks
# ---------------------------------------------------------------------------


def hash_blocks(token_ids: list[int], block_size: int) -> list[bytes]:
    """Hashes of the full blocks of ``token_ids``, each chained with its parent's (as vLLM)."""
    hashes: list[bytes] = []
    parent = b""
    # One conversion of the full blocks, then slices of it: ~30 % cheaper than one array per
    # block on a 1,000-token prompt, and the same bytes (the tail's ids are never converted).
    data = array("q", token_ids[: len(token_ids) // block_size * block_size]).tobytes()
    step = 8 * block_size
    for start in range(0, len(data), step):
        parent = hashlib.blake2b(parent + data[start : start + step], digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """``num_blocks`` KV blocks with reference counts, a hash → block map and an LRU free queue.

    A free block keeps its hash (and can be hit) until it is reused for new data.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        #: Free blocks, least recently used first (evicted first).
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.evictions = 0
        #: vLLM's KV cache events since the last :meth:`take_events` (None = not collected).
        self.events: list[list[Any]] | None = None

    @property
    def num_free(self) -> int:
        """Blocks not held by any sequence (cached or not)."""
        return len(self.free)

    def usage(self) -> float:
        """Share of blocks held by sequences, 0..1 (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - len(self.free) / self.num_blocks

    def match(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes`` (no side effects)."""
        hit: list[int] = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def can_allocate(self, hit: list[int], new: int) -> bool:
        """True if ``hit`` can be taken and ``new`` fresh blocks allocated now."""
        free_hits = sum(1 for b in hit if self.ref[b] == 0)
        return new <= len(self.free) - free_hits

    def take(self, hit: list[int]) -> None:
        """Hold cached blocks (a prefix hit)."""
        for b in hit:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks, evicting the least recently freed; the caller checked there are enough."""
        out: list[int] = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            old = self.hash_of[b]
            if old is not None:
                if self.cached.get(old) == b:
                    del self.cached[old]
                    if self.events is not None:
                        self.events.append(["BlockRemoved", [old], None])
                self.hash_of[b] = None
                self.evictions += 1
            self.ref[b] = 1
            out.append(b)
        return out

    def register(
        self, block: int, h: bytes, parent: bytes | None = None, tokens: list[int] | None = None
    ) -> None:
        """Record that ``block`` holds the data of hash ``h`` (first holder wins).

        With events on, a newly cached block is a ``BlockStored`` event (its parent's hash and
        its tokens, as vLLM sends them)."""
        if h not in self.cached and self.hash_of[block] is None:
            self.cached[h] = block
            self.hash_of[block] = h
            if self.events is not None and tokens is not None:
                self.events.append(["BlockStored", [h], parent, tokens, len(tokens), None, None])

    def take_events(self) -> list[list[Any]]:
        """The events collected since the last call."""
        out, self.events = self.events or [], ([] if self.events is not None else None)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop a sequence's hold; tail blocks go first in the free queue, so they are evicted first."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split())


# ---------------------------------------------------------------------------
# Metrics, rendered in Prometheus text format with vLLM's names and buckets
# ---------------------------------------------------------------------------

# vLLM's own bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = _floats(
    "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1 2.5 5 7.5 10 20 40 80 160 640 2560"
)
ITL_BUCKETS = _floats("0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1 2.5 5 7.5 10 20 40 80")
REQUEST_LATENCY_BUCKETS = _floats("0.3 0.5 0.8 1 1.5 2 2.5 5 10 15 20 30 40 50 60 120 240 480 960 1920 7680")
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")


@dataclass
class Histogram:
    """A Prometheus histogram (non-cumulative bucket counts; rendered cumulative)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, v: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.total += v
        self.count += 1


@dataclass
class SimStats:
    """Counters and histograms the engine loop updates."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    success: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render_metrics(sched: Scheduler, model_name: str) -> str:
    """The scheduler's state and stats as Prometheus text (labels ``model_name``, ``engine``)."""
    base = f'model_name="{_esc(model_name)}",engine="0"'
    st = sched.stats
    out: list[str] = []

    def head(name: str, kind: str, doc: str) -> None:
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")

    def gauge(name: str, doc: str, v: float) -> None:
        head(name, "gauge", doc)
        out.append(f"{name}{{{base}}} {_num(v)}")

    def counter(name: str, doc: str, v: float) -> None:
        head(name.removesuffix("_total"), "counter", doc)
        out.append(f"{name}{{{base}}} {_num(v)}")

    def histogram(name: str, doc: str, h: Histogram) -> None:
        head(name, "histogram", doc)
        cum = 0
        for bound, c in zip((*h.bounds, math.inf), h.counts, strict=True):
            cum += c
            out.append(f'{name}_bucket{{{base},le="{_num(bound)}"}} {_num(cum)}')
        out.append(f"{name}_sum{{{base}}} {_num(h.total)}")
        out.append(f"{name}_count{{{base}}} {_num(h.count)}")

    gauge(VllmMetric.RUNNING, "Number of requests in model execution batches.", len(sched.running))
    gauge(VllmMetric.WAITING, "Number of requests waiting to be processed.", len(sched.waiting))
    gauge(VllmMetric.KV_CACHE_USAGE, "KV-cache usage. 1 means 100 percent usage.", sched.pool.usage())
    counter(
        VllmMetric.PREFIX_QUERIES,
        "Prefix cache queries, in terms of number of queried tokens.",
        st.prefix_queries,
    )
    counter(VllmMetric.PREFIX_HITS, "Prefix cache hits, in terms of number of cached tokens.", st.prefix_hits)
    counter(VllmMetric.PROMPT_TOKENS_CACHED, "Number of cached prompt tokens.", st.prompt_tokens_cached)
    counter(VllmMetric.PREEMPTIONS, "Cumulative number of preemption from the engine.", st.preemptions)
    counter(VllmMetric.PROMPT_TOKENS, "Number of prefill tokens processed.", st.prompt_tokens)
    counter(VllmMetric.GENERATION_TOKENS, "Number of generation tokens processed.", st.generation_tokens)
    name = VllmMetric.REQUEST_SUCCESS
    head(name.removesuffix("_total"), "counter", "Count of successfully processed requests.")
    for reason, v in st.success.items():
        out.append(f'{name}{{{base},finished_reason="{reason}"}} {_num(v)}')
    histogram(VllmMetric.TTFT, "Histogram of time to first token in seconds.", st.ttft)
    histogram(VllmMetric.ITL, "Histogram of inter-token latency in seconds.", st.itl)
    histogram(VllmMetric.E2E, "Histogram of e2e request latency in seconds.", st.e2e)
    histogram(VllmMetric.QUEUE_TIME, "Histogram of time spent in WAITING phase for request.", st.queue)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Scheduler: the engine core, synchronous and driven by explicit times
# ---------------------------------------------------------------------------


class SeqStatus(StrEnum):
    """Where a sequence is."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request in the engine: prompt, limits, state, and its output so far."""

    prompt_ids: list[int]
    block_hashes: list[bytes]
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    rng: random.Random
    arrival: float
    seq_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: SeqStatus = SeqStatus.WAITING
    blocks: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    num_cached: int = 0
    #: Tokens of its current prefill not computed yet (more than 0 while chunked over steps).
    prefill_left: int = 0
    #: Prompt blocks entered into the prefix cache for its current admission.
    registered: int = 0
    admitted_once: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    #: Called after new output or when finished (the async layer sets an event).
    on_update: Callable[[], None] | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt_ids) + len(self.output)

    @property
    def finished(self) -> bool:
        """True once it stopped, hit its length, or was aborted."""
        return self.status is SeqStatus.FINISHED

    def _notify(self) -> None:
        if self.on_update is not None:
            self.on_update()


@dataclass
class StepPlan:
    """What one engine step runs and how long it takes."""

    prefill: list[Sequence]
    #: Tokens of each ``prefill`` sequence this step computes (its whole prefill or a chunk).
    chunks: list[int]
    decode: list[Sequence]
    duration_s: float

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the step computes."""
        return sum(self.chunks)

    @property
    def empty(self) -> bool:
        """True if the step runs nothing."""
        return not self.prefill and not self.decode


class Scheduler:
    """vLLM-like continuous batching over a :class:`BlockPool`, in explicit time.

    :meth:`schedule` picks the step's sequences (decode the running, admit the
    waiting) and its duration; :meth:`complete` gives each of them one token at
    the step's end. The async :class:`SimEngine` sleeps in between; tests can
    drive it with any clock.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.pool = BlockPool(config.kv_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SimStats()
        self.rng = random.Random(config.seed)

    def new_sequence(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        *,
        min_tokens: int = 0,
        ignore_eos: bool = False,
        seed: int | None = None,
        arrival: float = 0.0,
    ) -> Sequence:
        """A sequence for ``prompt_ids`` (not yet added)."""
        rng = random.Random(seed if seed is not None else self.rng.getrandbits(64))
        hashes = hash_blocks(prompt_ids, self.config.block_size)
        return Sequence(prompt_ids, hashes, max_tokens, min_tokens, ignore_eos, rng, arrival)

    def blocks_needed(self, num_tokens: int) -> int:
        """KV blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.config.block_size)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (FIFO)."""
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """True if anything waits or runs."""
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now (client gone): free its blocks and its slot."""
        if seq.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "abort", None)

    def _finish(self, seq: Sequence, reason: str, now: float | None) -> None:
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if now is not None:  # a real finish (vLLM does not count client aborts)
            self.stats.success[reason] += 1
            self.stats.e2e.observe(now - seq.arrival)
        seq._notify()

    def _preempt(self, seq: Sequence) -> None:
        # Recompute preemption, as vLLM v1: drop its KV, put it first in line.
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def schedule(self, now: float) -> StepPlan:
        """Plan the next step at time ``now``: decode every running sequence, admit waiting ones.

        As vLLM v1's scheduler, within a token budget (``max_num_batched_tokens``): the running
        sequences first, in order (one token each to decode, or the next chunk of a prefill), then
        the waiting ones while budget is left, the last of them with a chunk of its prefill.
        """
        cfg = self.config
        budget = cfg.max_num_batched_tokens or sys.maxsize
        preempted = False
        decode: list[Sequence] = []
        prefill: list[Sequence] = []
        chunks: list[int] = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted below while making room for an earlier one
            if budget <= 0:
                break  # no budget left this step: the rest run in the next
            if seq.prefill_left > 0:  # a prefill chunked over steps: its next chunk
                take = min(seq.prefill_left, budget)
                self._cache_computed(seq, seq.num_tokens - seq.prefill_left + take)
                prefill.append(seq)
                chunks.append(take)
                budget -= take
                continue
            need = self.blocks_needed(seq.num_tokens) - len(seq.blocks)
            while need > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                if need > 0:
                    seq.blocks.extend(self.pool.allocate(need))
                decode.append(seq)
                budget -= 1
        # vLLM admits nothing in a step that had to preempt.
        while self.waiting and not preempted and len(self.running) < cfg.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            n = seq.num_tokens
            # vLLM recomputes at least the last token, so hits stop before it.
            max_hit_blocks = min(len(seq.block_hashes), (n - 1) // cfg.block_size)
            hit = self.pool.match(seq.block_hashes[:max_hit_blocks])
            new = self.blocks_needed(n) - len(hit)
            if not self.pool.can_allocate(hit, new):
                break  # FIFO: the head waits for blocks, and so does everyone behind it
            self.waiting.popleft()
            self.pool.take(hit)
            seq.blocks = hit + self.pool.allocate(new)
            seq.registered = len(hit)
            cached = len(hit) * cfg.block_size
            if not seq.admitted_once:
                seq.admitted_once = True
                seq.num_cached = cached
                self.stats.prefix_queries += len(seq.prompt_ids)
                self.stats.prefix_hits += cached
                self.stats.prompt_tokens += len(seq.prompt_ids)
                self.stats.prompt_tokens_cached += cached
                self.stats.queue.observe(max(0.0, now - seq.arrival))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            # At least one token: hits stop before the last prompt token.
            seq.prefill_left = n - cached
            take = min(seq.prefill_left, budget)
            self._cache_computed(seq, cached + take)
            prefill.append(seq)
            chunks.append(take)
            budget -= take
        jitter = self.rng.gauss(0.0, 1.0) if decode and cfg.itl_jitter_ms > 0 else 0.0
        ms = (cfg.prefill_ms(sum(chunks)) if prefill else 0.0) + cfg.decode_ms(len(decode), jitter)
        return StepPlan(prefill, chunks, decode, ms / 1000.0)

    def _cache_computed(self, seq: Sequence, computed: int) -> None:
        """Enter the prompt blocks that ``computed`` tokens fill into the prefix cache.

        As vLLM v1 (``allocate_slots`` caches the full blocks of the tokens scheduled for the
        step): a prompt chunked over steps is hit only as far as its chunks have reached.
        """
        bs = self.config.block_size
        upto = min(len(seq.block_hashes), computed // bs)
        for i in range(seq.registered, upto):
            parent = seq.block_hashes[i - 1] if i else None
            self.pool.register(
                seq.blocks[i], seq.block_hashes[i], parent, seq.prompt_ids[i * bs : (i + 1) * bs]
            )
        seq.registered = max(seq.registered, upto)

    def complete(self, plan: StepPlan, now: float) -> None:
        """End the step at ``now``: one token for each decoding sequence still running, and the
        first token (or, after a recompute, the next) of each whose prefill this step finished."""
        for seq in plan.decode:
            if seq.status is SeqStatus.RUNNING:  # not aborted or preempted during the step
                self._emit(seq, now)
        for seq, take in zip(plan.prefill, plan.chunks, strict=True):
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.prefill_left = max(0, seq.prefill_left - take)
            if seq.prefill_left == 0:
                self._emit(seq, now)

    def _emit(self, seq: Sequence, now: float) -> None:
        n_out = len(seq.output) + 1
        stop = (
            not seq.ignore_eos
            and n_out > seq.min_tokens
            and self.config.eos_prob > 0
            and seq.rng.random() < self.config.eos_prob
        )
        seq.output.append(EOS_ID if stop else _WORD_BASE + seq.rng.randrange(NUM_WORDS))
        self.stats.generation_tokens += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.stats.ttft.observe(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.stats.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if stop or n_out >= seq.max_tokens:
            self.running.remove(seq)
            self._finish(seq, "stop" if stop else "length", now)
        else:
            seq._notify()


# ---------------------------------------------------------------------------
# The async engine loop
# ---------------------------------------------------------------------------


class SimEngine:
    """Runs a :class:`Scheduler` in real time on the event loop: plan, sleep, complete."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.sched = Scheduler(config)
        #: Where vLLM's KV cache events go (``KV_EVENTS_PORT``); None = not published.
        self.publisher: kv_events.Publisher | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop task (inside a running event loop)."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="sim-engine-loop")

    async def stop(self) -> None:
        """Abort every sequence and end the loop."""
        for seq in [*self.sched.running, *self.sched.waiting]:
            self.sched.abort(seq)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence and wake the loop."""
        self.sched.add(seq)
        if self._wake is not None:
            self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Abort a sequence (no-op if finished)."""
        self.sched.abort(seq)

    @property
    def alive(self) -> bool:
        """True while the loop task runs."""
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        last_end = -math.inf
        while True:
            if not self.sched.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            t0 = loop.time()
            # Steps follow each other back to back: absorb small sleep overshoot so
            # the mean step time stays what the model says.
            if 0.0 <= t0 - last_end < 0.005:
                t0 = last_end
            try:
                last_end = await self._step(loop, t0)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not hang every client: fail them and go on
                log.exception("engine step failed; aborting every request")
                for seq in [*self.sched.running, *self.sched.waiting]:
                    self.sched.abort(seq)

    async def _step(self, loop: asyncio.AbstractEventLoop, t0: float) -> float:
        """One engine step starting at ``t0``; returns its end time."""
        assert self._wake is not None
        plan = self.sched.schedule(t0)
        if self.publisher is not None:
            self.publisher.send(self.sched.pool.take_events())
        if plan.empty:  # nothing fits although nothing runs: cannot happen; do not spin
            self._wake.clear()
            await self._wake.wait()
            return -math.inf
        end = t0 + plan.duration_s
        await asyncio.sleep(max(0.0, end - loop.time()))
        self.sched.complete(plan, max(end, loop.time()))
        return end


# ---------------------------------------------------------------------------
# HTTP API (vLLM 0.32's shapes)
# ---------------------------------------------------------------------------


ABORTED_MESSAGE = "The request was aborted by the engine (shutting down or internal error)."


class ApiError(Exception):
    """An error answered as vLLM's error JSON."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message, self.status, self.err_type = message, status, err_type


def error_response(message: str, status: int = 400, err_type: str = "BadRequestError") -> JSONResponse:
    """vLLM's ``{"error": {message, type, param, code}}``, plus the older flat keys for old clients."""
    info = {"message": message, "type": err_type, "param": None, "code": status}
    return JSONResponse({"error": info, "object": "error", **info}, status_code=status)


def _pydantic_message(e: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        if err.get("type") == "json_invalid":
            pos = err.get("loc", ("body", "?"))[-1]
            parts.append(f"invalid JSON body at character {pos}: {(err.get('ctx') or {}).get('error', '')}")
            continue
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'request body (a JSON object)'}: {err.get('msg')}")
    return "; ".join(parts)[:1000] or "invalid request"


class _ApiModel(BaseModel):
    # vLLM ignores (and logs) fields it does not know.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_ApiModel):
    """``stream_options`` of a completion request."""

    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _SamplingRequest(_ApiModel):
    """The fields completions and chat completions share (others are accepted and ignored)."""

    model: str | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions`` body (sampling fields beyond these are accepted and ignored)."""

    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=1)
    add_special_tokens: bool = True


class ChatMessageIn(_ApiModel):
    """One message of a chat request (text content, or a list of text parts)."""

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions`` body: rendered with a plain chat template, then a completion."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def as_completion(self) -> CompletionRequest:
        """The completion request of the rendered conversation."""
        prompt = "".join(f"<|{m.role}|>\n{m.text()}\n" for m in self.messages) + "<|assistant|>\n"
        return CompletionRequest(
            model=self.model,
            prompt=prompt,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stream=self.stream,
            stream_options=self.stream_options,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            n=self.n,
        )


class TokenizeRequest(_ApiModel):
    """``POST /tokenize`` body (the completion form)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_ApiModel):
    """``POST /detokenize`` body."""

    model: str | None = None
    tokens: list[StrictInt]


#: The media type of a streamed completion (Starlette adds ``; charset=utf-8`` to its header).
SSE_MEDIA_TYPE = "text/event-stream"
#: The ``http.response.start`` headers of a streamed completion: exactly what Starlette's
#: ``StreamingResponse(media_type=SSE_MEDIA_TYPE)`` sends (a test holds the two together).
SSE_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"text/event-stream; charset=utf-8")]
#: Stands for the token's text while a stream's chunk template is built; its JSON encoding is
#: looked for in the rendered chunk (no id, object name or JSON syntax holds a NUL; a served
#: model name that holds this string gets no template).
_TEXT_SENTINEL = "\x00llmconsole-sim-text\x00"


def token_chunk(
    head: dict[str, Any],
    piece: str,
    finish_reason: str | None,
    chat: bool,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One token's SSE chunk of a streamed (chat) completion, as vLLM 0.32 shapes it."""
    choice: dict[str, Any] = {
        "index": 0,
        "text": piece,
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
    }
    if chat:
        del choice["text"]
        choice["delta"] = {"content": piece}
    return {**head, "choices": [choice], "usage": usage}


def chunk_template(head: dict[str, Any], chat: bool) -> tuple[bytes, bytes] | None:
    """The SSE bytes before and after the text of a plain token chunk (no finish, no usage).

    ``prefix + json.dumps(text).encode() + suffix`` is byte for byte
    ``f"data: {json.dumps(token_chunk(head, text, None, chat))}\\n\\n".encode()``: the template is
    that very chunk rendered once with a sentinel text, split where the sentinel's JSON is
    (json.dumps encodes a string alone as it does inside a dict). None, if the sentinel is not
    found exactly once (say a served model name that holds it): the caller renders each chunk.
    """
    rendered = f"data: {json.dumps(token_chunk(head, _TEXT_SENTINEL, None, chat))}\n\n"
    parts = rendered.split(json.dumps(_TEXT_SENTINEL))
    if len(parts) != 2:
        return None
    return parts[0].encode(), parts[1].encode()


@dataclass
class Admitted:
    """A validated, queued completion: its sequence, the event its updates set, its chunks' head."""

    seq: Sequence
    event: asyncio.Event
    head: dict[str, Any]


def fault_injected(req: CompletionRequest | ChatCompletionRequest) -> bool:
    """True if a (chat) completion carries :data:`FAIL_MARKER` in its prompt (answered 500)."""
    if isinstance(req, ChatCompletionRequest):
        return any(FAIL_MARKER in m.text() for m in req.messages)
    return isinstance(req.prompt, str) and FAIL_MARKER in req.prompt


def fault_response() -> JSONResponse:
    """The 500 a fault-injected request gets."""
    return error_response(
        "simulated engine failure (fault-injection marker in the prompt)", 500, "InternalServerError"
    )


class BearerAuth:
    """As vLLM's ``--api-key``: ``Authorization: Bearer <key>`` on /v1 paths, 401 otherwise (plain ASGI)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key, then pass the request on."""
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _listen_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class SimServer:
    """Request handling of one simulator app: validation, tokenizer, engine, responses."""

    def __init__(self, config: SimConfig, model: str, max_model_len: int, api_key: str, profile: str) -> None:
        self.config = config
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.profile = profile
        self.tokenizer = SimTokenizer()
        self.engine = SimEngine(config)
        self.created = int(time.time())
        self._piece_json_cache: dict[int, bytes] = {}

    def check_model(self, name: str | None) -> None:
        """404 like vLLM if a request names a model that is not served."""
        if name is not None and name != self.model:
            raise ApiError(f"The model `{name}` does not exist.", 404, "NotFoundError")

    def check_ids(self, ids: list[int]) -> None:
        """400 if a token id is outside the vocabulary."""
        v = self.tokenizer.vocab_size
        for t in ids:
            if not 0 <= t < v:
                raise ApiError(f"Token id {t} is out of vocabulary (0..{v - 1}).")

    def prompt_ids(self, req: CompletionRequest) -> list[int]:
        """The request's prompt as token ids (one prompt only)."""
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError("The simulator serves one prompt per request; send them separately.")
            p = p[0]
        if isinstance(p, str):
            ids = self.tokenizer.encode(p, req.add_special_tokens)
        else:
            ids = list(p)  # type: ignore[arg-type]
            self.check_ids(ids)
        if not ids:
            raise ApiError("The prompt is empty.")
        return ids

    def limits(self, req: CompletionRequest, n_prompt: int) -> int:
        """Validated max_tokens for a prompt of ``n_prompt`` tokens."""
        if req.n != 1:
            raise ApiError("The simulator supports n=1 only.")
        if req.stream_options is not None and not req.stream:
            raise ApiError("Stream options can only be defined when `stream=True`.")
        room = self.max_model_len - n_prompt
        max_tokens = req.max_tokens if req.max_tokens is not None else room
        if n_prompt >= self.max_model_len or max_tokens > room:
            raise ApiError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request "
                f"has {n_prompt} input tokens and asks for {max_tokens} output tokens "
                f"({n_prompt} + {max_tokens} > {self.max_model_len}). Please reduce the length of the prompt "
                "or of the completion."
            )
        if req.min_tokens > max_tokens:
            raise ApiError(
                f"min_tokens ({req.min_tokens}) must be less than or equal to max_tokens ({max_tokens})."
            )
        need = -(-(n_prompt + max_tokens) // self.config.block_size)
        if need > self.config.kv_blocks:
            raise ApiError(
                f"The request needs {need} KV blocks but the simulated cache has {self.config.kv_blocks}."
            )
        return max_tokens

    def usage(self, seq: Sequence) -> dict[str, Any]:
        """OpenAI usage with vLLM's ``prompt_tokens_details.cached_tokens``."""
        p, c = len(seq.prompt_ids), len(seq.output)
        return {
            "prompt_tokens": p,
            "total_tokens": p + c,
            "completion_tokens": c,
            "prompt_tokens_details": {"cached_tokens": seq.num_cached},
        }

    def submit(self, req: CompletionRequest, chat: bool = False) -> Admitted:
        """Validate a completion request and queue its sequence; what the route and the fast path share.

        Raises :class:`ApiError` (vLLM's refusals) before anything is queued."""
        self.check_model(req.model)
        ids = self.prompt_ids(req)
        max_tokens = self.limits(req, len(ids))
        loop = asyncio.get_running_loop()
        seq = self.engine.sched.new_sequence(
            ids,
            max_tokens,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            seed=req.seed,
            arrival=loop.time(),
        )
        event = asyncio.Event()
        seq.on_update = event.set
        self.engine.submit(seq)
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat and req.stream else "text_completion",
            "created": int(time.time()),
            "model": self.model,
        }
        if chat and not req.stream:
            head["object"] = "chat.completion"
        return Admitted(seq, event, head)

    def sse(self, job: Admitted, req: CompletionRequest, chat: bool = False) -> AsyncIterator[bytes]:
        """The SSE events of a streamed completion ``job``, one ``bytes`` per event."""
        opts = req.stream_options or StreamOptions(include_usage=False)
        return self._stream(job.seq, job.event, job.head, opts, chat)

    async def completion(self, request: Request, req: CompletionRequest, chat: bool = False) -> Response:
        """Serve one completion (or, with ``chat``, one chat completion), streamed or not."""
        job = self.submit(req, chat)
        seq, event, head = job.seq, job.event, job.head
        if req.stream:
            # Streamed requests StreamFastPath passes on: another JSON media type, a body only
            # json.loads takes (a UTF-8 BOM, a lone surrogate).
            return StreamingResponse(self.sse(job, req, chat), media_type=SSE_MEDIA_TYPE)
        waiter = asyncio.ensure_future(event_wait_finished(seq, event))
        listener = asyncio.ensure_future(_listen_for_disconnect(request))
        try:
            await asyncio.wait({waiter, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            listener.cancel()
            self.engine.abort(seq)  # no-op when finished; frees the slot when the client left
        if seq.finish_reason == "abort":
            raise ApiError(ABORTED_MESSAGE, 503, "ServiceUnavailableError")
        text = "".join(self.tokenizer.piece(t) for t in seq.output)
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": seq.finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        if chat:
            del choice["text"], choice["prompt_logprobs"]
            choice["message"] = {"role": "assistant", "content": text}
        body = {**head, "choices": [choice], "usage": self.usage(seq), "system_fingerprint": None}
        return JSONResponse(body)

    def _piece_json(self, tid: int) -> bytes:
        """``json.dumps`` of the text token ``tid`` adds, as bytes (memoised: the vocabulary is small)."""
        got = self._piece_json_cache.get(tid)
        if got is None:
            got = self._piece_json_cache[tid] = json.dumps(self.tokenizer.piece(tid)).encode()
        return got

    async def _stream(
        self,
        seq: Sequence,
        event: asyncio.Event,
        head: dict[str, Any],
        opts: StreamOptions,
        chat: bool = False,
    ) -> AsyncIterator[bytes]:
        sent = 0
        # A plain token chunk (no finish reason, no usage) differs from the next only in its
        # text: its bytes before and after the text are built once per stream, and each such
        # chunk is prefix + the text's JSON + suffix (json.dumps per chunk was ~8 % of the
        # simulator's CPU). The others keep the dict and json.dumps (token_chunk).
        template = None if opts.continuous_usage_stats else chunk_template(head, chat)
        try:
            if chat:  # vLLM opens a chat stream with the role, before any token
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps({**head, 'choices': [role], 'usage': None})}\n\n".encode()
            while True:
                await event.wait()
                event.clear()
                done = seq.finished
                out = seq.output
                while sent < len(out):
                    last = done and sent == len(out) - 1
                    tid = out[sent]
                    sent += 1
                    if template is not None and not last:
                        yield template[0] + self._piece_json(tid) + template[1]
                        continue
                    usage: dict[str, Any] | None = None
                    if opts.continuous_usage_stats:
                        usage = self.usage(seq) | {"completion_tokens": sent}
                        usage["total_tokens"] = len(seq.prompt_ids) + sent
                    finish = seq.finish_reason if last else None
                    chunk = token_chunk(head, self.tokenizer.piece(tid), finish, chat, usage)
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                if done:
                    break
            if seq.finish_reason == "abort":
                info = {
                    "message": ABORTED_MESSAGE,
                    "type": "ServiceUnavailableError",
                    "param": None,
                    "code": 503,
                }
                yield f"data: {json.dumps({'error': info, 'object': 'error', **info})}\n\n".encode()
            elif opts.include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': self.usage(seq)})}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            self.engine.abort(seq)  # the client went away mid-stream: free the slot

    def models(self) -> dict[str, Any]:
        """``/v1/models``, saying it is a simulator."""
        desc = f"llmconsole simulator of vLLM's API (profile: {self.profile or 'settings'})"
        if self.config.description:
            desc += f" — {self.config.description}"
        card = {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": OWNER,
            "root": f"{OWNER}/{self.profile or 'settings'}",
            "parent": None,
            "max_model_len": self.max_model_len,
            # Not in vLLM's card: the simulator's batch limit, which routers size a node by.
            "max_num_seqs": self.config.max_num_seqs,
            "permission": [],
            "simulator": True,
            "profile": self.profile or None,
            "description": desc,
        }
        return {"object": "list", "data": [card]}


#: The streamed routes :class:`StreamFastPath` serves, each with whether it is the chat one.
_STREAM_PATHS: dict[str, bool] = {"/v1/completions": False, "/v1/chat/completions": True}
#: Bodies :class:`StreamFastPath` reads: no bound, because the FastAPI app has none (FastAPI's
#: ``max_body_size`` is left at its default, None = unlimited, and uvicorn sets none): a body the
#: route would take is read here whole and, when not served here, replayed to it whole.
_BODY_LIMIT = sys.maxsize


class StreamFastPath:
    """Pure ASGI: streamed ``POST /v1/completions`` and ``/v1/chat/completions`` without FastAPI.

    Why: in a py-spy profile of the simulator under a benchmark (concurrency 32, 100-token
    streams), Starlette's layers around each ``send`` of a ``StreamingResponse`` (the error
    middlewares' send wrappers, the response's task group for its disconnect listener) were a
    fifth of its samples, plus FastAPI's routing and validation per request. This path parses
    the body with the route's own models, shares :meth:`SimServer.submit` (validation, sequence)
    and :meth:`SimServer.sse` (the events) with the route, and sends each event straight to the
    server. Anything it does not serve — another path or method, a content type other than
    ``application/json``, a body that does not validate, no ``"stream": true``, the fault
    marker, any refusal (:class:`ApiError`) — goes on to the FastAPI app with its body replayed,
    so every refusal and every non-streamed answer stays the route's own.
    """

    def __init__(self, app: ASGIApp, srv: SimServer) -> None:
        self.app = app
        self.srv = srv

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a well-formed streamed completion here; pass everything else on."""
        chat: bool | None = None
        if scope["type"] == "http" and scope["method"] == "POST":
            chat = _STREAM_PATHS.get(scope["path"])
        if chat is None:
            await self.app(scope, receive, send)
            return
        got = await asgi.read_body(receive, _BODY_LIMIT)
        if got is None:
            return  # the client went away before sending its body
        body = got[0]
        admitted = self._admit(scope, body, chat)
        if admitted is None:
            await self.app(scope, asgi.replay(body, receive), send)
            return
        job, req = admitted
        await self._serve(job, req, chat, receive, send)

    def _admit(self, scope: Scope, body: bytes, chat: bool) -> tuple[Admitted, CompletionRequest] | None:
        """The queued job of a streamed request this path serves; None sends the request to the route."""
        ctype: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":  # the first, as Starlette's Headers.get (the route's) takes it
                ctype = value
                break
        # The route parses the body as JSON for application/json and any */*+json; the usual one
        # is served here, the others by the route, alike.
        if ctype is None or ctype.partition(b";")[0].strip().lower() != b"application/json":
            return None
        try:
            # pydantic's own JSON parser is stricter than the route's json.loads in places (a
            # UTF-8 BOM, lone surrogates, deep nesting): those bodies go to the route.
            if chat:
                chat_req = ChatCompletionRequest.model_validate_json(body)
                if not chat_req.stream or fault_injected(chat_req):
                    return None
                req = chat_req.as_completion()
            else:
                req = CompletionRequest.model_validate_json(body)
                if not req.stream or fault_injected(req):
                    return None
            return self.srv.submit(req, chat), req
        except Exception:  # invalid, refused (ApiError) or unforeseen: the route answers it, as before
            return None

    async def _serve(
        self, job: Admitted, req: CompletionRequest, chat: bool, receive: Receive, send: Send
    ) -> None:
        """Stream ``job``'s events: the ASGI messages Starlette's ``StreamingResponse`` sends."""
        # Starlette listens for http.disconnect beside the stream; so does this path, so that a
        # client that leaves while no token comes (queued, prefilling, a long step) frees its
        # slot at once: uvicorn drops sends to a client that is gone without a word.
        gone = asyncio.ensure_future(self._abort_when_gone(receive, job.seq))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async with aclosing(self.srv.sse(job, req, chat)) as events:
                async for event in events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            self.srv.engine.abort(job.seq)  # no-op when finished

    async def _abort_when_gone(self, receive: Receive, seq: Sequence) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # Ends the stream too: the sequence finishes ("abort") and its events run out.
        self.srv.engine.abort(seq)


class _SimApp(FastAPI):
    """The simulator's FastAPI app with two plain-ASGI layers in front of all of FastAPI's own.

    :class:`BearerAuth` (when a key is set) is outermost, its check unchanged (it used to sit
    inside FastAPI's error middlewares, which never touched its 401); :class:`StreamFastPath`
    sits inside it, so a streamed completion's sends go straight to the server, through none of
    the send wrappers of FastAPI's error middlewares.
    """

    def __init__(self, srv: SimServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.sim = srv

    def build_middleware_stack(self) -> ASGIApp:
        """FastAPI's stack behind the fast path and the key check."""
        srv: SimServer = self.state.sim
        app: ASGIApp = StreamFastPath(super().build_middleware_stack(), srv)
        return BearerAuth(app, srv.api_key) if srv.api_key else app


async def event_wait_finished(seq: Sequence, event: asyncio.Event) -> None:
    """Wait until ``seq`` finished (its ``on_update`` sets ``event``)."""
    while not seq.finished:
        await event.wait()
        event.clear()


def create_app(
    config: SimConfig,
    *,
    model: str | None = None,
    max_model_len: int | None = None,
    api_key: str | None = None,
    profile: str = "",
    kv_events_port: int = 0,
) -> FastAPI:
    """The simulator app; arguments left None come from :func:`get_settings`.

    ``kv_events_port`` > 0 publishes vLLM's KV cache events on 127.0.0.1 at that port."""
    if model is None or max_model_len is None or api_key is None:
        s = get_settings()
        model = s.model if model is None else model
        max_model_len = s.max_model_len if max_model_len is None else max_model_len
        api_key = s.engine_api_key.get_secret_value() if api_key is None else api_key
    srv = SimServer(config, model or DEFAULT_MODEL, max_model_len, api_key, profile)
    if config.kv_blocks * config.block_size < max_model_len:
        log.warning(
            "KV cache (%d tokens) is smaller than max_model_len %d: long requests get 400",
            config.kv_blocks * config.block_size,
            max_model_len,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if kv_events_port:
            srv.engine.publisher = kv_events.Publisher(kv_events_port)
            srv.engine.sched.pool.events = []
        srv.engine.start()
        try:
            yield
        finally:
            await srv.engine.stop()
            if srv.engine.publisher is not None:
                srv.engine.publisher.close()

    app = _SimApp(
        srv,
        title="llmconsole simulator engine",
        description="vLLM-compatible simulator (OpenAI completions, tokenizer, Prometheus metrics).",
        version=VLLM_API_VERSION,
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.message, e.status, e.err_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(_pydantic_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        err_type = "NotFoundError" if e.status_code == 404 else "BadRequestError"
        return error_response(str(e.detail), e.status_code, err_type)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(f"internal error: {type(e).__name__}", 500, "InternalServerError")

    @app.get("/health")
    async def health() -> Response:
        """200 with an empty body while the engine loop runs (500 if it died)."""
        return Response(status_code=200 if srv.engine.alive else 500)

    @app.get("/version")
    async def version() -> dict[str, Any]:
        """The vLLM API version followed (marked as the simulator's)."""
        return {"version": f"{VLLM_API_VERSION}+llmconsole.sim", "simulator": True}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one served model."""
        return srv.models()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        """Token ids of a prompt on the simulator's tokenizer."""
        srv.check_model(req.model)
        ids = srv.tokenizer.encode(req.prompt, req.add_special_tokens)
        strs = [srv.tokenizer.token_str(t) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": srv.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        """Text of token ids."""
        srv.check_model(req.model)
        srv.check_ids(req.tokens)
        return {"prompt": srv.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> Response:
        """OpenAI completions, streamed (SSE) or not."""
        if fault_injected(req):  # fault injection for reliability tests: a job that always fails
            return fault_response()
        return await srv.completion(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatCompletionRequest) -> Response:
        """OpenAI chat completions (a plain chat template), streamed (SSE) or not."""
        if fault_injected(req):
            return fault_response()
        return await srv.completion(request, req.as_completion(), chat=True)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text with vLLM's metric names."""
        text = render_metrics(srv.engine.sched, srv.model)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

_TIMING_FIELDS = [n for n in SimConfig.model_fields if n not in ("description", "source")]


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``python -m services.sim_engine`` (None = not given)."""
    p = argparse.ArgumentParser(prog="python -m services.sim_engine", description=__doc__.splitlines()[0])
    p.add_argument("--host", help="bind address (default: Settings.engine_host)")
    p.add_argument("--port", type=int, help="port (default: Settings.engine_port)")
    p.add_argument("--profile", help="profile name or .json path (default: Settings.sim_profile)")
    p.add_argument("--model", help="served model id (default: Settings.model or llmconsole-sim)")
    p.add_argument("--max-model-len", type=int, help="context length (default: Settings.max_model_len)")
    p.add_argument("--api-key", help="require this Bearer key on /v1 (default: Settings.engine_api_key)")
    p.add_argument("--access-log", action="store_true", help="log every request (off: benchmarks are noisy)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--list-profiles", action="store_true", help="print the known profiles and exit")
    for name in _TIMING_FIELDS:
        info = SimConfig.model_fields[name]
        kind = int if info.annotation in (int, "int") else float
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=info.description)
    return p


def config_from_args(args: argparse.Namespace, s: Settings) -> SimConfig:
    """Settings, then the profile, then command-line flags."""
    cfg = SimConfig.from_settings(s, args.profile)
    flags = {n: getattr(args, n) for n in _TIMING_FIELDS if getattr(args, n) is not None}
    return cfg.model_validate(cfg.model_dump() | flags) if flags else cfg


def main(argv: list[str] | None = None) -> int:
    """Serve the simulator until stopped."""
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        s = get_settings()
        if args.list_profiles:
            for name in list_profiles(s):
                print(f"{name}: {load_profile(name, s).get('description', '')}")
            return 0
        config = config_from_args(args, s)
    except (ProfileError, ValidationError) as e:
        msg = _pydantic_message(e) if isinstance(e, ValidationError) else str(e)
        print(f"sim_engine: {msg}", file=sys.stderr, flush=True)
        return 2
    profile = s.sim_profile if args.profile is None else args.profile
    app = create_app(
        config,
        model=args.model if args.model is not None else s.model,
        max_model_len=args.max_model_len or s.max_model_len,
        api_key=args.api_key if args.api_key is not None else s.engine_api_key.get_secret_value(),
        profile=profile,
        kv_events_port=s.kv_events_port,
    )
    host = args.host or s.engine_host
    port = args.port if args.port is not None else s.engine_port
    log.info(
        "simulator %s on %s:%d, profile %r: %s",
        app.state.sim.model,
        host,
        port,
        profile or "settings",
        config.model_dump(exclude={"description", "source"}),
    )
    runtime.freeze_startup_heap()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

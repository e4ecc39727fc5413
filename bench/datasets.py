"""Benchmark datasets in the formats ``vllm bench serve`` reads (its ``--dataset-name``).

* ``random``: the project's own synthetic workload (exact-length prompts with a
  shared prefix, built on the engine's tokenizer); no file, nothing loaded here.
* ``custom``: a JSONL file of ``{"prompt": ..., "output_tokens": N?}`` lines
  (vLLM's custom format), read by :func:`bench.workload.load_dataset`.
* ``sharegpt``: a ShareGPT JSON file, a list of ``{"conversations": [{"from":
  "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}``. The first
  human turn is the prompt; the turn after it (the reply) gives the output
  length, counted on the engine's own tokenizer as vLLM counts it, unless
  ``--output-tokens`` is given. Conversations are shuffled with the seed and
  filtered as vLLM does (prompt and reply at least 4 tokens, prompt at most
  1024, both together at most 2048), and additionally must fit the engine's
  context length with their output.
* ``prefix_repetition``: synthetic too; the CLI maps vLLM's
  ``--prefix-repetition-*`` flags onto prefix groups (``prefix_groups`` groups,
  each with its own shared prefix of ``prefix_share`` of the prompt).

A file that cannot be used raises :class:`DatasetError`: one sentence naming
the file, the line or entry, and what is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
from argparse import SUPPRESS
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from bench.config import BenchConfig, DatasetName
from bench.workload import DatasetPrompt, load_dataset
from services.contracts import MAX_OUTPUT_TOKENS, MAX_PROMPT_CHARS
from services.engine_client import EngineClient, EngineError
from services.settings import Settings

#: ``--dataset-name`` values, as vLLM spells them.
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)

#: vLLM's ShareGPT filter (``is_valid_sequence`` defaults in vllm/benchmarks/datasets).
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
#: Speaker names of a human turn in ShareGPT files.
HUMAN_ROLES = frozenset({"human", "user"})
#: Engine calls in flight while a dataset is measured.
_TOKENIZE_CONCURRENCY = 16


class DatasetError(ValueError):
    """A dataset file that cannot be used (the message names the file and the entry or line)."""


@dataclass(frozen=True)
class Conversation:
    """The prompt and reply of one ShareGPT entry (``entry`` is 1-based, as the message says)."""

    entry: int
    prompt: str
    reply: str


def dataset_kind(cfg: BenchConfig) -> str:
    """The dataset a config asks for: its ``dataset_name``, else guessed from the file.

    Without ``--dataset-name`` a file that starts with ``[`` is ShareGPT JSON,
    any other file the JSONL custom format; no file is the random workload.
    """
    if cfg.dataset_name is not None:
        return cfg.dataset_name
    if cfg.dataset is None:
        return "random"
    try:
        with open(cfg.dataset, encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096).lstrip()
    except OSError:
        return "custom"  # the loader says what is wrong with the file
    return "sharegpt" if head.startswith("[") else "custom"


# ---------------------------------------------------------------------------
# ShareGPT
# ---------------------------------------------------------------------------

_cache: dict[tuple[str, int, int], list[Conversation]] = {}


def _where(index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"entry {index + 1}" + (f" (id {ident!r})" if isinstance(ident, str | int) else "")


def _conversation(index: int, entry: Any, p: Path) -> Conversation | None:
    """The first human turn and its reply of one entry; None if it has no such pair (skipped)."""
    where = _where(index, entry)
    if not isinstance(entry, dict):
        raise DatasetError(
            f"dataset {p} {where}: expected an object with 'conversations', got {type(entry).__name__}"
        )
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise DatasetError(f"dataset {p} {where}: needs a 'conversations' list of turns")
    for t, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DatasetError(f"dataset {p} {where}: turn {t} needs a string 'value'")
    for t, turn in enumerate(turns[:-1]):
        if str(turn.get("from", "")).lower() in HUMAN_ROLES:
            reply = turns[t + 1]
            if str(reply.get("from", "")).lower() in HUMAN_ROLES:
                return None  # two human turns in a row: no reply to measure
            return Conversation(index + 1, turn["value"], reply["value"])
    return None


def read_sharegpt(path: str | Path) -> list[Conversation]:
    """Every usable conversation of a ShareGPT JSON file, in file order.

    Entries without a human turn followed by a reply are skipped (vLLM skips
    conversations of fewer than two turns too). The parsed file is kept for
    reuse while the file is unchanged (the CLI checks it, then the run reads it).
    Raises :class:`DatasetError`.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise DatasetError(f"dataset {p}: no such file") from None
    if not p.is_file():
        raise DatasetError(f"dataset {p}: not a file")
    key = (os.path.realpath(p), st.st_mtime_ns, st.st_size)
    if key in _cache:
        return _cache[key]
    try:
        with p.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        if not e.doc.strip():
            raise DatasetError(
                f"dataset {p}: the file is empty; expected a JSON list of conversations"
            ) from None
        hint = ""
        if e.msg == "Extra data":
            hint = " (a JSONL file of prompts is --dataset-name custom)"
        raise DatasetError(
            f"dataset {p} line {e.lineno} column {e.colno}: not valid ShareGPT JSON ({e.msg}){hint}"
        ) from None
    if not isinstance(data, list):
        raise DatasetError(
            f"dataset {p}: expected a JSON list of conversations (ShareGPT), got a JSON {type(data).__name__}"
        )
    if not data:
        raise DatasetError(f"dataset {p}: the list is empty; expected ShareGPT conversations")
    convs = [c for i, entry in enumerate(data) if (c := _conversation(i, entry, p)) is not None]
    if not convs:
        raise DatasetError(
            f"dataset {p}: none of its {len(data)} entries has a human turn followed by a reply"
        )
    _cache.clear()  # one file at a time: a ShareGPT file can be hundreds of MB
    _cache[key] = convs
    return convs


def check_dataset(cfg: BenchConfig) -> str:
    """Read the config's dataset file (no engine needed) and return its kind; DatasetError if unusable."""
    kind = dataset_kind(cfg)
    if kind == "sharegpt" and cfg.dataset is not None:
        read_sharegpt(cfg.dataset)
    elif kind == "custom" and cfg.dataset is not None:
        try:
            load_dataset(cfg.dataset)
        except ValueError as e:
            raise DatasetError(str(e)) from None
    return kind


async def _context_length(engine: EngineClient, settings: Settings) -> int:
    """The engine's ``max_model_len`` (``/v1/models``), else the configured one."""
    for m in await engine.models():
        value = m.get("max_model_len")
        if isinstance(value, int) and value > 0:
            return value
    return settings.max_model_len


async def sample_sharegpt(
    engine: EngineClient,
    path: str | Path,
    n: int,
    seed: int,
    output_tokens: int | None,
    context: int,
) -> list[DatasetPrompt]:
    """Up to ``n`` prompts of a ShareGPT file, measured on the engine's tokenizer.

    Shuffled with ``seed`` as vLLM shuffles (``random.seed(seed); random.shuffle``),
    then taken in that order while they pass vLLM's filter and fit ``context``
    with their output. ``output_tokens`` replaces the reply's length when given.
    """
    convs = list(read_sharegpt(path))
    random.Random(seed).shuffle(convs)
    sem = asyncio.Semaphore(_TOKENIZE_CONCURRENCY)
    skipped: Counter[str] = Counter()

    async def measure(c: Conversation) -> DatasetPrompt | None:
        if len(c.prompt) > MAX_PROMPT_CHARS:
            skipped[f"prompt over {MAX_PROMPT_CHARS} characters"] += 1
            return None
        async with sem:
            try:
                prompt_len = len(await engine.tokenize(c.prompt))
                out = output_tokens
                if out is None:  # vLLM: len(tokenizer(completion).input_ids)
                    out = len(await engine.tokenize(c.reply))
            except EngineError as e:
                if e.status not in (400, 413, 422):
                    raise  # the engine is down or failing, not this conversation
                skipped["refused by the engine's tokenizer"] += 1
                return None
        if prompt_len < SHAREGPT_MIN_LEN or (output_tokens is None and out < SHAREGPT_MIN_LEN):
            skipped[f"prompt or reply under {SHAREGPT_MIN_LEN} tokens"] += 1
        elif prompt_len > SHAREGPT_MAX_PROMPT_LEN:
            skipped[f"prompt over {SHAREGPT_MAX_PROMPT_LEN} tokens"] += 1
        elif prompt_len + out > SHAREGPT_MAX_TOTAL_LEN:
            skipped[f"prompt + output over {SHAREGPT_MAX_TOTAL_LEN} tokens"] += 1
        elif prompt_len + out > context or out > MAX_OUTPUT_TOKENS:
            skipped[f"prompt + output over the engine's context length {context}"] += 1
        else:
            return DatasetPrompt(c.prompt, out, input_tokens=prompt_len)
        return None

    out: list[DatasetPrompt] = []
    batch = max(2 * _TOKENIZE_CONCURRENCY, 1)
    for start in range(0, len(convs), batch):
        got = await asyncio.gather(*(measure(c) for c in convs[start : start + batch]))
        out.extend(d for d in got if d is not None)
        if len(out) >= n:
            return out[:n]
    if not out:
        why = ", ".join(f"{k} ({v})" for k, v in skipped.most_common())
        raise DatasetError(f"dataset {path}: none of its {len(convs)} conversations can be used: {why}")
    return out  # fewer than n: the workload cycles through them, as vLLM oversamples


# ---------------------------------------------------------------------------
# The one entry point of the runner
# ---------------------------------------------------------------------------


async def load_prompts(config: BenchConfig, settings: Settings, n: int) -> list[DatasetPrompt] | None:
    """The literal prompts of a run (None: the synthetic random workload).

    ``config`` is the run's config as given (before
    :meth:`BenchConfig.resolved`), so an explicit ``output_tokens`` is told from
    the default; ``n`` is how many prompts the run sends (measured + warm-up).
    Raises :class:`DatasetError` (a ValueError) with a one-sentence message.
    """
    kind = dataset_kind(config)
    if kind in ("random", "prefix_repetition"):
        return None  # synthetic (prefix_repetition: prefix groups, mapped by the CLI)
    if kind == "custom":
        assert config.dataset is not None
        try:
            return load_dataset(config.dataset)
        except DatasetError:
            raise
        except ValueError as e:
            raise DatasetError(str(e)) from None
    assert config.dataset is not None  # sharegpt
    read_sharegpt(config.dataset)  # file errors before any engine call
    engine = EngineClient(settings.engine_url, settings.engine_api_key.get_secret_value(), timeout_s=60)
    try:
        context = await _context_length(engine, settings)
        return await sample_sharegpt(engine, config.dataset, n, config.seed, config.output_tokens, context)
    except EngineError as e:
        raise DatasetError(f"could not measure the {kind} prompts on the engine's tokenizer: {e}") from None
    finally:
        await engine.aclose()


# ---------------------------------------------------------------------------
# ``vllm bench serve``'s flags on ``llmconsole bench``
# ---------------------------------------------------------------------------

#: vLLM's defaults of its prefix_repetition dataset (used when a flag is not given).
PREFIX_REPETITION_DEFAULTS = {"prefix_len": 256, "suffix_len": 256, "num_prefixes": 10}


def add_vllm_args(p: argparse.ArgumentParser, positive_int: Callable[[str], int]) -> None:
    """Add ``vllm bench serve``'s dataset flags to the run parser (a group of their own).

    Flags that are another name of one of the project's own write into its
    ``dest``; the rest are translated by :func:`apply_vllm_args`.
    """
    g = p.add_argument_group("vllm bench serve's dataset flags")
    g.add_argument(
        "--dataset-name",
        choices=DATASET_NAMES,
        help="random (default: synthetic prompts), sharegpt (--dataset-path ShareGPT JSON), "
        "custom (--dataset-path JSONL), prefix_repetition (prefix groups)",
    )
    g.add_argument("--dataset-path", dest="dataset", metavar="FILE", default=SUPPRESS, help="= --dataset")
    g.add_argument(
        "--random-input-len", dest="input_tokens", type=positive_int, metavar="N", default=SUPPRESS,
        help="= --input-tokens (after --random-prefix-len, if any)",
    )  # fmt: skip
    for flag in ("--random-output-len", "--sharegpt-output-len", "--prefix-repetition-output-len"):
        g.add_argument(
            flag,
            dest="output_tokens",
            type=positive_int,
            metavar="N",
            default=SUPPRESS,
            help="= --output-tokens",
        )
    g.add_argument(
        "--random-range-ratio",
        dest="range_ratio",
        type=float,
        metavar="R",
        default=SUPPRESS,
        help="= --range-ratio",
    )
    g.add_argument(
        "--random-prefix-len", type=positive_int, metavar="N",
        help="a shared prefix of N tokens before the --random-input-len tokens (sets --prefix-share)",
    )  # fmt: skip
    for name, what in (
        ("prefix-len", "tokens of each shared prefix"),
        ("suffix-len", "tokens after it"),
        ("num-prefixes", "distinct prefixes (= --prefix-groups)"),
    ):
        default = PREFIX_REPETITION_DEFAULTS[name.replace("-", "_")]
        g.add_argument(
            f"--prefix-repetition-{name}", type=positive_int, metavar="N", help=f"{what} (default {default})"
        )


def apply_vllm_args(ns: argparse.Namespace, settings: Settings) -> None:
    """Translate :func:`add_vllm_args`' flags into the project's own, in ``ns`` (ValueError if they clash)."""
    name = ns.dataset_name
    if ns.random_prefix_len is not None:
        if name not in (None, "random") or ns.dataset is not None:
            raise ValueError("--random-prefix-len belongs to the random dataset: drop it or the dataset")
        if ns.prefix_share is not None:
            raise ValueError("--random-prefix-len sets the prefix share itself: drop --prefix-share")
        body = ns.input_tokens or settings.input_tokens
        ns.input_tokens = ns.random_prefix_len + body
        ns.prefix_share = ns.random_prefix_len / ns.input_tokens
    rep = {k: getattr(ns, f"prefix_repetition_{k}") for k in PREFIX_REPETITION_DEFAULTS}
    if name != "prefix_repetition":
        if any(v is not None for v in rep.values()):
            raise ValueError("--prefix-repetition-* flags belong to --dataset-name prefix_repetition")
        return
    for flag, value in (("--input-tokens", ns.input_tokens), ("--prefix-share", ns.prefix_share),
                        ("--prefix-groups", getattr(ns, "prefix_groups", None))):  # fmt: skip
        if value is not None:
            raise ValueError(f"--dataset-name prefix_repetition sets {flag} itself: drop {flag}")
    v = {k: PREFIX_REPETITION_DEFAULTS[k] if x is None else x for k, x in rep.items()}
    if v["num_prefixes"] > ns.requests:
        raise ValueError(
            f"--prefix-repetition-num-prefixes ({v['num_prefixes']}) must not exceed --num-prompts ({ns.requests})"
        )
    ns.input_tokens = v["prefix_len"] + v["suffix_len"]
    ns.prefix_share = v["prefix_len"] / ns.input_tokens
    ns.prefix_groups = v["num_prefixes"]

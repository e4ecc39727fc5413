"""The workload of a run: what each request asks for, reproducible from a seed.

Synthetic requests are a run-wide shared prefix (``prefix_share`` of the
prompt, built from :func:`services.prompts.prefix_seed_for_run`) plus a random
suffix from a per-request seed; the pipeline's inference worker and the
direct path build them with the same :class:`services.prompts.PromptBuilder`
from the same numbers, so both send prompts of exactly the requested length
on the engine's tokenizer.

With ``--path both`` every item is sent once per path. Each path gets its own
suffix seed, so the second send of an item never finds its whole prompt in the
prefix cache (which would flatter whichever path came second); the shared
prefix is the same on both paths, so both see the same cache hits from it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.config import BenchConfig
from services.contracts import MAX_OUTPUT_TOKENS, MAX_PROMPT_CHARS


@dataclass(frozen=True)
class DatasetPrompt:
    """One prompt of a dataset file (a JSONL line, a ShareGPT conversation, a generated prompt)."""

    prompt: str
    output_tokens: int | None = None
    #: The prompt's length on the engine's tokenizer, where it was measured (None: unknown).
    input_tokens: int | None = None


@dataclass(frozen=True)
class WorkItem:
    """One request of the workload (sent once per path)."""

    index: int
    output_tokens: int
    prefix_share: float
    #: Synthetic: the length to build; with a literal ``prompt``: its measured length, or None.
    input_tokens: int | None = None
    prompt: str | None = None  # a literal prompt from a dataset
    seeds: dict[str, int] = field(default_factory=dict)  # path → suffix seed
    #: The item's prefix group (``--prefix-groups``): its shared prefix is the group's own.
    prefix_group: int | None = None

    def seed_for(self, path: str) -> int:
        """The suffix seed of this item on ``path``."""
        return self.seeds[path]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def sample_lengths(n: int, mean: int, range_ratio: float, seed: int) -> list[int]:
    """``n`` lengths uniform in ``[⌊mean·(1−r)⌋, ⌈mean·(1+r)⌉]`` (vLLM's random dataset), at least 1."""
    if range_ratio <= 0:
        return [mean] * n
    lo = max(1, math.floor(mean * (1 - range_ratio)))
    hi = max(lo, math.ceil(mean * (1 + range_ratio)))
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def load_dataset(path: str | Path) -> list[DatasetPrompt]:
    """Read a JSONL file of ``{"prompt": str, "output_tokens": int (optional)}`` lines.

    Raises ValueError naming the line of the first problem.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"dataset {p}: no such file")
    out: list[DatasetPrompt] = []
    try:
        lines = p.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"dataset {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if not out and line.lstrip().startswith("["):
                hint = "; a JSON list of conversations is --dataset-name sharegpt"
            raise ValueError(
                f"dataset {p} line {lineno}: not a JSON object per line ({e.msg}){hint}"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ValueError(f"dataset {p} line {lineno}: needs a non-empty string 'prompt'")
        if len(obj["prompt"]) > MAX_PROMPT_CHARS:
            raise ValueError(f"dataset {p} line {lineno}: prompt over {MAX_PROMPT_CHARS} characters")
        out_tok = obj.get("output_tokens")
        if out_tok is not None and (
            not isinstance(out_tok, int) or isinstance(out_tok, bool) or not 1 <= out_tok <= MAX_OUTPUT_TOKENS
        ):
            raise ValueError(
                f"dataset {p} line {lineno}: 'output_tokens' must be an integer from 1 to {MAX_OUTPUT_TOKENS}"
            )
        out.append(DatasetPrompt(obj["prompt"], out_tok))
    if not out:
        raise ValueError(f"dataset {p}: the file is empty; expected one JSON object with a 'prompt' per line")
    return out


def assign_groups(n: int, groups: int, seed: int) -> list[int]:
    """Prefix groups of ``n`` requests: each group ``n / groups`` times (±1), in a seeded random order.

    As SGLang's generated-shared-prefix and vLLM's prefix_repetition datasets: every group
    equally often, shuffled, so a group's requests arrive spread over the run.
    """
    order = np.random.default_rng(seed).permutation(n)
    return [int(i) % groups for i in order]


def build_workload(
    cfg: BenchConfig,
    n: int,
    namespace: str,
    dataset: list[DatasetPrompt] | None = None,
) -> list[WorkItem]:
    """The ``n`` items of one phase (``namespace``: 'warmup', 'step0', …) of a resolved config.

    Lengths depend only on the seed and the index, so every sweep step asks
    for the same lengths; suffix seeds depend on the namespace too, so no two
    requests of a run share a whole prompt.
    """
    assert cfg.output_tokens is not None and cfg.prefix_share is not None, "resolve the config first"
    items: list[WorkItem] = []
    if dataset is not None:
        # Warm-up prompts come after the measured ones, so a measured prompt is never a cache replay
        # of a warm-up one (when the dataset has enough prompts for both).
        offset = cfg.requests if namespace == "warmup" else 0
        for i in range(n):
            d = dataset[(offset + i) % len(dataset)]
            items.append(
                WorkItem(
                    index=i,
                    output_tokens=d.output_tokens or cfg.output_tokens,
                    prefix_share=cfg.prefix_share,
                    input_tokens=d.input_tokens,
                    prompt=d.prompt,
                    seeds={p: derive_seed(cfg.seed, namespace, i, p) for p in ("pipeline", "direct")},
                )
            )
        return items
    assert cfg.input_tokens is not None
    ins = sample_lengths(n, cfg.input_tokens, cfg.range_ratio, derive_seed(cfg.seed, "input-lengths"))
    outs = sample_lengths(n, cfg.output_tokens, cfg.range_ratio, derive_seed(cfg.seed, "output-lengths"))
    groups: list[int | None] = (
        list(assign_groups(n, cfg.prefix_groups, derive_seed(cfg.seed, namespace, "groups")))
        if cfg.prefix_groups
        else [None] * n
    )
    for i in range(n):
        items.append(
            WorkItem(
                index=i,
                input_tokens=ins[i],
                output_tokens=outs[i],
                prefix_share=cfg.prefix_share,
                seeds={p: derive_seed(cfg.seed, namespace, i, p) for p in ("pipeline", "direct")},
                prefix_group=groups[i],
            )
        )
    return items


def interleave(items: list[WorkItem], paths: list[str], seed: int) -> list[tuple[WorkItem, str]]:
    """The send order: each item once per path; with two paths, the pair's order is a coin flip.

    Randomising which path goes first in each pair (seeded) keeps any
    first-mover effect (cache warmth, engine batch state) from favouring one path.
    """
    if len(paths) == 1:
        return [(it, paths[0]) for it in items]
    rng = np.random.default_rng(seed)
    flips = rng.integers(0, 2, size=len(items))
    out: list[tuple[WorkItem, str]] = []
    for it, flip in zip(items, flips, strict=True):
        pair = paths if flip == 0 else list(reversed(paths))
        out.extend((it, p) for p in pair)
    return out

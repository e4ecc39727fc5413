"""Exact-token prompt builder: a fixed per-run prefix plus a random suffix.

The prompt is built on the engine's own tokenizer (its ``/tokenize``) and sent
to the engine as token ids, so ``usage.prompt_tokens`` equals the requested
length by construction, whatever the tokenizer's merge rules do at the joint
between prefix and suffix. The prefix ids of a run are identical across its
jobs, so the engine's prefix cache really hits.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass

from services.engine_client import EngineClient

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def prefix_seed_for_run(run_id: str | None, prefix_group: int | None = None) -> int:
    """A stable seed for the run's shared prefix (jobs without a run share one).

    Jobs of one run in different ``prefix_group``s get different prefixes (group None is the
    run's own prefix, as before groups existed).
    """
    group = "" if prefix_group is None else f"#{prefix_group}"
    digest = hashlib.sha256(f"llmconsole-prefix:{run_id or ''}{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_tokens(input_tokens: int, prefix_share: float) -> int:
    """Number of prefix tokens for a prompt of ``input_tokens`` (the rest is suffix)."""
    return max(0, min(input_tokens, round(input_tokens * prefix_share)))


def random_words(seed: int, n: int) -> str:
    """``n`` pseudo-random lowercase words (deterministic for a seed), space separated."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 8))) for _ in range(max(n, 0)))


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt as token ids of exactly ``token_count`` tokens."""

    token_ids: list[int]
    prefix_tokens: int

    @property
    def token_count(self) -> int:
        """Length of the prompt in the engine's tokens (special tokens included)."""
        return len(self.token_ids)


class PromptBuilder:
    """Builds exact-length prompts on one engine, caching the run prefixes' ids."""

    def __init__(self, engine: EngineClient, cache_size: int = 64) -> None:
        self.engine = engine
        self._special: list[int] | None = None
        self._cache: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        self._cache_size = cache_size

    async def special_prefix(self) -> list[int]:
        """Ids the tokenizer adds in front of every prompt (e.g. ``<bos>``)."""
        if self._special is None:
            with_special = await self.engine.tokenize("hello", add_special_tokens=True)
            without = await self.engine.tokenize("hello", add_special_tokens=False)
            n = len(with_special) - len(without)
            # Only leading specials count: trailing ones (rare) are not prompt text.
            self._special = with_special[:n] if n > 0 and with_special[n:] == without else []
        return self._special

    async def _ids(self, seed: int, n: int) -> list[int]:
        """At least ``n`` token ids of random words from ``seed``, cut to ``n``."""
        if n <= 0:
            return []
        words = n
        for _ in range(8):
            ids = await self.engine.tokenize(" " + random_words(seed, words), add_special_tokens=False)
            if len(ids) >= n:
                return ids[:n]
            words = words * 2 + 8
        raise ValueError(f"could not produce {n} tokens from random words")

    async def _prefix_ids(self, seed: int, n: int) -> list[int]:
        key = (seed, n)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        ids = await self._ids(seed, n)
        self._cache[key] = ids
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ids

    async def build(
        self, input_tokens: int, prefix_tokens: int, prefix_seed: int, suffix_seed: int
    ) -> BuiltPrompt:
        """A prompt of exactly ``input_tokens`` tokens whose first ``prefix_tokens`` are the run's prefix.

        The tokenizer's special leading tokens count towards the length and
        the prefix, as they do in vLLM's ``usage.prompt_tokens``.
        """
        special = await self.special_prefix()
        if input_tokens < 1:
            raise ValueError("input_tokens must be at least 1")
        if input_tokens <= len(special):
            # As short as the tokenizer's own leading tokens (``<bos>`` alone): all of it is shared.
            return BuiltPrompt(special[:input_tokens], input_tokens)
        prefix_tokens = max(len(special), min(prefix_tokens, input_tokens))
        body_prefix = prefix_tokens - len(special)
        suffix = input_tokens - prefix_tokens
        ids = (
            special + await self._prefix_ids(prefix_seed, body_prefix) + await self._ids(suffix_seed, suffix)
        )
        return BuiltPrompt(ids, prefix_tokens)


async def build_prompt(
    engine: EngineClient, input_tokens: int, prefix_tokens: int, prefix_seed: int, suffix_seed: int
) -> BuiltPrompt:
    """One-off exact-length prompt (use :class:`PromptBuilder` to cache prefixes)."""
    return await PromptBuilder(engine).build(input_tokens, prefix_tokens, prefix_seed, suffix_seed)

"""Exact-token prompt builder: a fixed per-run prefix plus a random suffix.

The prompt is sent to the engine as token ids, so ``usage.prompt_tokens``
equals the requested length by construction, whatever the tokenizer's merge
rules would do at the joint between prefix and suffix. The ids are drawn from
a pool of plain word tokens learned once per engine with one ``/tokenize``
call (random lowercase words, no special tokens): after that, building a
prompt costs no HTTP call, only a seeded random draw (tens of microseconds for
a thousand tokens). The prefix ids of a run are identical across its jobs, so
the engine's prefix cache really hits; suffixes of different seeds differ.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass

from services.engine_client import EngineClient

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: Words tokenized once to learn the pool, and the seed that draws them (fixed: every client of
#: the same engine learns the same pool, so the bench's direct path builds the pipeline's prompts).
_POOL_WORDS = 2000
_POOL_SEED = 0x11C0


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
        self._pool: list[int] | None = None
        self._learning: asyncio.Lock | None = None
        self._cache: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        self._cache_size = cache_size

    async def _learn(self) -> None:
        """Learn the special leading ids and the word-token pool (once, two /tokenize calls)."""
        if self._learning is None:
            self._learning = asyncio.Lock()
        async with self._learning:  # concurrent first jobs learn once
            if self._pool is not None:
                return
            with_special = await self.engine.tokenize("hello", add_special_tokens=True)
            without = await self.engine.tokenize("hello", add_special_tokens=False)
            n = len(with_special) - len(without)
            # Only leading specials count: trailing ones (rare) are not prompt text.
            special = with_special[:n] if n > 0 and with_special[n:] == without else []
            ids = await self.engine.tokenize(
                " " + random_words(_POOL_SEED, _POOL_WORDS), add_special_tokens=False
            )
            pool = sorted(set(ids) - set(special))
            if not pool:
                raise ValueError("the engine's tokenizer gave no token ids for plain words")
            self._special, self._pool = special, pool

    async def special_prefix(self) -> list[int]:
        """Ids the tokenizer adds in front of every prompt (e.g. ``<bos>``)."""
        if self._special is None:
            await self._learn()
        assert self._special is not None
        return self._special

    async def pool(self) -> list[int]:
        """The plain word-token ids prompts are drawn from (learned once)."""
        if self._pool is None:
            await self._learn()
        assert self._pool is not None
        return self._pool

    def _draw(self, seed: int, n: int) -> list[int]:
        """``n`` ids drawn from the pool with ``seed`` (deterministic)."""
        assert self._pool is not None
        return random.Random(seed).choices(self._pool, k=n) if n > 0 else []

    def _prefix_ids(self, seed: int, n: int) -> list[int]:
        key = (seed, n)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        ids = self._draw(seed, n)
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
        if input_tokens < 1:
            raise ValueError("input_tokens must be at least 1")
        if self._pool is None:
            await self._learn()
        special = self._special or []
        if input_tokens <= len(special):
            # As short as the tokenizer's own leading tokens (``<bos>`` alone): all of it is shared.
            return BuiltPrompt(special[:input_tokens], input_tokens)
        prefix_tokens = max(len(special), min(prefix_tokens, input_tokens))
        body_prefix = prefix_tokens - len(special)
        suffix = input_tokens - prefix_tokens
        ids = special + self._prefix_ids(prefix_seed, body_prefix) + self._draw(suffix_seed, suffix)
        return BuiltPrompt(ids, prefix_tokens)


async def build_prompt(
    engine: EngineClient, input_tokens: int, prefix_tokens: int, prefix_seed: int, suffix_seed: int
) -> BuiltPrompt:
    """One-off exact-length prompt (use :class:`PromptBuilder` to cache prefixes)."""
    return await PromptBuilder(engine).build(input_tokens, prefix_tokens, prefix_seed, suffix_seed)

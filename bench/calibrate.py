"""``llmconsole bench calibrate``: fit the simulator's timing model to a real engine.

Three measurements against the engine at ``Settings.engine_url``, on the direct
path with exact-length prompts:

1. **Prefill**: one request at a time, prompts of several lengths, each sent
   twice (the second finds its blocks in the prefix cache). The engine's
   ``/metrics`` prefix-cache hit counter is read around every request, so the
   uncached token count is known even where ``usage`` carries no
   ``cached_tokens``. Least squares on ``TTFT = ttft_base_ms +
   prefill_ms_per_token × uncached_tokens``.
2. **Block size**: the largest power of two that explains every cached count
   (vLLM caches whole blocks, at most ``prompt − 1`` tokens); vLLM's
   ``vllm:cache_config_info`` labels win when the engine exports them (they
   also give the number of KV blocks).
3. **Decode**: ``c`` requests at once for each concurrency ``c``; least squares
   on ``ITL = itl_ms + itl_batch_ms × c`` over the per-request median ITLs;
   the jitter is the spread of ITLs around that line (outer 2 % trimmed).

The fit is written as a profile of :class:`services.sim_engine.SimConfig`'s keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.workload import derive_seed
from services.contracts import VllmMetric
from services.engine_client import EngineClient, EngineError, Sample, metric_sum, parse_prometheus
from services.prompts import PromptBuilder
from services.settings import Settings, load_settings
from services.sim_engine import ProfileError, SimConfig, save_profile

CACHE_INFO = "vllm:cache_config_info"


@dataclass
class Plan:
    """What to measure."""

    lengths: list[int] = field(default_factory=lambda: [32, 128, 256, 512, 1024])
    repeats: int = 2
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    decode_tokens: int = 32
    decode_input_tokens: int = 64
    #: Seed of the prompts; None = fresh ones, so an engine's cache from an earlier calibration cannot hit.
    seed: int | None = None


@dataclass
class PrefillSample:
    """One sequential request of the prefill phase."""

    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float


@dataclass
class DecodeSample:
    """One request of the decode phase."""

    concurrency: int
    itl_ms: list[float]


@dataclass
class Fit:
    """The fitted model and how well it fits."""

    config: SimConfig
    ttft_r2: float | None
    itl_r2: float | None
    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    notes: list[str]


def linear_fit(x: list[float], y: list[float]) -> tuple[float, float, float | None]:
    """Least squares ``y = a + b·x``: (a, b, R²); with one distinct x, b = 0."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if xs.size == 0:
        raise ValueError("no data to fit")
    if np.ptp(xs) == 0:
        return float(ys.mean()), 0.0, None
    design = np.column_stack([np.ones_like(xs), xs])
    (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
    pred = a + b * xs
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1 - float(((ys - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else None
    return float(a), float(b), r2


def infer_block_size(pairs: list[tuple[int, int]], max_bs: int = 1024) -> int | None:
    """The largest power of two ``bs`` with ``cached == ⌊(prompt − 1) / bs⌋ · bs`` for every pair with a hit."""
    hits = [(p, c) for p, c in pairs if c > 0]
    if not hits:
        return None
    bs = max_bs
    while bs >= 1:
        if all(c == ((p - 1) // bs) * bs for p, c in hits):
            return bs
        bs //= 2
    return None


def cache_config_info(samples: list[Sample]) -> dict[str, str]:
    """Labels of vLLM's ``vllm:cache_config_info`` gauge (empty if absent)."""
    for s in samples:
        if s.name == CACHE_INFO:
            return dict(s.labels)
    return {}


def fit_model(
    prefill: list[PrefillSample],
    decode: list[DecodeSample],
    *,
    block_size: int | None,
    kv_blocks: int | None,
    base: SimConfig,
) -> tuple[SimConfig, float | None, float | None, list[str]]:
    """Fit TTFT and ITL lines; everything unmeasured keeps ``base``'s values."""
    notes: list[str] = []
    a, b, r2_ttft = linear_fit(
        [p.prompt_tokens - p.cached_tokens for p in prefill], [p.ttft_ms for p in prefill]
    )
    cs = [float(d.concurrency) for d in decode if d.itl_ms]
    meds = [float(np.median(d.itl_ms)) for d in decode if d.itl_ms]
    i0, i1, r2_itl = linear_fit(cs, meds)
    resid = np.asarray([x - (i0 + i1 * d.concurrency) for d in decode for x in d.itl_ms], float)
    if resid.size >= 10:
        lo, hi = np.percentile(resid, [1, 99])
        resid = resid[(resid >= lo) & (resid <= hi)]
    jitter = float(resid.std()) if resid.size else base.itl_jitter_ms
    if a < 0 or b < 0 or i0 < 0 or i1 < 0:
        notes.append("a fitted coefficient came out negative and was clamped to 0 (noisy or too few samples)")
    cfg = base.model_copy(
        update={
            "ttft_base_ms": round(max(a, 0.0), 3),
            "prefill_ms_per_token": round(max(b, 0.0), 5),
            "itl_ms": round(max(i0, 0.0), 3),
            "itl_batch_ms": round(max(i1, 0.0), 4),
            "itl_jitter_ms": round(jitter, 3),
        }
    )
    if block_size is not None:
        cfg = cfg.model_copy(update={"block_size": block_size})
    else:
        notes.append(f"no prefix cache hits seen: block_size kept at {base.block_size}")
    if kv_blocks is not None:
        cfg = cfg.model_copy(update={"kv_blocks": kv_blocks})
    return SimConfig.model_validate(cfg.model_dump()), r2_ttft, r2_itl, notes


async def _scrape(engine: EngineClient) -> list[Sample]:
    try:
        return parse_prometheus(await engine.metrics_text())
    except EngineError:
        return []


async def measure(
    engine: EngineClient, plan: Plan, progress: Callable[[str], None] | None = None
) -> tuple[list[PrefillSample], list[DecodeSample], list[Sample]]:
    """Run the calibration requests; return the samples and the last ``/metrics`` scrape."""
    say = progress or (lambda _m: None)
    salt = plan.seed if plan.seed is not None else secrets.randbits(63)
    builder = PromptBuilder(engine)
    prefill: list[PrefillSample] = []
    for n, length in enumerate(plan.lengths):
        for rep in range(plan.repeats):
            seed = derive_seed(salt, "calibrate", length, rep)
            prompt = (await builder.build(length, 0, 0, seed)).token_ids
            for attempt in ("cold", "cached"):
                before = await _scrape(engine)
                res = await engine.stream_completion(prompt, 2, exact=True)
                after = await _scrape(engine)
                hits_b, hits_a = (
                    metric_sum(before, VllmMetric.PREFIX_HITS),
                    metric_sum(after, VllmMetric.PREFIX_HITS),
                )
                if hits_b is not None and hits_a is not None:
                    cached = int(hits_a - hits_b)
                else:
                    cached = res.cached_tokens or 0
                prefill.append(PrefillSample(res.prompt_tokens or length, cached, res.ttft_s * 1000))
                say(
                    f"prefill {n + 1}/{len(plan.lengths)}: {length} tokens ({attempt}) TTFT {res.ttft_s * 1000:.1f} ms"
                )
    decode: list[DecodeSample] = []
    for c in plan.concurrency:
        prompts = [
            (await builder.build(plan.decode_input_tokens, 0, 0, derive_seed(salt, "decode", c, i))).token_ids
            for i in range(c)
        ]
        results = await asyncio.gather(
            *(engine.stream_completion(p, plan.decode_tokens, exact=True) for p in prompts)
        )
        for r in results:
            decode.append(DecodeSample(c, [x * 1000 for x in r.itl_s]))
        med = float(np.median([x for r in results for x in r.itl_s] or [0])) * 1000
        say(f"decode: concurrency {c}, median ITL {med:.1f} ms")
    return prefill, decode, await _scrape(engine)


async def calibrate(settings: Settings, plan: Plan, progress: Callable[[str], None] | None = None) -> Fit:
    """Measure the engine at ``settings.engine_url`` and fit a simulator profile."""
    engine = EngineClient(settings.engine_url, settings.engine_api_key.get_secret_value())
    try:
        model = await engine.model()
        version = await engine.version()
        models = await engine.models()
        mml = models[0].get("max_model_len") if models else None
        longest = max([*plan.lengths, plan.decode_input_tokens])
        if isinstance(mml, int) and longest + plan.decode_tokens > mml:
            raise ValueError(
                f"the engine's context is {mml} tokens: use --lengths below {mml - plan.decode_tokens}"
            )
        prefill, decode, samples = await measure(engine, plan, progress)
    finally:
        await engine.aclose()
    info = cache_config_info(samples)
    block_size = int(info["block_size"]) if info.get("block_size", "").isdigit() else None
    kv_blocks = int(info["num_gpu_blocks"]) if info.get("num_gpu_blocks", "").isdigit() else None
    if block_size is None:
        block_size = infer_block_size([(p.prompt_tokens, p.cached_tokens) for p in prefill])
    base = SimConfig.from_settings(settings, profile="")
    base = base.model_copy(update={"max_num_seqs": settings.max_num_seqs})
    cfg, r2_ttft, r2_itl, notes = fit_model(
        prefill, decode, block_size=block_size, kv_blocks=kv_blocks, base=base
    )
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    cfg = cfg.model_copy(
        update={
            "description": f"calibrated against {version or 'an engine'} serving {model}",
            "source": (
                f"llmconsole bench calibrate, {when}, {settings.engine_url}: {len(prefill)} sequential requests "
                f"of {plan.lengths} tokens (each twice, for the prefix cache), decode at concurrency "
                f"{plan.concurrency} × {plan.decode_tokens} tokens; R² TTFT {_r2(r2_ttft)}, ITL {_r2(r2_itl)}"
                + (
                    "; kv_blocks from vllm:cache_config_info"
                    if kv_blocks
                    else "; kv_blocks and max_num_seqs from settings"
                )
                + f"; max_num_batched_tokens {cfg.max_num_batched_tokens} from settings (the API does not report it)"
            ),
        }
    )
    return Fit(cfg, r2_ttft, r2_itl, prefill, decode, notes)


def _r2(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_profile(cfg: SimConfig, out: str, settings: Settings) -> Path:
    """Write the profile: a NAME goes to the simulator's user profile folder, a path ending .json there."""
    if out.endswith(".json"):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg.model_dump(), indent=2) + "\n", encoding="utf-8")
        return path
    return save_profile(out, cfg, Path(settings.var_dir) / "sim_profiles")


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: whole numbers separated by commas") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: positive whole numbers separated by commas")
    return vals


def calibrate_main(
    argv: list[str], out: Console, err: Console, parser_cls: type[argparse.ArgumentParser]
) -> int:
    """The ``llmconsole bench calibrate`` command."""
    plan = Plan()
    p = parser_cls(
        prog="llmconsole bench calibrate",
        description="Fit the simulator's timing model to the engine at ENGINE_HOST:ENGINE_PORT and save it "
        "as a profile (use it with SIM_PROFILE=NAME or python -m services.sim_engine --profile NAME).",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="NAME|FILE.json",
        help="profile name (saved under VAR_DIR/sim_profiles) or a .json path",
    )
    p.add_argument("--lengths", type=_ints, default=plan.lengths, help="prompt lengths for the prefill fit")
    p.add_argument("--repeats", type=int, default=plan.repeats, help="prompts per length (default 2)")
    p.add_argument(
        "--concurrency", type=_ints, default=plan.concurrency, help="batch sizes for the decode fit"
    )
    p.add_argument(
        "--decode-tokens", type=int, default=plan.decode_tokens, help="output tokens per decode request"
    )
    p.add_argument("--decode-input-tokens", type=int, default=plan.decode_input_tokens)
    p.add_argument("--seed", type=int, default=None, help="prompt seed (default: fresh prompts every time)")
    ns = p.parse_args(argv)
    if ns.repeats < 1 or ns.decode_tokens < 3 or ns.decode_input_tokens < 2:
        p.error("--repeats ≥ 1, --decode-tokens ≥ 3 and --decode-input-tokens ≥ 2 are needed")
    if not ns.out.endswith(".json"):
        # Checked before measuring (minutes on a CPU engine), with the simulator's own rule.
        from services.sim_engine import valid_profile_name

        if not valid_profile_name(ns.out):
            p.error(
                f"--out {ns.out!r}: a profile name is letters, digits, '.', '_', '-' (or give a .json path)"
            )
    plan = Plan(ns.lengths, ns.repeats, ns.concurrency, ns.decode_tokens, ns.decode_input_tokens, ns.seed)
    settings = load_settings()
    try:
        fit = asyncio.run(calibrate(settings, plan, lambda m: err.print(m, highlight=False)))
    except EngineError as e:
        err.print(f"[red]error:[/] {e}")
        return 1
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    try:
        path = write_profile(fit.config, ns.out, settings)
    except (ProfileError, OSError) as e:
        err.print(f"[red]error:[/] cannot write the profile: {e}")
        return 1
    t = Table(title=f"simulator profile {path}")
    t.add_column("key")
    t.add_column("value", justify="right")
    for k, v in fit.config.model_dump().items():
        if k not in ("description", "source"):
            t.add_row(k, str(v))
    t.add_row("R² TTFT fit", _r2(fit.ttft_r2))
    t.add_row("R² ITL fit", _r2(fit.itl_r2))
    out.print(t)
    for n in fit.notes:
        out.print(f"note: {n}")
    return 0

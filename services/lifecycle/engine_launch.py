"""Start the engine that settings choose: the simulator, vLLM's CPU build, or vLLM on GPUs.

supervisord's ``engine`` program runs ``python -m services.lifecycle.engine_launch``: it builds the command
line from :class:`~services.settings.Settings` and replaces itself with it (``os.execvpe``), so
supervisord's stop signal reaches the engine itself; vLLM's own child processes are reached
through ``stopasgroup``/``killasgroup``.

``python -m services.lifecycle.engine_launch --explain LOGFILE`` prints one plain sentence for a known
failure in an engine log (out of memory, no driver, port taken, model not found ...) and exits 0,
or prints nothing and exits 1. ``--print`` shows the command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from services.routing import kv_events
from services.settings import REPO_ROOT, Settings, get_settings

#: The GPU engine's model when settings name none (the seed's).
DEFAULT_GPU_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
#: The CPU engine's served model name when settings name none.
DEFAULT_CPU_MODEL_NAME = "gemma-3-270m"
#: Folder under ``var_dir`` where install puts the CPU model (``<var_dir>/models/gemma-3-270m``).
CPU_MODEL_SUBDIR = ("models", "gemma-3-270m")

# Offline for the CPU engine: its model is a local folder, nothing may be fetched from a hub.
_CPU_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def default_cpu_model_dir(settings: Settings) -> Path:
    """Where install.sh converts the CPU engine's model to (used when ``model_path`` is empty)."""
    return Path(settings.var_dir).joinpath(*CPU_MODEL_SUBDIR)


def served_model_name(settings: Settings) -> str:
    """The name clients use in requests: ``settings.model`` or the kind's default."""
    if settings.model:
        return settings.model
    if settings.engine_kind == "gpu":
        return DEFAULT_GPU_MODEL
    return DEFAULT_CPU_MODEL_NAME


def model_source(settings: Settings) -> str:
    """What vLLM loads (``--model``): a local folder, or for GPUs a hub name too."""
    if settings.model_path:
        return settings.model_path
    if settings.engine_kind == "gpu":
        return settings.model or DEFAULT_GPU_MODEL
    return str(default_cpu_model_dir(settings))


def hub_model(settings: Settings) -> str | None:
    """The hub name the GPU engine downloads (``org/name``), or None when it loads a local folder."""
    if settings.engine_kind != "gpu":
        return None
    source = model_source(settings)
    return None if settings.model_path or Path(source).is_dir() else source


def hub_cache_dir(settings: Settings) -> Path:
    """The Hugging Face hub cache the GPU engine downloads into (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    if settings.hf_hub_cache:
        return Path(settings.hf_hub_cache).expanduser()
    home = Path(settings.hf_home).expanduser() if settings.hf_home else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def engine_python(settings: Settings) -> Path:
    """The engine venv's interpreter."""
    return Path(settings.engine_venv) / "bin" / "python"


def cpu_bind_list(spec: str, allowed: set[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND``: ``spec`` as given, or for ``auto`` every core this process may use.

    vLLM's own ``auto`` keeps one core free for its frontend; on a 2-core machine that halves
    the compute, so ``auto`` here means all cores (e.g. ``0-1``).
    """
    if spec and spec != "auto":
        return spec
    cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    ranges: list[str] = []
    start = prev = cpus[0]
    for c in [*cpus[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        ranges.append(f"{start}-{prev}" if prev > start else str(start))
        if c is not None:
            start = prev = c
    return ",".join(ranges)


def tensor_parallel_size(settings: Settings, gpu_count: int) -> int:
    """Tensor parallel size: the setting, else the largest power of two not above the GPU count.

    Attention head counts are divisible by powers of two (the 32B default has 40 heads, so 3 or
    6 GPUs would fail at start); a setting overrides this for models where other sizes work.
    """
    if settings.tensor_parallel_size:
        return settings.tensor_parallel_size
    if gpu_count < 1:
        raise ValueError("no NVIDIA GPU found: the gpu engine needs one (or choose --engine cpu)")
    return 1 << (gpu_count.bit_length() - 1)


def engine_env(settings: Settings) -> dict[str, str]:
    """The environment of everything that runs in the engine venv (vLLM, and install's download)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    venv = Path(settings.engine_venv)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VLLM_NO_USAGE_STATS"] = "1"
    key = settings.engine_api_key.get_secret_value()
    if key:
        env["VLLM_API_KEY"] = key
    else:
        env.pop("VLLM_API_KEY", None)
    # The hub's own variables: the same cache and token for install's download and the engine.
    if settings.hf_home:
        env["HF_HOME"] = str(Path(settings.hf_home).expanduser())
    if settings.hf_hub_cache:
        env["HF_HUB_CACHE"] = str(Path(settings.hf_hub_cache).expanduser())
    if settings.hf_token.get_secret_value():
        env["HF_TOKEN"] = settings.hf_token.get_secret_value()
    return env


def build_engine_command(settings: Settings, gpu_count: int = 0) -> tuple[list[str], dict[str, str]]:
    """The engine's argv and full environment for ``settings.engine_kind``.

    ``gpu_count`` matters only for ``gpu`` (tensor parallel size). The engine API key travels in
    the environment (``VLLM_API_KEY``, which vLLM reads like ``--api-key``) so that it never
    shows in a process listing.
    """
    host, port = settings.engine_host, str(settings.engine_port)
    kind = settings.engine_kind
    if kind == "sim":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return [sys.executable, "-m", "services.sim_engine", "--host", host, "--port", port], env
    env = engine_env(settings)
    argv = [
        str(engine_python(settings)),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_source(settings),
        "--served-model-name",
        served_model_name(settings),
        "--host",
        host,
        "--port",
        port,
        "--max-model-len",
        str(settings.max_model_len),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--enable-prefix-caching",
        # usage.prompt_tokens_details.cached_tokens: the per-request view of prefix-cache hits.
        "--enable-prompt-tokens-details",
        # The console polls /metrics: an access-log line per poll would drown the log.
        "--disable-uvicorn-access-log",
    ]
    if settings.kv_events_port:
        # KV cache events for the inference worker's mirror (kv_events routing), on loopback.
        argv += ["--kv-events-config", kv_events.vllm_config(settings.kv_events_port)]
    if kind == "cpu":
        # fp32: bf16 on AVX2 (no AVX512-BF16) falls back to slow kernels, ~10x slower prefill.
        # Eager: torch.compile costs 2-3 minutes at every start for 10-30 % faster decode.
        argv += ["--dtype", "float32", "--enforce-eager"]
        env.update(_CPU_ENV)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind_list(settings.cpu_threads_bind)
        return argv, env
    if kind == "gpu":
        if settings.model_revision and hub_model(settings):
            argv += ["--revision", settings.model_revision]
        argv += [
            "--tensor-parallel-size",
            str(tensor_parallel_size(settings, gpu_count)),
            "--gpu-memory-utilization",
            str(settings.gpu_memory_utilization),
        ]
        return argv, env
    raise ValueError(f"unknown engine kind {kind!r} (sim, cpu or gpu)")


# ---------------------------------------------------------------------------
# Explaining failures
# ---------------------------------------------------------------------------

#: (pattern, sentence) for failures seen in engine logs; the one found last in the log wins.
_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), msg)
    for p, msg in (
        (
            r"Failed to load model - not enough GPU memory",
            "the model's weights do not fit in the GPU memory: use more GPUs (TENSOR_PARALLEL_SIZE), pick a "
            "smaller or quantized MODEL, or stop other processes that use the GPU",
        ),
        (
            r"CUDA out of memory|torch\.(cuda\.)?OutOfMemoryError",
            "the GPU ran out of memory: lower MAX_NUM_SEQS or MAX_MODEL_LEN, use more GPUs "
            "(TENSOR_PARALLEL_SIZE), or pick a smaller MODEL",
        ),
        (
            r"No available memory for the cache blocks",
            "the GPU ran out of memory: the model's weights leave no room for the KV cache; raise "
            "GPU_MEMORY_UTILIZATION (up to about 0.95), use more GPUs (TENSOR_PARALLEL_SIZE), or pick a smaller MODEL",
        ),
        (
            r"KV cache is needed, which is larger than the available KV cache memory",
            "not enough memory for the KV cache of one MAX_MODEL_LEN request: lower MAX_MODEL_LEN, or give the "
            "engine more memory (GPU_MEMORY_UTILIZATION, more GPUs; CPU_KVCACHE_GIB on the CPU engine)",
        ),
        (
            r"Free memory on device .* is less than (desired GPU memory utilization|the engine's budget)"
            r"|Externally held weights on device .* exceed the desired GPU memory utilization",
            "other processes already use the GPU's memory: stop them, or lower GPU_MEMORY_UTILIZATION",
        ),
        (
            r"Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE",
            "not enough free RAM for the CPU engine's KV cache: lower CPU_KVCACHE_GIB, or stop other programs",
        ),
        (
            r"Found no NVIDIA driver|libcuda\.so[.0-9]*: cannot open|No CUDA GPUs are available"
            r"|NVIDIA driver on your system is too old|CUDA driver version is insufficient"
            r"|Failed to infer device type|NVML Shared Library Not Found|libnvidia-ml\.so"
            r"|no NVIDIA GPU found: the gpu engine needs one",
            "no usable NVIDIA GPU driver: check `nvidia-smi`, install or update the NVIDIA driver, "
            "or reinstall with --engine cpu",
        ),
        (
            r"Address already in use|\[Errno 98\]",
            "the engine's port is already taken by another process: stop it, or set ENGINE_PORT to a free port",
        ),
        (
            r"Repository Not Found|is not a valid model identifier|not a local folder and is not a valid model"
            r"|does not appear to have a file named config\.json|LocalEntryNotFoundError"
            r"|Can't load the configuration of|No such file or directory: .*config\.json"
            r"|Invalid repository ID or local directory|CPU model folder .* is missing",
            "the model was not found: check MODEL / MODEL_PATH (a local folder with config.json, or a "
            "Hugging Face model name); for the CPU engine run ./install.sh --engine cpu to prepare it",
        ),
        (
            r"gated repo|401 Client Error|403 Client Error|Access to model .* is restricted",
            "the model hub refused the download (gated or private model): log in with a Hugging Face token "
            "that has access (HF_TOKEN), or choose another MODEL",
        ),
        (
            r"We couldn't connect to|Max retries exceeded with url|Temporary failure in name resolution",
            "the model could not be downloaded (no connection to the model hub): check the network, "
            "or point MODEL_PATH to a local copy",
        ),
        (
            r"No space left on device",
            "the disk is full (model download or cache): free some space, or move HF_HOME to a larger disk",
        ),
        (
            r"Cannot allocate memory|MemoryError|std::bad_alloc|not enough (free )?memory for KV cache",
            "the machine ran out of RAM: lower CPU_KVCACHE_GIB or MAX_MODEL_LEN, or stop other programs",
        ),
        (
            r"No module named '?vllm'?|engine venv .* (is missing|has no python)",
            "the engine's virtual environment is missing or broken: run ./install.sh again "
            "(with --engine cpu or --engine gpu)",
        ),
        (
            r"No module named '?services\.sim_engine'?",
            "the simulator module is missing from this checkout (services/sim_engine.py)",
        ),
    )
)


#: A specific failure whose generic echo follows it: vLLM logs "Failed to load model - not enough
#: GPU memory" and then re-raises torch's OutOfMemoryError, whose traceback comes last.
def _failure_index(fragment: str) -> int:
    return next(i for i, (pattern, _) in enumerate(_FAILURES) if fragment in pattern.pattern)


_REFINES = {_failure_index("Failed to load model"): _failure_index("CUDA out of memory")}
#: How far before the generic line the specific one may be (one traceback's worth of text).
_REFINE_WINDOW = 20_000


def explain_engine_failure(log_text: str) -> str | None:
    """A plain sentence for the last known failure in an engine log, or None if none is recognised."""
    last: dict[int, int] = {}  # pattern index -> start of its last match
    for i, (pattern, _) in enumerate(_FAILURES):
        for m in pattern.finditer(log_text):
            last[i] = m.start()
    if not last:
        return None
    best = max(last, key=lambda i: last[i])
    for specific, generic in _REFINES.items():
        if best == generic and specific in last and 0 <= last[generic] - last[specific] <= _REFINE_WINDOW:
            best = specific
    return _FAILURES[best][1]


def _explain_file(path: Path) -> int:
    try:
        with path.open("rb") as f:
            # The end of the log holds the latest start; 1 MB is plenty and keeps this fast.
            f.seek(max(0, path.stat().st_size - 1_048_576))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return 2
    why = explain_engine_failure(text)
    if why is None:
        return 1
    print(why)
    return 0


def detect_gpu_count() -> int:
    """How many GPUs NVML sees (0 without a driver)."""
    from services.telemetry import make_backend

    backend = make_backend()
    return len(backend.sample()) if backend.available() else 0


def _preflight(settings: Settings) -> str | None:
    """A plain sentence when the chosen engine cannot start at all (checked before exec)."""
    if settings.engine_kind == "sim":
        return None
    py = engine_python(settings)
    if not py.is_file():
        return (
            f"engine venv {settings.engine_venv} is missing (no {py}): "
            f"run ./install.sh --engine {settings.engine_kind}"
        )
    if settings.engine_kind == "cpu":
        folder = Path(model_source(settings))
        if not (folder / "config.json").is_file():
            return (
                f"the CPU model folder {folder} is missing or incomplete (no config.json): "
                "run ./install.sh --engine cpu to prepare it"
            )
    return None


#: Environment variables that carry secrets: never printed.
_SECRET_ENV = frozenset({"VLLM_API_KEY", "HF_TOKEN"})


def fetch_command(settings: Settings, interval_s: float = 10.0) -> tuple[list[str], dict[str, str]] | None:
    """The command that downloads the GPU engine's hub model with progress (None: nothing to fetch).

    It runs ``services.lifecycle.model_fetch`` with the engine venv's python and the engine's own
    environment, so the download lands in the same hub cache, with the same token, that vLLM uses.
    """
    repo = hub_model(settings)
    if repo is None:
        return None
    env = engine_env(settings)
    argv = [
        str(engine_python(settings)),
        "-m",
        "services.lifecycle.model_fetch",
        "--model",
        repo,
        "--interval",
        str(interval_s),
    ]
    if settings.model_revision:
        argv += ["--revision", settings.model_revision]
    return argv, env


def _fetch(settings: Settings, interval_s: float) -> int:
    cmd = fetch_command(settings, interval_s)
    if cmd is None:
        print(f"engine_launch: the {settings.engine_kind} engine loads a local model: nothing to download")
        return 0
    argv, env = cmd
    if not engine_python(settings).is_file():
        print(
            f"engine_launch: engine venv {settings.engine_venv} is missing: run ./install.sh --engine gpu",
            file=sys.stderr,
        )
        return 2
    # model_fetch is part of this checkout, not of the engine venv: run it from the repo root.
    return subprocess.run(argv, env=env, cwd=REPO_ROOT, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """Exec the configured engine (or ``--print`` its command, ``--fetch`` its model, ``--explain LOG``)."""
    ap = argparse.ArgumentParser(
        prog="python -m services.lifecycle.engine_launch", description=__doc__.splitlines()[0]
    )
    ap.add_argument(
        "--explain", type=Path, metavar="LOGFILE", help="explain a failure found in an engine log"
    )
    ap.add_argument(
        "--print", action="store_true", dest="print_only", help="print the command, do not run it"
    )
    ap.add_argument(
        "--fetch", action="store_true", help="download the GPU engine's hub model with progress, then exit"
    )
    ap.add_argument(
        "--interval", type=float, default=10.0, help="with --fetch: seconds between progress lines"
    )
    args = ap.parse_args(argv)
    if args.explain is not None:
        return _explain_file(args.explain)

    settings = get_settings()
    if args.fetch:
        return _fetch(settings, args.interval)
    gpus = detect_gpu_count() if settings.engine_kind == "gpu" and not settings.tensor_parallel_size else 0
    try:
        cmd, env = build_engine_command(settings, gpus)
    except ValueError as exc:
        print(f"engine_launch: {exc}", file=sys.stderr)
        return 2
    if args.print_only:
        extra = {k: v for k, v in env.items() if os.environ.get(k) != v and k not in _SECRET_ENV}
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(extra.items())))
        print(shlex.join(cmd))
        return 0
    problem = _preflight(settings)
    if problem:
        print(f"engine_launch: {problem}", file=sys.stderr)
        return 2
    print(f"engine_launch: starting the {settings.engine_kind} engine: {shlex.join(cmd)}", flush=True)
    os.execvpe(cmd[0], cmd, env)  # replaces this process: supervisord signals the engine itself
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

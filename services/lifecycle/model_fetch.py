"""Download the GPU engine's model from the Hugging Face hub before the engine starts, with progress.

vLLM downloads a hub model itself when it starts, but with its progress bars switched off
(``DisabledTqdm`` in ``vllm/model_executor/model_loader/weight_utils.py``): a 65 GB model would
look like a silent engine for many minutes. ``install.sh`` therefore runs this first, through
``python -m services.lifecycle.engine_launch --fetch`` (which gives it the engine's environment: ``HF_HOME``,
``HF_TOKEN``), with the ENGINE venv's python, whose ``huggingface_hub`` is the one vLLM uses::

    .venv-engine/bin/python -m services.lifecycle.model_fetch --model deepseek-ai/DeepSeek-R1-Distill-Qwen-32B

It picks the files the way vLLM does (the safetensors the index names, else ``*.safetensors``,
else ``*.bin`` / ``*.pt``; plus the small top-level config and tokenizer files), checks the free
disk space first, downloads into the hub cache (where vLLM then finds every file), and prints a
progress line every few seconds: bytes, share, rate and time left. Failures end in one plain
sentence: gated or private model (``HF_TOKEN``), unknown model or revision, no connection, disk full.

Standalone on purpose, like ``model_prep``: it imports nothing from the project, and
``huggingface_hub`` only inside functions, so the project venv can use :func:`blob_bytes` too.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Weight formats, in the order vLLM tries them for ``--load-format auto``.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
#: Files that are weights in some format; never fetched unless chosen as the weights.
_WEIGHT_LIKE = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.onnx_data",
    "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.mlmodel", "*.npz",
)  # fmt: skip
#: vLLM's index of sharded safetensors weights.
SAFE_INDEX = "model.safetensors.index.json"
#: Top-level non-weight files larger than this are left to vLLM (not config or tokenizer files).
SMALL_FILE_MAX = 64 * 2**20
#: Free space kept beyond the download itself (the hub writes each file before moving it).
DISK_MARGIN = 2 * 2**30


@dataclass(frozen=True)
class RemoteFile:
    """One file of the model repository at the resolved commit."""

    path: str
    size: int


class FetchError(Exception):
    """A download failure, worded for the operator (one sentence, what to do next)."""


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _duration(s: float) -> str:
    s = max(0, int(s))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def choose_files(files: list[RemoteFile], weight_map_files: set[str] | None) -> list[RemoteFile]:
    """The files vLLM will load: weights in one format plus the small top-level config/tokenizer files.

    ``weight_map_files`` is the set of shard names in ``model.safetensors.index.json`` when the
    repository has one (vLLM then loads exactly those, skipping e.g. an ``original/`` folder).
    """
    top = [f for f in files if "/" not in f.path]
    if weight_map_files:
        weights = [f for f in top if f.path in weight_map_files]
    else:
        weights = []
        for pattern in WEIGHT_PATTERNS:
            weights = [f for f in top if fnmatch.fnmatch(f.path, pattern)]
            if weights:
                break
    chosen = {f.path for f in weights}
    small = [
        f
        for f in top
        if f.path not in chosen
        and f.size <= SMALL_FILE_MAX
        and not any(fnmatch.fnmatch(f.path, p) for p in _WEIGHT_LIKE)
        and not f.path.startswith(".")
    ]
    return sorted([*weights, *small], key=lambda f: f.path)


def blob_bytes(blobs_dir: Path) -> int:
    """Bytes written so far under a hub cache ``blobs`` folder, finished and ``.incomplete`` files alike.

    Counts allocated blocks where they are fewer than the size, so a file truncated to its final
    length before its bytes arrive does not count as downloaded.
    """
    total = 0
    try:
        entries = list(os.scandir(blobs_dir))
    except OSError:
        return 0
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        total += min(st.st_size, st.st_blocks * 512)
    return total


def repo_cache_dir(cache_dir: Path, repo_id: str) -> Path:
    """The hub cache folder of a model repository (``models--org--name``)."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(cache_dir: Path, needed: int) -> None:
    """Raise :class:`FetchError` when the cache's disk cannot hold ``needed`` more bytes."""
    free = free_bytes(cache_dir)
    if needed + DISK_MARGIN > free:
        raise FetchError(
            f"not enough disk space: the model needs {_gb(needed)} more under {cache_dir}, "
            f"only {_gb(free)} are free; free some space, or set HF_HOME to a folder on a larger disk"
        )


class Progress:
    """Turns byte counts into progress lines (share, rate over the last interval, time left)."""

    def __init__(self, total: int, clock: Any = time.monotonic) -> None:
        self.total = max(total, 1)
        self.clock = clock
        self.start = clock()
        self._last_t = self.start
        self._last_done = 0

    def line(self, done: int) -> str:
        """One line for ``done`` bytes downloaded of :attr:`total`."""
        done = min(max(done, 0), self.total)
        now = self.clock()
        dt = now - self._last_t
        rate = (done - self._last_done) / dt if dt > 0 else 0.0
        avg = done / (now - self.start) if now > self.start else 0.0
        self._last_t, self._last_done = now, done
        text = f"{_gb(done)} of {_gb(self.total)} ({100 * done / self.total:.1f} %)"
        if rate > 0:
            text += f", {rate / 1e6:.0f} MB/s"
        # A time left from the first trickle of bytes would be wild: wait for 1 % of the total.
        if avg > 0 and self.total * 0.01 <= done < self.total:
            text += f", about {_duration((self.total - done) / avg)} left"
        return text


def hub_unreachable(exc: BaseException) -> bool:
    """True for failures that say nothing about the model: no network, offline mode, hub down."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.OfflineModeIsEnabled | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, hf_errors.RepositoryNotFoundError | hf_errors.RevisionNotFoundError):
        return False
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status is not None and status >= 500
    name = type(exc).__name__
    return "Connect" in name or "Timeout" in name


def cached_snapshot(cache_dir: Path, repo_id: str, revision: str) -> Path | None:
    """The cached snapshot of ``repo_id`` at ``revision`` when it holds config and all weights."""
    repo = repo_cache_dir(cache_dir, repo_id)
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    if not (snap / "config.json").is_file():
        return None
    index = snap / SAFE_INDEX
    if index.is_file():
        try:
            shards = set((json.loads(index.read_text()).get("weight_map") or {}).values())
        except (OSError, ValueError):
            return None
        return snap if shards and all((snap / f).is_file() for f in shards) else None
    has_weights = any(fnmatch.fnmatch(f.name, p) for f in snap.iterdir() for p in WEIGHT_PATTERNS)
    return snap if has_weights else None


def explain(exc: BaseException, repo_id: str, endpoint: str) -> str:
    """A plain sentence for a hub client failure."""
    from huggingface_hub import errors as hf_errors

    name = type(exc).__name__
    if isinstance(exc, hf_errors.GatedRepoError):
        return (
            f"{repo_id} is a gated model: accept its terms on its page on the hub, then put a token "
            "with access in var/llmconsole.env as HF_TOKEN=... and run ./install.sh again"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return f"{repo_id} has no such revision: check MODEL_REVISION"
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (
            f"the model {repo_id} was not found on {endpoint}: check MODEL (org/name as on the hub); "
            "a private model needs HF_TOKEN in var/llmconsole.env"
        )
    if (isinstance(exc, OSError) and exc.errno == 28) or "No space left on device" in str(exc):
        return "the disk filled up during the download: free some space, or set HF_HOME to a larger disk"
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it, or point MODEL_PATH to a local copy"
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"the hub refused access to {repo_id} ({status}): check HF_TOKEN in var/llmconsole.env"
        return f"the hub answered an error for {repo_id} ({status}): try again later"
    if hub_unreachable(exc):
        return (
            f"cannot reach the model hub ({endpoint}): check the network or proxy (HTTPS_PROXY), "
            "or point MODEL_PATH to a local copy of the model"
        )
    return f"the download failed: {name}: {exc}"


def _list_files(api: Any, repo_id: str, revision: str, token: str | None) -> tuple[str, list[RemoteFile]]:
    info = api.repo_info(repo_id, revision=revision, token=token)
    commit = info.sha
    files = [
        RemoteFile(f.path, int(f.size or 0))
        for f in api.list_repo_tree(repo_id, revision=commit, recursive=False, token=token)
        if hasattr(f, "size")  # RepoFile, not RepoFolder
    ]
    return commit, files


def _weight_map(repo_id: str, commit: str, cache_dir: Path, token: str | None) -> set[str]:
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id, SAFE_INDEX, revision=commit, cache_dir=cache_dir, token=token)
    weight_map = json.loads(Path(path).read_text()).get("weight_map") or {}
    return set(weight_map.values())


def fetch(
    repo_id: str,
    revision: str = "main",
    cache_dir: Path | None = None,
    interval_s: float = 10.0,
    out: Any = None,
) -> Path:
    """Download ``repo_id`` into the hub cache, printing progress; the snapshot folder on success.

    Raises :class:`FetchError` with a plain sentence on any failure.
    """
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
    from tqdm.auto import tqdm

    out = out or sys.stdout
    say = lambda msg: print(f"[model] {msg}", file=out, flush=True)  # noqa: E731
    endpoint = constants.ENDPOINT
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    token = None  # the hub client reads HF_TOKEN itself (engine_launch puts the setting there)
    api = HfApi(endpoint=endpoint)
    try:
        commit, files = _list_files(api, repo_id, revision, token)
        weight_map = (
            _weight_map(repo_id, commit, cache, token) if any(f.path == SAFE_INDEX for f in files) else None
        )
    except Exception as exc:
        snapshot = cached_snapshot(cache, repo_id, revision) if hub_unreachable(exc) else None
        if snapshot is None:
            raise FetchError(explain(exc, repo_id, endpoint)) from exc
        # An offline or firewalled host with the model already cached: vLLM starts from it too.
        say(f"the hub cannot be reached ({type(exc).__name__}); using the cached copy {snapshot}")
        return snapshot
    chosen = choose_files(files, weight_map)
    if not any(any(fnmatch.fnmatch(f.path, p) for p in WEIGHT_PATTERNS) for f in chosen):
        raise FetchError(
            f"{repo_id} has no weights vLLM can load (*.safetensors, *.bin, *.pt) at its top level"
        )
    total = sum(f.size for f in chosen)
    cached = {
        f.path
        for f in chosen
        if isinstance(try_to_load_from_cache(repo_id, f.path, cache_dir=cache, revision=commit), str)
    }
    todo = total - sum(f.size for f in chosen if f.path in cached)
    say(f"{repo_id} at {commit[:12]}: {len(chosen)} files, {_gb(total)}; cache {cache}")
    if todo <= 0:
        say("every file is already in the cache: nothing to download")
    else:
        if cached:
            say(f"{len(cached)} of {len(chosen)} files already cached; {_gb(todo)} to download")
        check_disk(cache, todo)

    class _Quiet(tqdm):  # type: ignore[misc,valid-type]
        # The hub's own bars are per file and redraw with \r: one line every interval reads better.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    blobs = repo_cache_dir(cache, repo_id) / "blobs"
    base = blob_bytes(blobs)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["path"] = snapshot_download(
                repo_id,
                # The commit the files were chosen from (a branch may move meanwhile).
                revision=commit,
                cache_dir=cache,
                allow_patterns=[f.path for f in chosen],
                token=token,
                tqdm_class=_Quiet,
            )
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    progress = Progress(todo)
    worker = threading.Thread(target=work, name="model-fetch", daemon=True)
    worker.start()
    while True:
        worker.join(interval_s)
        if not worker.is_alive():
            break
        say("downloading: " + progress.line(blob_bytes(blobs) - base))
    if "error" in result:
        raise FetchError(explain(result["error"], repo_id, endpoint)) from result["error"]
    if revision != commit:
        # refs/<branch> -> commit, as the hub client writes it: vLLM asks for the branch, and
        # finds the snapshot through this file when it starts offline.
        ref = repo_cache_dir(cache, repo_id) / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    elapsed = time.monotonic() - progress.start
    if todo > 0:
        say(f"downloaded {_gb(todo)} in {_duration(elapsed)} ({todo / max(elapsed, 1e-3) / 1e6:.0f} MB/s)")
    return Path(result["path"])


def main(argv: list[str] | None = None) -> int:
    """CLI: download a hub model into the cache with progress; 0 when it is all there."""
    ap = argparse.ArgumentParser(
        prog="python -m services.lifecycle.model_fetch", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--model", required=True, help="hub name (org/name); a local folder is left alone")
    ap.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="hub cache (default: HF_HOME/hub)")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between progress lines")
    args = ap.parse_args(argv)
    if Path(args.model).expanduser().is_dir():
        print(f"[model] {args.model} is a local folder: nothing to download", flush=True)
        return 0
    if args.model.startswith(("/", "./", "../", "~")):
        print(
            f"[model] ERROR: there is no model folder at {args.model}: check MODEL / MODEL_PATH",
            file=sys.stderr,
        )
        return 1
    try:
        path = fetch(args.model, args.revision, args.cache_dir, args.interval)
    except FetchError as exc:
        print(f"[model] ERROR: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[model] interrupted: run it again to resume (finished files are kept)", file=sys.stderr)
        return 130
    print(f"[model] ready: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

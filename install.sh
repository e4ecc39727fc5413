#!/usr/bin/env bash
# llmconsole: set up and start the whole stack, then run its main job.
#
#   ./install.sh                 detect the hardware, pick the engine, install, start, benchmark
#   ./install.sh --engine sim    the simulator engine (no model, seconds to start)
#   ./install.sh --engine cpu    vLLM's CPU build with a small real model (Gemma 3 270M)
#   ./install.sh --engine gpu    vLLM on NVIDIA GPUs
#   ./install.sh --no-bench      start everything, skip the benchmark
#   ./install.sh --setup-only    install everything (packages, venvs, model, env file), start nothing
#   ./install.sh --join HOST:PORT   a node: only an engine + inference worker, registered in the
#                                head's Redis at HOST:PORT (copy the head's var/node.env here first)
#   ./install.sh --leave         a node leaves: drain, stop, deregister
#   ./install.sh --listen ADDR   a head: its Redis listens on ADDR too, for nodes (install/node.sh)
#   ./install.sh --stop          stop everything (the commands on PATH stay)
#   ./install.sh --uninstall     stop everything and remove the commands on PATH
#   ./install.sh --launchers-only   only put `llmconsole` and `supervisorctl` on PATH
#
# Commands on PATH: launchers for `llmconsole` and `supervisorctl` (this stack's) go to
# /usr/local/bin as root, ~/.local/bin otherwise, or $LLMC_BIN_DIR when set. A program of the
# same name that is not ours (Debian's supervisorctl) is left alone: `llmconsole ctl ...` then.
#
# Idempotent: run it again at any time; it installs only what is missing and
# keeps the generated secrets in var/llmconsole.env (mode 0600).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VAR="$ROOT/var"
ENV_FILE="$VAR/llmconsole.env"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CTL=("$VENV/bin/supervisorctl" -c "$ROOT/supervisord.conf")

ENGINE=""
RUN_BENCH=1
STOP=0
SETUP_ONLY=0
JOIN=""
LEAVE=0
LISTEN=""
UNINSTALL=0
LAUNCHERS_ONLY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --engine) ENGINE="${2:-}"; shift 2 ;;
    --engine=*) ENGINE="${1#*=}"; shift ;;
    --no-bench) RUN_BENCH=0; shift ;;
    --stop) STOP=1; shift ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    --join) JOIN="${2:-}"; shift 2 ;;
    --join=*) JOIN="${1#*=}"; shift ;;
    --leave) LEAVE=1; shift ;;
    --listen) LISTEN="${2:-}"; shift 2 ;;
    --uninstall) STOP=1; UNINSTALL=1; shift ;;
    --launchers-only) LAUNCHERS_ONLY=1; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see ./install.sh --help)" >&2; exit 2 ;;
  esac
done
if [[ -n "$ENGINE" && ! "$ENGINE" =~ ^(sim|cpu|gpu)$ ]]; then
  echo "install.sh: --engine must be sim, cpu or gpu (got '$ENGINE')" >&2; exit 2
fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\n\033[31mERROR:\033[0m %s\n' "$*" >&2; exit 1; }
# shellcheck source=install/launchers.sh
source "$ROOT/install/launchers.sh"
if [[ $LAUNCHERS_ONLY -eq 1 ]]; then
  step "Commands on PATH"; install_launchers; print_launchers; exit 0
fi

supervisord_running() { [[ -S "$VAR/supervisor.sock" ]] && "${CTL[@]}" pid >/dev/null 2>&1; }
# shellcheck source=install/node.sh
source "$ROOT/install/node.sh"
SUP_CONF="$ROOT/supervisord.conf"
if [[ -n "$JOIN" ]] || is_node; then SUP_CONF="$ROOT/supervisord.node.conf"; fi
CTL=("$VENV/bin/supervisorctl" -c "$SUP_CONF")
if [[ $LEAVE -eq 1 ]]; then node_leave; exit 0; fi

if [[ $STOP -eq 1 ]]; then
  step "Stopping llmconsole"
  if [[ -x "$VENV/bin/supervisorctl" ]] && supervisord_running; then
    pid="$("${CTL[@]}" pid)"
    "${CTL[@]}" shutdown >/dev/null
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && die "supervisord (pid $pid) did not stop within 60 s"
    info "stopped (every service and the engine)"
  else
    info "not running"
  fi
  if [[ $UNINSTALL -eq 1 ]]; then step "Commands on PATH"; remove_launchers; fi
  exit 0
fi

SUDO=""
if [[ $EUID -ne 0 ]]; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
  if [[ $APT_UPDATED -eq 0 ]]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- 1. system packages --------------------------------------------------------
step "System packages"
command -v python3 >/dev/null || apt_install python3
python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
  || die "Python 3.11 or newer is needed (found $(python3 --version 2>&1))"
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
if ! command -v redis-server >/dev/null; then
  info "installing Debian's redis-server"
  apt_install redis-server
  # Debian starts its own redis on 6379; ours runs under supervisord with a password.
  $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
info "redis-server: $(redis-server --version | awk '{print $3}')"
# wrk drives scripts/ingest_load.py (ingestion against a bare FastAPI app); nothing else needs it.
if ! command -v wrk >/dev/null; then
  apt_install wrk || info "could not install wrk (apt-get install wrk): scripts/ingest_load.py needs it"
fi

# --- 2. the project's virtual environment --------------------------------------
step "Python environment (.venv)"
mkdir -p "$VAR" && chmod 700 "$VAR"
[[ -x "$PY" ]] || python3 -m venv "$VENV"
STAMP="$VENV/.llmconsole-installed"
if [[ ! -f "$STAMP" || pyproject.toml -nt "$STAMP" ]]; then
  info "installing llmconsole and its dependencies (about a minute the first time)"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$PY" -m pip install -q -e ".[dev]" > "$VAR/pip-install.log" 2>&1; then
    tail -20 "$VAR/pip-install.log" >&2
    die "pip could not install the project (full log: var/pip-install.log)"
  fi
  touch "$STAMP"
else
  info "up to date"
fi

# --- 3. settings and secrets ----------------------------------------------------
step "Settings ($ENV_FILE)"
mkdir -p "$VAR/log" "$VAR/runs"
chmod 700 "$VAR"
umask 077
if [[ ! -f "$ENV_FILE" ]]; then
  gen() { "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))'; }
  cat > "$ENV_FILE" <<EOF
# llmconsole settings, written by install.sh. Secrets: keep this file private (0600).
API_KEY=$(gen)
REDIS_PASSWORD=$(gen)
ENGINE_API_KEY=$(gen)
EOF
  info "generated API key, Redis password and engine key"
fi
chmod 600 "$ENV_FILE"

set_env() {  # set_env NAME VALUE: replace or append one line of the env file (only if it changes)
  local name="$1" value="$2"
  if grep -qx "${name}=${value}" "$ENV_FILE"; then
    return 0
  elif grep -q "^${name}=" "$ENV_FILE"; then
    sed -i "s|^${name}=.*|${name}=${value}|" "$ENV_FILE"
  else
    echo "${name}=${value}" >> "$ENV_FILE"
  fi
}
get_env() { grep -E "^$1=" "$ENV_FILE" | tail -1 | cut -d= -f2- || true; }
if [[ -n "$JOIN" ]]; then node_join "$JOIN"; elif ! is_node; then write_node_env; fi
if [[ -n "$LISTEN" ]]; then set_env REDIS_BIND "$LISTEN"; fi

# shellcheck source=install/engine.sh
source "$ROOT/install/engine.sh"
if [[ -z "$ENGINE" ]]; then
  ENGINE="$(get_env ENGINE_KIND)"
  if [[ -z "$ENGINE" ]]; then
    ENGINE="$(detect_engine_kind)"
    info "detected hardware: engine '$ENGINE'"
  fi
fi
PREV_ENGINE="$(get_env ENGINE_KIND)"
set_env ENGINE_KIND "$ENGINE"
info "engine: $ENGINE"

# --- 4. the engine --------------------------------------------------------------
step "Engine ($ENGINE)"
case "$ENGINE" in
  sim) info "the simulator runs from the project's .venv: nothing to install" ;;
  cpu|gpu)
    install_engine_venv "$ENGINE" || die "the $ENGINE engine could not be installed (see above)"
    if [[ "$ENGINE" == cpu ]]; then
      prepare_model || die "the CPU model could not be prepared (see above)"
    else
      # vLLM downloads a hub model silently (its progress bars are off): fetch it here with
      # progress and a disk check. A local MODEL_PATH, or a model already cached, costs nothing.
      "$PY" -m services.lifecycle.engine_launch --fetch || die "the model could not be downloaded (see above)"
    fi
    ;;
esac

step "Commands on PATH"
install_launchers

if [[ $SETUP_ONLY -eq 1 ]]; then
  step "Set up (not started)"
  print_launchers
  info "start the stack: ./install.sh    run the tests: ./.venv/bin/pytest"
  exit 0
fi

# --- 5. start everything under supervisord ------------------------------------
step "Services (supervisord)"
if supervisord_running; then
  "${CTL[@]}" update >/dev/null
  if [[ "$PREV_ENGINE" != "$ENGINE" || "$ENV_FILE" -nt "$VAR/supervisord.pid" ]]; then
    info "settings changed: restarting every service"
    "${CTL[@]}" restart all >/dev/null || true
  else
    "${CTL[@]}" start all >/dev/null || true
  fi
else
  "$VENV/bin/supervisord" -c "$SUP_CONF"
  info "supervisord started"
fi

# --- 6. wait until every service is ready ---------------------------------------
step "Waiting for the stack"
if is_node; then READY=(-m services.lifecycle.node wait); else READY=(-m services.lifecycle.readiness); fi
"$PY" "${READY[@]}" --timeout "$([[ $ENGINE == sim ]] && echo 60 || echo 1800)" \
  || { "${CTL[@]}" status || true; die "the stack did not become ready (logs: var/log/)"; }

# --- 7. the main job: a benchmark through the whole pipeline ---------------------
if [[ $RUN_BENCH -eq 1 ]] && ! is_node; then
  step "Main job: a benchmark through the whole pipeline"
  case "$ENGINE" in
    sim) BENCH_ARGS=(--requests 20 --concurrency 4 --input-tokens 1000 --output-tokens 500) ;;
    cpu) BENCH_ARGS=(--requests 4 --concurrency 2 --input-tokens 256 --output-tokens 32) ;;
    gpu) BENCH_ARGS=(--requests 20 --concurrency 4 --input-tokens 1000 --output-tokens 500) ;;
  esac
  "$VENV/bin/llmconsole" bench --path pipeline --label install "${BENCH_ARGS[@]}" \
    || die "the benchmark failed (logs: var/log/)"
fi

step "Ready"
print_launchers
if is_node; then
  info "node $(get_env NODE_ID): engine + inference worker on $(get_env WORKER_HOST):$(get_env WORKER_PORT | grep . || echo 8001), in the head's Redis at $(get_env REDIS_HOST):$(get_env REDIS_PORT)"
  info "services:       $(launcher_cmd supervisorctl ./.venv/bin/supervisorctl) status   (restart inference_worker, tail -f engine)"
  info "leave:          ./install.sh --leave   (drain, stop, deregister)"
  exit 0
fi
LC="$(launcher_cmd llmconsole ./.venv/bin/llmconsole)"
info "console:        $LC"
info "benchmark:      $LC bench --help"
info "services:       $(launcher_cmd supervisorctl "$LC ctl") status   (restart inference_worker, tail -f engine, ...)"
info "submit a job:   curl -s -H \"Authorization: Bearer \$(grep ^API_KEY= var/llmconsole.env | cut -d= -f2)\" \\"
info "                  -d '{\"input_tokens\":100,\"output_tokens\":20}' -H 'Content-Type: application/json' \\"
info "                  http://127.0.0.1:$(get_env INGESTION_PORT | grep . || echo 8080)/v1/jobs"
info "stop:           ./install.sh --stop"
info "add a node:     copy var/node.env (0600) to the new machine's llmconsole/var/node.env, then there:"
info "                  ./install.sh --join THIS_HOST:$(get_env REDIS_PORT | grep . || echo 6379)"
info "                (here first: ./install.sh --listen THIS_HOST, and open that port to the nodes only)"

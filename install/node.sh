# llmconsole node roles, sourced by install.sh (bash).
#
#   head (the default all-in-one stack): writes var/node.env, the secrets a node needs
#     (Redis password, worker key), and --listen ADDR makes its Redis listen on ADDR too.
#   ./install.sh --join HOST:PORT   this machine runs only an engine and an inference worker
#     (supervisord.node.conf) and registers in the head's Redis at HOST:PORT. Needs
#     var/node.env copied from the head first (never a secret on a command line).
#   ./install.sh --leave            drain (no new jobs; running ones finish), stop, deregister.
#
# Ports: the head's Redis port (6379) must be open to the nodes; each node's WORKER_PORT (8001)
# to the head(s) running proxy workers. Engines stay on loopback.

NODE_ENV="$VAR/node.env"
NODE_MARK="$VAR/node.joined"

is_node() { [[ -f "$NODE_MARK" ]]; }

write_node_env() {  # head: (re)write var/node.env from this head's settings (mode 0600)
  local wkey prefix
  wkey="$(get_env WORKER_API_KEY)"
  if [[ -z "$wkey" ]]; then
    wkey="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(32))')"
    set_env WORKER_API_KEY "$wkey"
  fi
  prefix="$(get_env REDIS_PREFIX)"
  (
    umask 077
    {
      echo "# llmconsole: what a node needs to join the head $(hostname -s). Keep it private (0600)."
      echo "REDIS_PASSWORD=$(get_env REDIS_PASSWORD)"
      echo "WORKER_API_KEY=$wkey"
      if [[ -n "$prefix" ]]; then echo "REDIS_PREFIX=$prefix"; fi
    } > "$NODE_ENV.tmp"
    mv "$NODE_ENV.tmp" "$NODE_ENV"
  )
  chmod 600 "$NODE_ENV"
}

node_address() {  # the address of this machine on the route to host $1 (what the head reaches)
  "$PY" - "$1" <<'PYEOF'
import socket, sys
host = sys.argv[1]
try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        print(s.getsockname()[0])
except OSError:
    print("127.0.0.1")
PYEOF
}

node_join() {  # node_join HOST:PORT: settings of a joined node (after the env file exists)
  local target="$1" host port name value
  [[ "$target" =~ ^[A-Za-z0-9._-]+:[0-9]+$ ]] || die "--join needs HOST:PORT of the head's Redis (got '$target')"
  host="${target%:*}"
  port="${target##*:}"
  [[ -f "$NODE_ENV" ]] || die "no $NODE_ENV: copy var/node.env from the head to this path (scp, mode 0600), then run ./install.sh --join $target again"
  chmod 600 "$NODE_ENV"
  for name in REDIS_PASSWORD WORKER_API_KEY REDIS_PREFIX; do
    value="$(grep -E "^${name}=" "$NODE_ENV" | tail -1 | cut -d= -f2- || true)"
    if [[ -n "$value" ]]; then set_env "$name" "$value"; fi
  done
  [[ -n "$(get_env WORKER_API_KEY)" ]] || die "$NODE_ENV has no WORKER_API_KEY: copy it again from the head (its ./install.sh writes it)"
  set_env REDIS_HOST "$host"
  set_env REDIS_PORT "$port"
  if [[ -z "$(get_env WORKER_HOST)" ]]; then set_env WORKER_HOST "$(node_address "$host")"; fi
  if [[ -z "$(get_env NODE_ID)" ]]; then set_env NODE_ID "$(hostname -s | tr -c 'A-Za-z0-9_.\n-' '-')"; fi
  touch "$NODE_MARK"
  info "node $(get_env NODE_ID): worker on $(get_env WORKER_HOST):$(get_env WORKER_PORT | grep . || echo 8001), head Redis $host:$port"
}

node_leave() {  # drain, stop this node's supervisord, deregister
  is_node || die "this machine did not join a head (no $NODE_MARK); ./install.sh --stop stops a head"
  step "Leaving: draining this node (no new jobs; running ones finish)"
  "$PY" -m services.lifecycle.node drain --timeout 300 \
    || info "not drained in time: stopping anyway (the proxy workers retry its jobs elsewhere)"
  if [[ -x "$VENV/bin/supervisorctl" ]] && supervisord_running; then
    local pid
    pid="$("${CTL[@]}" pid)"
    "${CTL[@]}" shutdown >/dev/null
    for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  "$PY" -m services.lifecycle.node deregister || die "could not deregister (is the head's Redis reachable?)"
  rm -f "$NODE_MARK"
  info "left: the node is stopped and no longer registered"
}

# llmconsole: the commands on PATH, `llmconsole` and `supervisorctl`. Sourced by install.sh,
# which sets ROOT (the checkout). Each launcher is a two-line shell script that runs this
# checkout's .venv; `supervisorctl` always talks to this checkout's supervisord (-c supervisord.conf).
#
# Where: $LLMC_BIN_DIR if set (tests), else /usr/local/bin as root, ~/.local/bin otherwise.
# A launcher carries LAUNCHER_MARK on its second line: install.sh replaces or removes only files
# with that mark, never a program of someone else's (Debian's supervisorctl, a pip one).
# shellcheck shell=bash

LAUNCHER_MARK="# llmconsole launcher (install.sh)"
LAUNCHER_NAMES=(llmconsole supervisorctl)

launcher_dir() {
  if [[ -n "${LLMC_BIN_DIR:-}" ]]; then echo "$LLMC_BIN_DIR"
  elif [[ $EUID -eq 0 ]]; then echo /usr/local/bin
  else echo "$HOME/.local/bin"; fi
}

_sh_quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }  # a word for /bin/sh, whatever it contains

_launcher_of() {  # the checkout a launcher file belongs to ("" if not one of ours)
  [[ -f "$1" ]] && sed -n "2s|^${LAUNCHER_MARK} for \(.*\)$|\1|p" "$1" || true
}

_launcher_body() {  # _launcher_body NAME: the script's text
  local cmd
  case "$1" in
    llmconsole) cmd="exec $(_sh_quote "$ROOT/.venv/bin/llmconsole") \"\$@\"" ;;
    supervisorctl) cmd="exec $(_sh_quote "$ROOT/.venv/bin/supervisorctl") -c $(_sh_quote "$ROOT/supervisord.conf") \"\$@\"" ;;
  esac
  printf '#!/bin/sh\n%s for %s\n# Removed by ./install.sh --uninstall.\n%s\n' "$LAUNCHER_MARK" "$ROOT" "$cmd"
}

# install_launchers: write the launchers; LAUNCHERS_DONE lists what now works as typed.
install_launchers() {
  local dir name target owner tmp found
  dir="$(launcher_dir)"
  LAUNCHERS_DONE=()
  if ! mkdir -p "$dir" 2>/dev/null || [[ ! -w "$dir" ]]; then
    info "cannot write to $dir: no launchers (use ./.venv/bin/llmconsole)"
    return 0
  fi
  for name in "${LAUNCHER_NAMES[@]}"; do
    target="$dir/$name"
    owner="$(_launcher_of "$target")"
    if [[ -e "$target" && -z "$owner" ]]; then
      info "$target is another program (e.g. Debian's supervisor package): left as it is."
      info "  This stack's form that always works: llmconsole ctl ... (e.g. llmconsole ctl restart inference_worker)"
      continue
    fi
    if [[ -n "$owner" && "$owner" != "$ROOT" ]]; then
      info "$target pointed at the checkout $owner: now at $ROOT"
    fi
    tmp="$(mktemp "$dir/.$name.XXXXXX")"
    _launcher_body "$name" > "$tmp"
    chmod 755 "$tmp"
    mv -f "$tmp" "$target"
    LAUNCHERS_DONE+=("$name")
  done
  # Another program of the same name earlier on PATH would win over ours: say so (not "works as typed").
  local shadowed=()
  for name in "${LAUNCHERS_DONE[@]}"; do
    found="$(PATH="$(_login_path)" command -v "$name" || true)"
    if [[ -n "$found" && "$found" != "$dir/$name" ]]; then
      info "$found comes before $dir on PATH: '$name' runs that one."
      [[ $name == supervisorctl ]] && info "  This stack's form that always works: llmconsole ctl ..."
      shadowed+=("$name")
    fi
  done
  for name in "${shadowed[@]}"; do
    LAUNCHERS_DONE=("${LAUNCHERS_DONE[@]/#$name/}")
  done
  read -r -a LAUNCHERS_DONE <<< "${LAUNCHERS_DONE[*]}"
}

_login_path() {  # PATH as a new login shell will have it (Debian's ~/.profile adds ~/.local/bin once it exists)
  local p="$PATH"
  if [[ "$(launcher_dir)" == "$HOME/.local/bin" && ":$p:" != *":$HOME/.local/bin:"* ]] \
     && grep -qs '\.local/bin' "$HOME/.profile" "$HOME/.bash_profile"; then
    p="$HOME/.local/bin:$p"
  fi
  echo "$p"
}

# print_launchers: which commands now exist, and how to reach them if the folder is not on PATH.
print_launchers() {
  local dir name
  dir="$(launcher_dir)"
  if [[ ${#LAUNCHERS_DONE[@]} -eq 0 ]]; then
    info "commands:       none installed on PATH: ./.venv/bin/llmconsole, ./.venv/bin/llmconsole ctl ..."
    return 0
  fi
  info "commands:       ${LAUNCHERS_DONE[*]}  (launchers in $dir)"
  for name in "${LAUNCHER_NAMES[@]}"; do
    [[ " ${LAUNCHERS_DONE[*]} " == *" $name "* ]] && continue
    if [[ $name == supervisorctl ]]; then
      info "                supervisorctl: another program; use llmconsole ctl ..."
    else
      info "                $name: another program; use $ROOT/.venv/bin/$name"
    fi
  done
  if [[ ":$(_login_path):" != *":$dir:"* ]]; then
    info "                $dir is not on PATH: add it (export PATH=\"$dir:\$PATH\" in ~/.profile)"
  elif [[ ":$PATH:" != *":$dir:"* ]]; then
    info "                open a new login shell (bash -l) to have them on PATH"
  fi
}

# launcher_cmd NAME FALLBACK: how to type NAME now (NAME if its launcher was installed).
launcher_cmd() { if [[ " ${LAUNCHERS_DONE[*]:-} " == *" $1 "* ]]; then echo "$1"; else echo "$2"; fi; }

# remove_launchers: delete this checkout's launchers (and nothing else) from the launcher folder.
remove_launchers() {
  local dir name target removed=()
  dir="$(launcher_dir)"
  for name in "${LAUNCHER_NAMES[@]}"; do
    target="$dir/$name"
    if [[ "$(_launcher_of "$target")" == "$ROOT" ]]; then
      rm -f "$target"
      removed+=("$target")
    fi
  done
  if [[ ${#removed[@]} -gt 0 ]]; then info "removed ${removed[*]}"; else info "no launchers of this checkout in $dir"; fi
}

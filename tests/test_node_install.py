"""install/node.sh on its own: the head's var/node.env and what --join writes (bash, a temp var/)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from services.settings import REPO_ROOT

pytestmark = pytest.mark.slow  # runs install/node.sh in bash subprocesses

#: What install.sh defines before it sources install/node.sh: its own set_env/get_env, taken from
#: install.sh itself, and plain step/info/die.
PRELUDE = r"""
set -euo pipefail
step() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }
eval "$(sed -n '/^set_env() {/,/^}/p; /^get_env() {/p' "$ROOT/install.sh")"
declare -F set_env get_env >/dev/null
source "$ROOT/install/node.sh"
"""


def bash(var: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` after the prelude, with VAR/ENV_FILE in ``var``."""
    env = {
        "PATH": "/usr/bin:/bin",
        "ROOT": str(REPO_ROOT),
        "VAR": str(var),
        "ENV_FILE": str(var / "llmconsole.env"),
        "PY": str(REPO_ROOT / ".venv" / "bin" / "python"),
        "VENV": str(REPO_ROOT / ".venv"),
    }
    return subprocess.run(
        ["bash", "-c", PRELUDE + script], env=env, capture_output=True, text=True, timeout=60
    )


def read_env(path: Path) -> dict[str, str]:
    """NAME=value lines of an env file."""
    lines = [ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln and not ln.startswith("#")]
    return {k: v for k, v in lines}


def test_the_head_writes_node_env_with_its_secrets_only(tmp_path: Path) -> None:
    head = tmp_path / "head"
    head.mkdir()
    (head / "llmconsole.env").write_text("API_KEY=ingest-secret\nREDIS_PASSWORD=redis-pw\nREDIS_PREFIX=p1:\n")
    r = bash(head, "write_node_env; write_node_env")  # twice: the worker key stays the same
    assert r.returncode == 0, r.stderr
    node_env = read_env(head / "node.env")
    assert node_env["REDIS_PASSWORD"] == "redis-pw"
    assert node_env["REDIS_PREFIX"] == "p1:"
    assert len(node_env["WORKER_API_KEY"]) >= 32
    assert "API_KEY" not in node_env  # a node cannot submit jobs
    assert read_env(head / "llmconsole.env")["WORKER_API_KEY"] == node_env["WORKER_API_KEY"]
    assert stat.S_IMODE((head / "node.env").stat().st_mode) == 0o600


def test_join_takes_the_secrets_from_node_env_and_refuses_without_it(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    (node / "llmconsole.env").write_text("API_KEY=local\nREDIS_PASSWORD=local-pw\n")
    r = bash(node, "node_join 127.0.0.1:6390")
    assert r.returncode == 1
    assert "copy var/node.env from the head" in r.stderr
    r = bash(node, "node_join 'bad host'")
    assert r.returncode == 1 and "HOST:PORT" in r.stderr
    (node / "node.env").write_text("REDIS_PASSWORD=head-pw\nWORKER_API_KEY=wk\nREDIS_PREFIX=p1:\n")
    r = bash(node, "node_join 127.0.0.1:6390 && is_node && echo joined")
    assert r.returncode == 0, r.stderr
    assert "joined" in r.stdout
    env = read_env(node / "llmconsole.env")
    assert env["REDIS_PASSWORD"] == "head-pw"
    assert (env["WORKER_API_KEY"], env["REDIS_PREFIX"]) == ("wk", "p1:")
    assert (env["REDIS_HOST"], env["REDIS_PORT"]) == ("127.0.0.1", "6390")
    assert env["WORKER_HOST"] == "127.0.0.1"  # this machine's address on the route to the head
    assert env["NODE_ID"]
    assert stat.S_IMODE((node / "node.env").stat().st_mode) == 0o600

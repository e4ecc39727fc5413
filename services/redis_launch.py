"""Start Debian's redis-server with llmconsole's settings (``python -m services.redis_launch``).

The password goes into a 0600 config file under ``var/redis/``, never onto the
command line (where ``ps`` would show it). Durability as issue 6 asks: AOF with
``appendfsync`` from ``REDIS_APPENDFSYNC`` (``everysec`` by default, ``always`` to fsync
before every reply) and ``maxmemory-policy noeviction``, so Redis refuses writes
rather than silently dropping jobs when memory runs out.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from services.settings import Settings, get_settings


def redis_config(s: Settings, data_dir: Path) -> str:
    """The redis.conf text for these settings."""
    lines = [
        f"bind {s.redis_host}",
        f"port {s.redis_port}",
        "protected-mode yes",
        f"dir {data_dir}",
        "appendonly yes",
        f"appendfsync {s.redis_appendfsync}",
        "maxmemory-policy noeviction",
        "save 300 10",
        "daemonize no",
        "supervised no",
        "loglevel notice",
        'logfile ""',
    ]
    pw = s.redis_password.get_secret_value()
    if pw:
        lines.append(f"requirepass {pw}")
    return "\n".join(lines) + "\n"


def write_config(s: Settings) -> Path:
    """Write var/redis/redis.conf (0600) and return its path."""
    data_dir = Path(s.var_dir) / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(redis_config(s, data_dir))
    os.chmod(conf, 0o600)
    return conf


def main() -> None:
    """Exec redis-server with the written config (supervisord then signals it directly)."""
    s = get_settings()
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(exe).exists():
        sys.exit("redis-server not found: install Debian's redis-server package (./install.sh does)")
    conf = write_config(s)
    os.execv(exe, [exe, str(conf)])


if __name__ == "__main__":
    main()

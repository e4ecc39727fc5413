"""Start Debian's redis-server with llmconsole's settings (``python -m services.lifecycle.redis_launch``).

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

#: A job hash's largest value (its compact result: ~2 KB for 500 tokens) still fits a listpack,
#: about 1.5 KB smaller per job than Redis's default hashtable encoding above 64 bytes.
HASH_LISTPACK_VALUE = 8192


def machine_ram_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def maxmemory_bytes(s: Settings) -> int:
    """Redis's maxmemory: ``REDIS_MAXMEMORY_MB``, or a quarter of the machine's RAM (at least 64 MiB)."""
    if s.redis_maxmemory_mb:
        return s.redis_maxmemory_mb * 1024 * 1024
    return max(machine_ram_bytes() // 4, 64 * 1024 * 1024)


def memory_config(s: Settings) -> dict[str, str]:
    """The memory settings of Redis (also applied with CONFIG SET by tests on their own Redis)."""
    return {
        "maxmemory": str(maxmemory_bytes(s)),
        "maxmemory-policy": "noeviction",
        "hash-max-listpack-value": str(HASH_LISTPACK_VALUE),
    }


def redis_config(s: Settings, data_dir: Path) -> str:
    """The redis.conf text for these settings."""
    lines = [
        f"bind {s.redis_host} {s.redis_bind}".rstrip(),
        f"port {s.redis_port}",
        "protected-mode yes",
        f"dir {data_dir}",
        "appendonly yes",
        f"appendfsync {s.redis_appendfsync}",
        *(f"{k} {v}" for k, v in memory_config(s).items()),
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

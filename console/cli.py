"""``llmconsole``: the operator console, and ``llmconsole bench`` (the headless benchmark).

Run from the repository (``./.venv/bin/llmconsole``) it needs nothing else:
settings, the Redis password, the API key and the supervisor socket come from
``services.settings.get_settings()`` (the env file ``install.sh`` writes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from console.app import DEFAULT_REFRESH_S, MIN_REFRESH_S

DEFAULT_WEB_PORT = 8765


def refresh_seconds(text: str) -> float:
    """argparse type of ``--refresh``: a number of seconds, at least :data:`MIN_REFRESH_S`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= MIN_REFRESH_S or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_REFRESH_S:g} seconds (got {text}); refreshing faster costs CPU and shows nothing new"
        )
    return value


def port_number(text: str) -> int:
    """argparse type of ``--port``: 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The console's command line."""
    p = argparse.ArgumentParser(
        prog="llmconsole",
        description="Operator console of the llmconsole inference stack: live queue, GPUs, engine, services "
        "and jobs; service control; benchmark runs. `llmconsole bench --help` for the headless benchmark, "
        "`llmconsole gpu` for what NVML reads on this host, `llmconsole ctl status|restart NAME|tail -f NAME` "
        "for this stack's supervisorctl.",
    )
    p.add_argument(
        "--readonly", action="store_true", help="hide every action (service control, benchmark launch)"
    )
    p.add_argument(
        "--refresh",
        type=refresh_seconds,
        default=DEFAULT_REFRESH_S,
        metavar="SECONDS",
        help=f"refresh interval (default {DEFAULT_REFRESH_S:g}, minimum {MIN_REFRESH_S:g})",
    )
    p.add_argument(
        "--web", action="store_true", help="serve the console in a browser (textual-serve, loopback)"
    )
    p.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_WEB_PORT,
        help=f"port of --web (default {DEFAULT_WEB_PORT})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address --web binds (default 127.0.0.1)")
    p.add_argument(
        "--demo", action="store_true", help="show fixed demo data instead of the stack (no stack needed)"
    )
    return p


def child_argv(args: argparse.Namespace) -> list[str]:
    """The flags a ``--web`` app process gets (the same console, without ``--web``)."""
    out = ["--refresh", repr(args.refresh)]
    if args.readonly:
        out.append("--readonly")
    if args.demo:
        out.append("--demo")
    return out


def run_bench_cli(argv: Sequence[str]) -> int:
    """``llmconsole bench ...``: hand over to the benchmark's own CLI."""
    try:
        from bench.cli import main as bench_main
    except ImportError as e:
        print(f"llmconsole bench: the benchmark CLI is not available ({e})", file=sys.stderr)
        return 2
    return int(bench_main(list(argv)) or 0)


def run_ctl(argv: Sequence[str]) -> int:
    """``llmconsole ctl ...``: this stack's ``supervisorctl`` (its supervisord.conf and socket), args passed on.

    The form that works wherever another ``supervisorctl`` (Debian's) comes first on PATH.
    """
    from supervisor import supervisorctl

    from services.settings import REPO_ROOT, load_settings

    try:
        sock = load_settings().supervisor_socket
    except ValidationError as e:
        print(f"llmconsole ctl: the settings are not valid:\n{e}", file=sys.stderr)
        return 2
    args = ["-c", str(REPO_ROOT / "supervisord.conf"), "-s", f"unix://{sock}", *argv]
    try:
        supervisorctl.main(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmconsole`` console script."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] == "bench":
        return run_bench_cli(args_in[1:])
    if args_in and args_in[0] == "ctl":
        return run_ctl(args_in[1:])
    if args_in and args_in[0] == "gpu":
        from services.telemetry import main as gpu_main

        return gpu_main(args_in[1:])
    args = build_parser().parse_args(args_in)

    if args.web:
        from console.web import serve

        return serve(child_argv(args), host=args.host, port=args.port)

    from console.app import ConsoleApp
    from console.fakes import FakeBench, fake_sources
    from console.sources import LibraryBench, real_sources
    from services.settings import get_settings

    if args.demo:
        app = ConsoleApp(
            fake_sources(), bench=FakeBench(), refresh_s=args.refresh, readonly=args.readonly, demo=True
        )
    else:
        try:
            settings = get_settings()
        except ValidationError as e:
            print(f"llmconsole: the settings are not valid:\n{e}", file=sys.stderr)
            return 2
        app = ConsoleApp(
            real_sources(settings),
            bench=LibraryBench(settings),
            refresh_s=args.refresh,
            readonly=args.readonly,
        )
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

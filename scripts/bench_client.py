"""How hard can the benchmark client itself push? (issue 4, part 7; a script, not a test)

Starts the simulator with zero latency (every token as fast as it can be
streamed) and drives it with the bench library on the direct path:

1. **Open loop**: rising request rates; for each, the achieved rate and the
   client's own schedule lag (intended vs actual send time). The client keeps
   up while the lag stays small and the achieved rate meets the target.
2. **Closed loop**: rising concurrency with longer outputs; streamed tokens
   per second the client consumes, and the lag between a slot freeing and the
   next send.

The simulator runs on the same machine, so the figures are a floor for the
client alone. Usage::

    .venv/bin/python scripts/bench_client.py [--rates 50,100,...] [--concurrency 16,64,...] [--lag-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import BenchConfig, run_benchmark
from services.settings import REPO_ROOT, Settings


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def start_sim(port: int, log: Path) -> subprocess.Popen[bytes]:
    """The simulator with zero latency and a batch large enough never to queue."""
    args = [sys.executable, "-m", "services.sim_engine", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--ttft-base-ms", "0", "--prefill-ms-per-token", "0", "--itl-ms", "0", "--itl-jitter-ms", "0"]
    args += [
        "--itl-batch-ms",
        "0",
        "--max-num-seqs",
        "4096",
        "--kv-blocks",
        "200000",
        "--log-level",
        "warning",
    ]
    env = {"LLMC_ENV_FILE": "/nonexistent/llmconsole.env", "PATH": "/usr/bin:/bin"}
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"simulator did not start: {log.read_text()[-2000:]}")


async def main_async(ns: argparse.Namespace) -> int:
    """Run both phases and print a table per phase."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-client-"))
    port = _free_port()
    proc = start_sim(port, tmp / "sim.log")
    s = Settings(_env_file=None, engine_port=port, redis_port=_free_port(), results_dir=str(tmp))  # type: ignore[call-arg]
    try:
        print(f"open loop: {ns.input_tokens} in / {ns.output_tokens} out tokens, {ns.seconds:g} s per rate")
        head = ["target/s", "achieved/s", "lag p50 ms", "lag p90 ms", "lag p99 ms", "failed"]
        print(" ".join(f"{h:>10}" for h in head))
        best, misses = 0.0, 0
        for rate in ns.rates:
            n = max(50, int(rate * ns.seconds))
            cfg = BenchConfig(input_tokens=ns.input_tokens, output_tokens=ns.output_tokens, requests=n, rate=float(rate),
                              path="direct", store=False, plots=False, prefix_share=0.0, timeout_s=60)  # fmt: skip
            r = (await run_benchmark(cfg, settings=s)).summary
            # p90, not p99: on a shared machine one stall of another process spoils a p99
            ok = (
                r["p90_schedule_lag_ms"] <= ns.lag_ms
                and r["request_throughput"] >= 0.95 * rate
                and not r["failed"]
            )
            cells = [rate, r["request_throughput"], r["p50_schedule_lag_ms"], r["p90_schedule_lag_ms"],
                     r["p99_schedule_lag_ms"], r["failed"]]  # fmt: skip
            print(" ".join(f"{c:>10.2f}" if isinstance(c, float) else f"{c:>10}" for c in cells)
                  + ("" if ok else "   <- client falls behind"))  # fmt: skip
            if ok:
                best, misses = max(best, float(rate)), 0
            else:
                misses += 1
                if misses == 2:
                    break
        print(f"=> keeps its schedule up to about {best:g} requests/s (p90 lag <= {ns.lag_ms:g} ms)\n")

        print(f"closed loop: {ns.input_tokens} in / {ns.stream_tokens} out tokens")
        print(
            f"{'streams':>8} {'req/s':>8} {'tok/s':>9} {'lag p50 ms':>10} {'lag p99 ms':>10} {'ITL p50 ms':>10} {'failed':>6}"
        )
        for c in ns.concurrency:
            cfg = BenchConfig(input_tokens=ns.input_tokens, output_tokens=ns.stream_tokens, requests=max(2 * c, 50),
                              concurrency=c, path="direct", store=False, plots=False, prefix_share=0.0, timeout_s=60)  # fmt: skip
            r = (await run_benchmark(cfg, settings=s)).summary
            print(f"{c:>8} {r['request_throughput']:>8.1f} {r['output_throughput']:>9.0f} "
                  f"{r['p50_schedule_lag_ms']:>10.2f} {r['p99_schedule_lag_ms']:>10.2f} {r['median_itl_ms']:>10.2f} "
                  f"{r['failed']:>6}")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


def main() -> int:
    """Parse the options and run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=_ints, default=[25, 50, 100, 200, 400, 800, 1600])
    p.add_argument("--concurrency", type=_ints, default=[1, 16, 64, 256])
    p.add_argument("--seconds", type=float, default=4.0, help="length of each open-loop step")
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--stream-tokens", type=int, default=128, help="output tokens per closed-loop request")
    p.add_argument(
        "--lag-ms", type=float, default=20.0, help="p90 schedule lag that counts as falling behind"
    )
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

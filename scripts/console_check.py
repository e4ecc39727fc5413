"""End-to-end check of the operator console against a real stack.

1. The real app in tmux (``tmux new-session -d -x 120 -y 40``) while a benchmark keeps the
   stack busy: the screen must show the queue, every service RUNNING and finished jobs; Enter
   on a job must open its stage breakdown. The screen is saved to ``var/console-tmux.txt``.
2. The console's CPU share at the default 1 s refresh, from ``/proc/<pid>/stat`` over
   ``--cpu-seconds`` (30 by default) while the benchmark runs.
3. ``llmconsole --web`` in headless Chromium, driven over the DevTools protocol: wait until
   the app's own text arrives over the WebSocket, screenshot to ``var/console-web.png``, check
   the page made no request outside the server, then leave and check the app process ends.

The stack is the one ``./install.sh`` started (``var/supervisor.sock`` answers), or with
``--start-stack`` (or when none runs) a temporary one from ``supervisord.conf`` in a temporary
folder, stopped at the end. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.lifecycle.supervisor_client import supervisor_proxy  # noqa: E402
from services.settings import Settings, load_settings  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
LLMCONSOLE = VENV_BIN / "llmconsole"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

failures: list[str] = []


def say(msg: str) -> None:
    """Progress line."""
    print(f"[console-check] {msg}", flush=True)


def check(ok: bool, what: str) -> bool:
    """Record one check."""
    say(f"{'PASS' if ok else 'FAIL'}: {what}")
    if not ok:
        failures.append(what)
    return ok


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` passes (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = pred()
            if value:
                return value
        time.sleep(interval)
    return None


# ---------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------


def stack_answers(settings: Settings) -> bool:
    """True if supervisord answers on the settings' socket with every program running."""
    try:
        infos = supervisor_proxy(settings.supervisor_socket, 3.0).supervisor.getAllProcessInfo()
    except Exception:
        return False
    return bool(infos) and all(i["statename"] == "RUNNING" for i in infos)


@contextlib.contextmanager
def the_stack(start: bool) -> Iterator[dict[str, str]]:
    """Yield the environment for console processes: the running stack, or a temporary one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    if not start and stack_answers(load_settings()):
        say(f"using the running stack (socket {load_settings().supervisor_socket})")
        yield env
        return
    from tests.supervisedstack import SupervisedStack

    with tempfile.TemporaryDirectory(prefix="llmc-check-") as tmp:
        say("starting a temporary stack under supervisord (sim engine)")
        st = SupervisedStack(Path(tmp))
        try:
            st.start()
            env["LLMC_ENV_FILE"] = str(st.env_file)
            yield env
        finally:
            st.stop()
            say("temporary stack stopped")


@contextlib.contextmanager
def busy_benchmark(env: dict[str, str], seconds: float, rate: float) -> Iterator[subprocess.Popen[bytes]]:
    """A benchmark through the pipeline for about ``seconds`` at ``rate`` requests/s."""
    n = int(seconds * rate)
    cmd = [
        str(LLMCONSOLE), "bench", "--requests", str(n), "--rate", str(rate), "--concurrency", "32",
        "--input-tokens", "256", "--output-tokens", "64", "--label", "console-check", "--quiet", "--no-plots",
    ]  # fmt: skip
    log = open(REPO / "var" / "console-check-bench.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()


# ---------------------------------------------------------------------------
# tmux
# ---------------------------------------------------------------------------


class Tmux:
    """One detached tmux session running the console."""

    def __init__(self, env: dict[str, str], width: int = 120, height: int = 40, args: str = "") -> None:
        self.name = f"llmc-check-{os.getpid()}"
        env_file = env.get("LLMC_ENV_FILE")
        prefix = f"env LLMC_ENV_FILE={env_file} " if env_file else ""
        # exec: the pane's pid is the console itself (for the CPU figure).
        command = f"cd {REPO} && exec {prefix}{LLMCONSOLE} {args}"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), command],
            check=True,
        )

    def screen(self) -> str:
        """The visible pane as text."""
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True, check=True
        ).stdout

    def keys(self, *keys: str) -> None:
        """Send keys (tmux names: Enter, Escape, Tab, Down...)."""
        for k in keys:
            subprocess.run(["tmux", "send-keys", "-t", self.name, k], check=True)
            time.sleep(0.3)

    def pid(self) -> int:
        """pid of the process in the pane."""
        out = subprocess.run(
            ["tmux", "display", "-p", "-t", self.name, "#{pane_pid}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip())

    def close(self) -> None:
        """Quit the console and end the session."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.keys("q")
        time.sleep(1)
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def check_tmux(env: dict[str, str]) -> None:
    """The overview shows queue, services and jobs; Enter opens a job's stages."""
    t = Tmux(env)
    try:

        def overview_ready() -> str | None:
            s = t.screen()
            has_all = all(w in s for w in ("Queue", "Services", "Jobs", "RUNNING", "succeeded"))
            # Rates need two refreshes: wait for them too.
            return s if has_all and re.search(r"done/s\s+[\d.,]+", s) else None

        screen = wait_for(overview_ready, 90) or t.screen()
        (REPO / "var" / "console-tmux.txt").write_text(screen)
        check(
            "Queue" in screen and re.search(r"waiting\s+\d+", screen) is not None,
            "tmux: queue panel with depth",
        )
        programs = ("redis", "engine", "ingestion", "proxy_worker", "inference_worker")
        check(
            all(re.search(rf"\b{p}\s+RUNNING\s+\d+", screen) for p in programs),
            "tmux: services panel lists the 5 programs RUNNING with pids",
        )
        check(
            re.search(r"\b[0-9a-f]{12}\s+succeeded\s+256\s+64\b", screen) is not None,
            "tmux: jobs table with jobs",
        )
        check("Engine" in screen and "tok/s" in screen, "tmux: engine panel with token rates")
        check("No GPU" in screen or "VRAM" in screen, "tmux: GPU panel says what it has")
        t.keys("End", "Enter")  # the oldest job on screen: a finished one
        stages = (
            wait_for(lambda: (s := t.screen()) and "Stages" in s and "Result" in s and s, 20) or t.screen()
        )
        check(
            re.search(r"decode\s+\d[\d.]*m?s\s+\S", stages) is not None and "TTFT" in stages,
            "tmux: Enter opens a finished job's stage breakdown",
        )
        (REPO / "var" / "console-tmux-job.txt").write_text(stages)
        t.keys("Escape")
    finally:
        t.close()


def measure_cpu(env: dict[str, str], seconds: float) -> float | None:
    """CPU share of one core used by the console refreshing at 1 Hz, over ``seconds``."""
    t = Tmux(env)
    try:
        if not wait_for(lambda: "succeeded" in t.screen(), 90):
            check(False, "cpu: console showed jobs before measuring")
            return None
        time.sleep(3)  # past start-up
        pid = t.pid()
        tick = os.sysconf("SC_CLK_TCK")

        def cpu_s() -> float:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime + stime (all threads)

        c0, w0 = cpu_s(), time.monotonic()
        time.sleep(seconds)
        c1, w1 = cpu_s(), time.monotonic()
        share = (c1 - c0) / (w1 - w0)
        screen = t.screen()
        busy = "running" in screen or "succeeded" in screen
        say(f"console CPU at 1 Hz refresh: {share * 100:.1f}% of one core over {w1 - w0:.0f}s (pid {pid})")
        check(busy, "cpu: the stack was busy during the measurement")
        return share
    finally:
        t.close()


# ---------------------------------------------------------------------------
# Web mode in headless Chromium over the DevTools protocol
# ---------------------------------------------------------------------------


class Cdp:
    """A minimal DevTools-protocol client over one page's WebSocket."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(ws_url, max_size=None, open_timeout=20))
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """Send a command and return its result (events that arrive meanwhile are kept)."""
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            self.events.append(msg)

    def pump(self, seconds: float) -> None:
        """Collect events for up to ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=max(0.05, deadline - time.monotonic()))))
            except TimeoutError:
                return

    def close(self) -> None:
        """Close the socket."""
        with contextlib.suppress(Exception):
            self._stack.close()


def children_of(pid: int) -> list[int]:
    """pids whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def frames_text(events: list[dict[str, Any]]) -> str:
    """Everything the app sent over its WebSocket so far, as text."""
    parts = []
    for ev in events:
        if ev.get("method") == "Network.webSocketFrameReceived":
            resp = ev["params"]["response"]
            data = resp.get("payloadData", "")
            if resp.get("opcode") == 2:
                with contextlib.suppress(ValueError):
                    data = base64.b64decode(data).decode("utf-8", "replace")
            parts.append(data)
    return "".join(parts)


def check_web(env: dict[str, str]) -> None:
    """Screenshot of ``llmconsole --web`` with the overview drawn; no external requests; no orphans."""
    port = free_port()
    server = subprocess.Popen(
        [str(LLMCONSOLE), "--web", "--port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    chrome: subprocess.Popen[bytes] | None = None
    profile = tempfile.mkdtemp(prefix="llmc-chromium-")
    cdp: Cdp | None = None
    try:
        url = f"http://127.0.0.1:{port}/?fontsize=14"
        ok = wait_for(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 30)
        if not check(bool(ok), f"web: server answers on 127.0.0.1:{port}"):
            return
        debug_port = free_port()
        chrome = subprocess.Popen(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                f"--user-data-dir={profile}", f"--remote-debugging-port={debug_port}", "--window-size=1280,800",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def page_ws() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list", timeout=2) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        ws_url = wait_for(page_ws, 30)
        if not check(bool(ws_url), "web: headless Chromium started with DevTools"):
            return
        cdp = Cdp(ws_url)
        cdp.call("Network.enable")
        cdp.call("Page.enable")
        cdp.call(
            "Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1, mobile=False
        )
        cdp.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        words = ("Queue", "Services", "Jobs", "RUNNING")
        while time.monotonic() < deadline and not all(w in frames_text(cdp.events) for w in words):
            cdp.pump(0.5)
        text = frames_text(cdp.events)
        check(all(w in text for w in words), "web: the app's overview text arrived over the WebSocket")
        cdp.pump(2.0)  # let xterm.js paint the frames it has
        shot = cdp.call("Page.captureScreenshot", format="png")
        out = REPO / "var" / "console-web.png"
        out.write_bytes(base64.b64decode(shot["data"]))
        check(out.stat().st_size > 20_000, f"web: screenshot written to {out.relative_to(REPO)}")
        requested = [
            ev["params"]["request"]["url"]
            for ev in cdp.events
            if ev.get("method") == "Network.requestWillBeSent"
        ]
        outside = [u for u in requested if not u.startswith((f"http://127.0.0.1:{port}/", "data:"))]
        check(
            bool(requested) and not outside,
            f"web: no request outside the server ({len(requested)} made) {outside}",
        )
        apps = children_of(server.pid)
        check(len(apps) == 1, f"web: one app process while the page is open ({apps})")
        cdp.call("Page.navigate", url="about:blank")  # the browser goes away from the console
        gone = wait_for(lambda: not [p for p in apps if Path(f"/proc/{p}").exists()], 15)
        check(bool(gone), "web: the app process ended when the browser left")
    finally:
        if cdp is not None:
            cdp.close()
        if chrome is not None:
            chrome.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                chrome.wait(10)
            if chrome.poll() is None:
                chrome.kill()
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(15)
        if server.poll() is None:
            os.killpg(server.pid, 9)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    """Run the checks; 0 if all passed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start-stack", action="store_true", help="always use a temporary stack")
    p.add_argument("--cpu-seconds", type=float, default=30.0, help="length of the CPU measurement (0 = skip)")
    p.add_argument("--rate", type=float, default=20.0, help="benchmark request rate keeping the stack busy")
    p.add_argument("--no-web", action="store_true", help="skip the browser check")
    args = p.parse_args()
    (REPO / "var").mkdir(exist_ok=True)
    for tool, package in (("tmux", "tmux"), (CHROMIUM, "chromium")):
        if tool == CHROMIUM and args.no_web:
            continue
        if shutil.which(tool) is None:
            say(f"missing: {tool} (install it with: apt-get install {package})")
            return 2
    with the_stack(args.start_stack) as env:
        duration = 60 + args.cpu_seconds + (0 if args.no_web else 45)
        with busy_benchmark(env, duration, args.rate) as bench:
            time.sleep(3)
            check(bench.poll() is None, "a benchmark keeps the stack busy")
            check_tmux(env)
            if args.cpu_seconds > 0:
                share = measure_cpu(env, args.cpu_seconds)
                if share is not None:
                    (REPO / "var" / "console-cpu.txt").write_text(
                        f"{share * 100:.1f}% of one core at 1 Hz over {args.cpu_seconds:.0f}s, "
                        f"benchmark at {args.rate:g} req/s\n"
                    )
            if not args.no_web:
                check_web(env)
    if failures:
        say(f"{len(failures)} check(s) failed: {failures}")
        return 1
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

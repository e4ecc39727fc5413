"""``llmconsole`` and ``supervisorctl`` on PATH, as ``./install.sh`` puts them there.

The launchers are installed by the real install.sh (``--launchers-only``) into a temporary
folder (``LLMC_BIN_DIR``), then run in a fresh process with a clean PATH and HOME, from /tmp.
A checkout is stood in for by a folder with the real install.sh, install/ and .venv linked in and
the supervisord.conf of a :class:`SupervisedStack`, so ``supervisorctl`` reaches a real
supervisord of its own and never the one of the repository.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.settings import REPO_ROOT
from tests.stackutil import wait_until
from tests.supervisedstack import SupervisedStack

PROGRAMS = ("redis", "engine", "inference_worker", "proxy_worker", "ingestion")
MARK = "# llmconsole launcher (install.sh) for "
FOREIGN = "#!/bin/sh\necho 'the system supervisorctl'\n"


def checkout(workdir: Path) -> Path:
    """``workdir`` made to look like a checkout: install.sh, install/ and .venv of the repository."""
    for name in ("install.sh", "install", ".venv"):
        (workdir / name).symlink_to(REPO_ROOT / name)
    return workdir


def install_sh(
    root: Path, bindir: Path, home: Path, *args: str, path: str = "/usr/bin:/bin"
) -> subprocess.CompletedProcess[str]:
    """``ROOT/install.sh ARGS`` with the launcher folder at ``bindir``."""
    env = {"PATH": path, "HOME": str(home), "LLMC_BIN_DIR": str(bindir)}
    return subprocess.run(
        [str(root / "install.sh"), *args], env=env, cwd=root, capture_output=True, text=True, timeout=120
    )


def typed(cmd: str, bindir: Path, home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """A command as a user types it: clean PATH and HOME, in /tmp."""
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home), **extra}
    return subprocess.run(
        ["/bin/sh", "-c", cmd], env=env, cwd="/tmp", capture_output=True, text=True, timeout=60
    )


def running_programs(status_out: str) -> dict[str, int]:
    """Program name → pid of what ``supervisorctl status`` shows as RUNNING."""
    out = {}
    for ln in status_out.splitlines():
        cols = ln.replace(",", " ").split()
        if len(cols) > 3 and cols[1] == "RUNNING" and cols[2] == "pid":
            out[cols[0]] = int(cols[3])
    return out


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisedStack]:
    st = SupervisedStack(checkout(tmp_path_factory.mktemp("checkout")))
    try:
        st.start()
        # the status lines are compared with the pids: every program must be past STARTING
        wait_until(
            lambda: all(i["statename"] == "RUNNING" for i in st.rpc().supervisor.getAllProcessInfo()),
            60,
            "every program RUNNING",
        )
    except Exception:
        st.stop()
        raise
    yield st
    st.stop()


@pytest.mark.slow
def test_commands_work_as_typed_from_anywhere(sup: SupervisedStack, tmp_path: Path) -> None:
    bindir, home = tmp_path / "bin", tmp_path / "home"
    home.mkdir()
    res = install_sh(sup.workdir, bindir, home, "--launchers-only")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"commands:       llmconsole supervisorctl  (launchers in {bindir})" in res.stdout
    for name in ("llmconsole", "supervisorctl"):
        text = (bindir / name).read_text()
        assert text.splitlines()[1] == f"{MARK}{sup.workdir}", text
        assert os.access(bindir / name, os.X_OK)

    help_ = typed("llmconsole --help", bindir, home)
    assert help_.returncode == 0 and "usage: llmconsole" in help_.stdout, help_.stderr
    status = typed("supervisorctl status", bindir, home)
    assert status.returncode == 0, status.stdout + status.stderr
    # this stack's programs: the very processes of its supervisord (not another stack's)
    assert running_programs(status.stdout) == sup.pids() and set(sup.pids()) == set(PROGRAMS), status.stdout

    # restart inference_worker as the README types it: a new process, the others untouched
    before = sup.pids()
    res = typed("supervisorctl restart inference_worker", bindir, home)
    assert "inference_worker: started" in res.stdout, res.stdout + res.stderr
    after = sup.pids()
    assert after["inference_worker"] != before["inference_worker"]
    assert {k: v for k, v in after.items() if k != "inference_worker"} == {
        k: v for k, v in before.items() if k != "inference_worker"
    }

    # a new login shell on Debian: ~/.profile puts ~/.local/bin on PATH once it exists
    local = home / ".local" / "bin"
    res = install_sh(sup.workdir, local, home, "--launchers-only")
    assert res.returncode == 0, res.stdout + res.stderr
    skel = Path("/etc/skel/.profile")
    (home / ".profile").write_text(
        skel.read_text()
        if skel.is_file()
        else 'if [ -d "$HOME/.local/bin" ] ; then PATH="$HOME/.local/bin:$PATH"; fi\n'
    )
    login = subprocess.run(
        ["bash", "-lc", "command -v supervisorctl llmconsole; supervisorctl status"],
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, cwd="/tmp", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert login.stdout.splitlines()[:2] == [str(local / "supervisorctl"), str(local / "llmconsole")], (
        login.stdout
    )
    assert running_programs(login.stdout) == sup.pids(), login.stdout + login.stderr


@pytest.mark.slow
def test_a_foreign_supervisorctl_is_left_alone_and_llmconsole_ctl_offered(
    sup: SupervisedStack, tmp_path: Path
) -> None:
    bindir, home = tmp_path / "bin", tmp_path / "home"
    bindir.mkdir()
    home.mkdir()
    (bindir / "supervisorctl").write_text(FOREIGN)
    (bindir / "supervisorctl").chmod(0o755)
    for _ in range(2):  # a re-install says the same and still leaves it alone
        res = install_sh(sup.workdir, bindir, home, "--launchers-only")
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"{bindir}/supervisorctl is another program" in res.stdout, res.stdout
        assert "llmconsole ctl restart inference_worker" in res.stdout
        assert f"commands:       llmconsole  (launchers in {bindir})" in res.stdout
        assert "supervisorctl: another program; use llmconsole ctl" in res.stdout
    assert (bindir / "supervisorctl").read_text() == FOREIGN
    assert (bindir / "llmconsole").read_text().splitlines()[1] == f"{MARK}{sup.workdir}"
    assert typed("supervisorctl status", bindir, home).stdout.strip() == "the system supervisorctl"
    # the form that always works: this stack's supervisorctl (its settings say where the socket is)
    ctl = typed("llmconsole ctl status", bindir, home, LLMC_ENV_FILE=str(sup.env_file))
    assert ctl.returncode == 0, ctl.stdout + ctl.stderr
    assert running_programs(ctl.stdout) == sup.pids() and set(sup.pids()) == set(PROGRAMS), ctl.stdout


@pytest.mark.slow
def test_stop_keeps_the_launchers_and_uninstall_removes_only_ours(tmp_path: Path) -> None:
    (tmp_path / "checkout").mkdir()
    st = SupervisedStack(checkout(tmp_path / "checkout"))
    bindir, home = tmp_path / "bin", tmp_path / "home"
    bindir.mkdir()
    home.mkdir()
    mine = {n: bindir / n for n in ("llmconsole", "supervisorctl")}
    # a launcher of another checkout of this project: re-pointed, with a word
    mine["supervisorctl"].write_text(
        f"#!/bin/sh\n{MARK}/another/checkout\nexec /another/checkout/.venv/bin/supervisorctl\n"
    )
    (bindir / "notes.txt").write_text("not ours\n")
    try:
        st.start()
        res = install_sh(st.workdir, bindir, home, "--launchers-only")
        assert (
            f"{mine['supervisorctl']} pointed at the checkout /another/checkout: now at {st.workdir}"
            in res.stdout
        )
        assert all(p.read_text().splitlines()[1] == f"{MARK}{st.workdir}" for p in mine.values())

        pid = st.rpc().supervisor.getPID()
        res = install_sh(st.workdir, bindir, home, "--stop")
        assert res.returncode == 0 and "stopped (every service and the engine)" in res.stdout, (
            res.stdout + res.stderr
        )
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert all(p.read_text().splitlines()[1] == f"{MARK}{st.workdir}" for p in mine.values())  # kept
        down = typed("supervisorctl status", bindir, home)
        assert down.returncode != 0 and str(st.var / "supervisor.sock") in down.stdout + down.stderr

        # started again, and by now someone else's supervisorctl in the folder
        st.start()
        pid = st.rpc().supervisor.getPID()
        mine["supervisorctl"].write_text(FOREIGN)
        res = install_sh(st.workdir, bindir, home, "--uninstall")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "stopped (every service and the engine)" in res.stdout
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert f"removed {bindir}/llmconsole" in res.stdout, res.stdout
        assert sorted(p.name for p in bindir.iterdir()) == ["notes.txt", "supervisorctl"]
        assert mine["supervisorctl"].read_text() == FOREIGN
        assert typed("llmconsole --help", bindir, home).returncode == 127  # gone from PATH
        again = install_sh(st.workdir, bindir, home, "--uninstall")
        assert "not running" in again.stdout and f"no launchers of this checkout in {bindir}" in again.stdout
    finally:
        st.stop()


@pytest.mark.slow  # runs install.sh's launcher step as a subprocess
def test_a_supervisorctl_earlier_on_path_is_named_and_not_claimed(tmp_path: Path) -> None:
    bindir, home, first = tmp_path / "bin", tmp_path / "home", tmp_path / "first"
    first.mkdir()
    home.mkdir()
    (first / "supervisorctl").write_text(FOREIGN)
    (first / "supervisorctl").chmod(0o755)
    res = install_sh(REPO_ROOT, bindir, home, "--launchers-only", path=f"{first}:{bindir}:/usr/bin:/bin")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (
        f"{first}/supervisorctl comes before {bindir} on PATH: 'supervisorctl' runs that one." in res.stdout
    )
    assert f"commands:       llmconsole  (launchers in {bindir})" in res.stdout
    assert "supervisorctl: another program; use llmconsole ctl ..." in res.stdout
    assert (first / "supervisorctl").read_text() == FOREIGN
    # ours is written all the same (for a PATH that puts it first), and it is this checkout's
    assert (bindir / "supervisorctl").read_text().splitlines()[1] == f"{MARK}{REPO_ROOT}"

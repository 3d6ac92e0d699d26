"""Import hygiene: `import resnet_fast` never fails for a missing `_C` or triton, and never initialises CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A None entry in sys.modules makes `import name` fail as if it were not installed.
BLOCK_IMPORTS = textwrap.dedent("""
    import sys
    for name in filter(None, sys.argv[1].split(",")):
        sys.modules[name] = None
""")


def _run(code: str, blocked: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RESNET_FAST_BACKEND", None)
    return subprocess.run([sys.executable, "-c", BLOCK_IMPORTS + textwrap.dedent(code), blocked],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_import_without_extension_and_triton_and_without_cuda_init():
    result = _run("""
        import resnet_fast, torch
        from resnet_fast import backends
        assert not torch.cuda.is_initialized(), "importing resnet_fast initialised CUDA"
        reason = backends.unavailable_reason("extension", "cpu")
        assert "not built" in reason, reason
        assert "triton is not installed" in backends.unavailable_reason("triton", "cuda")
        assert backends.resolve(None, "cpu") == "reference"
        model = resnet_fast.resnet18(num_classes=3).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 3)
        try:
            resnet_fast.conv_bn_act(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), None, None,
                                    torch.zeros(4), torch.ones(4), backend="extension")
        except resnet_fast.BackendUnavailableError as error:
            print("ERROR:", error)
        assert not torch.cuda.is_initialized(), "running on CPU initialised CUDA"
    """, blocked="resnet_fast._C,triton")
    assert result.returncode == 0, result.stderr
    assert "ERROR: backend 'extension' is not available on cpu: resnet_fast._C is not built" in result.stdout


def test_broken_extension_is_one_sentence():
    result = _run("""
        import sys, types
        broken = types.ModuleType("resnet_fast._C")
        def fail(name):
            raise OSError("undefined symbol: _ZN3c10 (simulated)")
        broken.__getattr__ = fail
        class Loader:
            def find_spec(self, name, path=None, target=None):
                if name == "resnet_fast._C":
                    raise OSError("libc10.so: cannot open shared object file (simulated)")
        sys.meta_path.insert(0, Loader())
        import resnet_fast
        from resnet_fast import _extension
        print("REASON:", _extension.load_error())
    """)
    assert result.returncode == 0, result.stderr
    assert "REASON: resnet_fast._C failed to load: OSError: libc10.so" in result.stdout


def test_cli_info_runs():
    result = subprocess.run([sys.executable, "-m", "resnet_fast.cli", "info"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "extension resnet_fast._C:" in result.stdout
    assert "reference  cpu    yes" in result.stdout
    from resnet_fast import _extension

    if _extension.build_info()["loaded"]:
        assert "CPU code avx2" in result.stdout or "CPU code avx512" in result.stdout, result.stdout
    for variable in ("RESNET_FAST_CPU_BLOCKED", "RESNET_FAST_CPU_CONV3X3", "RESNET_FAST_CPU_ACTIVATION_POOL"):
        assert f"  {variable} " in result.stdout, f"info must list {variable}:\n{result.stdout}"


def test_extension_build_info():
    """The extension loads with its CPU kernels; CI (RESNET_FAST_EXPECT_CUDA_KERNELS=1) also demands CUDA ones."""
    from resnet_fast import _extension

    info = _extension.build_info()
    if not info["loaded"]:
        pytest.skip(f"extension not built: {info['error']}")
    assert info["cpu"]
    import torch

    if sys.platform.startswith("linux") and torch._C.has_openmp:
        assert info["cpu_parallel"] == "openmp", (
            "the extension was built without OpenMP: at::parallel_for would run every CPU kernel on one thread")
    if os.environ.get("RESNET_FAST_EXPECT_CUDA_KERNELS") == "1":
        assert info["cuda"], "the CUDA kernels were not compiled although this build must have them"
        assert info["cuda_archs"], "no CUDA architecture recorded"

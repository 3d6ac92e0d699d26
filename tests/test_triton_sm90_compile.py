"""Every Triton kernel and conv autotune config compiles for sm_90 (H200), fits its shared memory and
does not spill: ``benchmarks/triton_sm90_check.py`` through its ``run_check``, no GPU needed.

The default run compiles the representative subset (``--quick``: the conv config sweeps in bf16, fp32
and tf32, one config per other flag, the element-wise kernels in bf16); the full sweep (fp16 too, every
flag in every precision, the element-wise kernels in every dtype) is marked slow.
``RESNET_FAST_SM90_CONFIGS=FILE_OR_MODULE:ATTR`` (and ``RESNET_FAST_SM90_PRUNE``) check a proposed conv
config list (and prune function) instead of the one in ``conv.py``.

Where a GPU is visible the check runs in this process. Under ``TRITON_INTERPRET=1`` (tests/conftest.py
sets it on machines without one, before the kernels are imported) it cannot: triton then decorates
every jit function as an interpreter object, its own library (``tl.sum``, ``tl.cdiv``) included, and
``triton.compile`` cannot lower those. Rebuilding ``JITFunction``s from the undecorated functions
would mean patching triton.language in place and re-importing the kernel modules (which registers
the torch.library ops twice), so ``run_check`` instead runs the same check in a child process started
without ``TRITON_INTERPRET`` and reads its JSON report back: a few seconds of Python start-up for a
check that this process's state cannot skew.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

CHECK_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "triton_sm90_check.py"
CONFIGS_ENV = "RESNET_FAST_SM90_CONFIGS"
PRUNE_ENV = "RESNET_FAST_SM90_PRUNE"


@pytest.fixture(scope="module")
def check():
    """The check module, or a skip saying what is missing (triton, its nvidia backend, ptxas)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from resnet_fast.ops import triton as triton_backend

    reason = triton_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    spec = importlib.util.spec_from_file_location("triton_sm90_check", CHECK_PATH)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body is processed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        make_backend(GPUTarget("cuda", module.TARGET_ARCH, 32))
    except Exception as error:  # noqa: BLE001 - a triton without the nvidia backend cannot run this
        pytest.skip(f"triton cannot target sm_{module.TARGET_ARCH} here ({type(error).__name__}: {error})")
    if module.find_ptxas() is None:
        pytest.skip("no ptxas (neither triton's bundled one nor /usr/local/cuda/bin/ptxas)")
    return module


def _proposal():
    return {"configs_from": os.environ.get(CONFIGS_ENV) or None, "prune_from": os.environ.get(PRUNE_ENV) or None}


def _assert_ok(check, report):
    assert report.ok, (f"sm_90 compile check failed (triton {report.triton_version}):\n"
                       f"{report.describe_failures()}\n\n{check.format_table(report.rows)}")


def test_sm90_kernels_fit_and_do_not_spill(check):
    report = check.run_check(quick=True, **_proposal())
    assert {row.kernel for row in report.rows} == set(check.discover_kernels()), "a kernel was not compiled"
    _assert_ok(check, report)


@pytest.mark.slow
def test_sm90_full_sweep(check):
    _assert_ok(check, check.run_check(**_proposal()))


def test_check_fails_rows_over_its_limits(check):
    """Limits set below what a small kernel needs (it uses shared memory and no spill) fail every row."""
    report = check.run_check(kernels=["partial_stats_kernel"], dtypes=["bf16"], shared_limit=0, spill_limit=-1)
    assert report.rows and not report.ok
    for row in report.rows:
        assert row.shared > 0 and row.registers > 0, row
        assert len(row.problems) == 2, row.problems


def test_ptxas_log_parsing(check):
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 28 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert check.parse_ptxas_log(log) == {"registers": 255, "stack": 24, "spill_stores": 28, "spill_loads": 20}
    # 255 registers x 8 warps fill the register file once; 131072 B of shared memory leaves room for one.
    assert check.blocks_per_sm(255, 131072, 8) == 1
    assert check.blocks_per_sm(64, 16384, 4) == 8

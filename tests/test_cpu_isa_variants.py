"""The ISA variants of the CPU kernels (csrc/cpu/cpu_isa.h): AVX2 and AVX-512 builds of the Winograd
convolution and the BatchNorm + residual + ReLU kernels, one chosen when the library loads.

Each variant this CPU can run is tested in its own subprocess with ``RESNET_FAST_CPU_ISA`` forced (the
choice is made once per process), against float64 with the project's rule (``tests/numerics.py``), on
odd shapes: channel counts that are not multiples of 16 or 32 (partial vectors and panels), 1x1
images, batch 1. A variant this CPU cannot run is skipped with the ISA it lacks. The error for a
request the CPU cannot meet is tested through a seam that hides AVX-512 from the detection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_fast import _extension

if _extension.extension() is None:
    pytest.skip(f"extension not built: {_extension.load_error()}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ISA_VAR = "RESNET_FAST_CPU_ISA"
HIDE_AVX512_VAR = "RESNET_FAST_CPU_ISA_TEST_HIDE_AVX512"  # test seam of csrc/cpu/isa_dispatch_cpu.cpp
CHECKS = Path(__file__).with_name("cpu_isa_variant_checks.py")  # the per-variant checks, run in subprocesses
INFO = _extension.build_info()
PANEL_COLUMNS = {"avx2": 16, "avx512": 32}

ops = torch.ops.resnet_fast


def _subprocess_env(**overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ISA_VAR, HIDE_AVX512_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(overrides)
    return env


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=_subprocess_env(**env), timeout=300)


# ------------------------------------------------------------------------------------------
# One subprocess per variant (tests/cpu_isa_variant_checks.py)


@pytest.mark.parametrize("variant", ["avx2", "avx512"])
def test_variant_kernels_match_float64(variant):
    if variant not in INFO["cpu_isa_variants"]:
        pytest.skip(f"this build of resnet_fast._C has no {variant} variant (variants: {INFO['cpu_isa_variants']})")
    if variant == "avx512" and not INFO["cpu_has_avx512"]:
        pytest.skip("this CPU lacks AVX-512 (avx512f, avx512bw, avx512vl, avx512dq with zmm state saved by the OS)")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        capture_output=True, text=True, cwd=ROOT, env=_subprocess_env(**{ISA_VAR: variant}),
        timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{ISA_VAR}={variant}: {summary}\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, f"{ISA_VAR}={variant}: {summary}"


def test_build_info_reports_the_variants():
    assert INFO["cpu_isa_variants"][0] in ("avx2", "portable"), INFO["cpu_isa_variants"]
    assert INFO["cpu_isa_error"] is None, INFO["cpu_isa_error"]
    assert INFO["cpu_isa_active"] in INFO["cpu_isa_variants"]
    assert INFO["winograd_panel_columns"] == PANEL_COLUMNS.get(INFO["cpu_isa_active"], 16)
    requested = os.environ.get(ISA_VAR, "").strip().lower() or "auto"
    if requested == "auto":
        best = "avx512" if "avx512" in INFO["cpu_isa_variants"] and INFO["cpu_has_avx512"] else INFO["cpu_isa_variants"][0]
        assert INFO["cpu_isa_active"] == best, f"auto chose {INFO['cpu_isa_active']}, expected {best}"


_PROBE = """
import json, torch
from resnet_fast import _extension
info = _extension.build_info()
error = None
try:
    torch.ops.resnet_fast.winograd_weight(torch.zeros(4, 3, 3, 3))
except RuntimeError as e:
    error = str(e).splitlines()[0]
print(json.dumps({"active": info["cpu_isa_active"], "error": info["cpu_isa_error"], "op_error": error,
                  "has_avx512": info["cpu_has_avx512"]}))
"""


def _probe(**env) -> dict:
    import json

    result = _run_python(_PROBE, **env)
    assert result.returncode == 0, f"the probe crashed (rc {result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_avx512_request_without_avx512_is_a_clear_error():
    """Forced AVX-512 on a CPU without it: every variant op raises, naming the missing ISA; no crash."""
    if "avx512" not in INFO["cpu_isa_variants"]:
        pytest.skip("this build has no avx512 variant")
    probe = _probe(**{ISA_VAR: "avx512", HIDE_AVX512_VAR: "1"})
    assert probe["active"] is None and not probe["has_avx512"]
    assert "RESNET_FAST_CPU_ISA=avx512, but this CPU cannot run AVX-512 code" in probe["error"], probe
    assert probe["op_error"] is not None and "winograd_weight: RESNET_FAST_CPU_ISA=avx512" in probe["op_error"], probe
    assert "avx512f" in probe["op_error"], probe


def test_auto_without_avx512_runs_the_baseline():
    probe = _probe(**{ISA_VAR: "auto", HIDE_AVX512_VAR: "1"})
    assert probe["active"] == INFO["cpu_isa_variants"][0] and probe["error"] is None and probe["op_error"] is None


def test_unknown_isa_value_is_a_clear_error():
    probe = _probe(**{ISA_VAR: "sse9"})
    assert probe["active"] is None
    assert probe["error"] == "RESNET_FAST_CPU_ISA must be auto, avx2 or avx512, got 'sse9'", probe
    assert probe["op_error"] is not None and "must be auto, avx2 or avx512" in probe["op_error"], probe

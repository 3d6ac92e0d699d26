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
import re
import shutil
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


# Registers and forms only AVX-512 has (EVEX): zmm, the opmask registers, xmm/ymm 16-31, broadcasts.
_AVX512_MARKERS = re.compile(r"%zmm|\{%k[1-7]\}|\bk(mov|or|and|not|shift)[a-z]*\s|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{1to\d+\}")


def test_avx512_instructions_stay_in_the_avx512_variant():
    """The baseline never runs an AVX-512 instruction, so the library works on AVX2-only CPUs.

    Both builds compile the same shared inline code (torch's headers, the standard library); setup.py
    links the variant's objects last, so the linker keeps the baseline's copy of each. Only functions
    of the variant's own namespaces (resnet_fast::avx512, at::vec::AVX512) may hold AVX-512 code.
    """
    if "avx512" not in INFO["cpu_isa_variants"]:
        pytest.skip("this build has no avx512 variant")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")
    library = _extension.extension().__file__
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True,
                             timeout=300, check=True).stdout
    offenders, variant_functions, function = set(), set(), None
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line[line.find("<") + 1:-2]
            continue
        if function and _AVX512_MARKERS.search(line):
            in_variant = "avx512" in function or "AVX512" in function
            (variant_functions if in_variant else offenders).add(function)
    assert variant_functions, "no AVX-512 code found at all: is the avx512 variant compiled with its flags?"
    assert not offenders, (f"{len(offenders)} functions outside the avx512 variant hold AVX-512 instructions, "
                           "e.g. " + "; ".join(sorted(offenders)[:5]))

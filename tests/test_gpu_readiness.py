"""What the GPU path decides, tested without a GPU: TF32, per-layer selection under
``torch.compile`` and CUDA-graph capture, untuned tiles under capture, int64 image
offsets, empty tensors and the GPU-architecture check of ``auto``.

The decisions are made on the host, so most tests drive them with the GPU-only
probes (is this stream capturing? can this device be timed?) replaced; kernels run
in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest without a GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resnet_fast import _extension, backends

ROOT = Path(__file__).resolve().parents[1]
TRITON_REASON = backends.unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend: {TRITON_REASON}")

if TRITON_REASON is None:
    from resnet_fast.ops.triton import _common, bn_act, bn_stats, conv, select


@pytest.fixture
def fp32_precision_restored():
    """Tests here set the new ``fp32_precision`` API; leave the flags consistent for the legacy readers."""
    legacy = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    root = getattr(torch.backends, "fp32_precision", None)
    yield
    if root is not None:
        torch.backends.fp32_precision = root
        torch.backends.cudnn.fp32_precision = "none"
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy


# ------------------------------------------------------------------------------------------ TF32


@needs_triton
@pytest.mark.parametrize("setting, allows", [
    ("legacy cudnn.allow_tf32=True", True),
    ("legacy cudnn.allow_tf32=False", False),
    ("cudnn.conv.fp32_precision=tf32", True),
    ("cudnn.conv.fp32_precision=ieee", False),
    ("fp32_precision=tf32, conv inherits", True),
])
def test_tf32_follows_the_convolution_setting_not_matmul(setting, allows, fp32_precision_restored):
    """The Triton conv races cuDNN's conv: both must follow cuDNN's convolution flag, whatever the matmul flag."""
    has_new_api = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")
    if "fp32_precision" in setting and not has_new_api:
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
    if setting.startswith("legacy"):
        torch.backends.cudnn.allow_tf32 = allows
    elif setting.startswith("cudnn.conv"):
        torch.backends.cudnn.conv.fp32_precision = setting.split("=")[1]
    else:
        torch.backends.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "none"
    for matmul_allows in (False, True):
        if not setting.startswith("legacy") and has_new_api:
            torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul_allows else "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = matmul_allows
        assert _common.conv_allows_tf32() is allows, f"{setting}, matmul TF32 {matmul_allows}"


@needs_triton
def test_tf32_check_does_not_raise_after_mixed_apis(fp32_precision_restored):
    """torch raises when the legacy flag is read after conv and RNN were given different new-API values."""
    if not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    assert _common.conv_allows_tf32() is False


class _RecordingLauncher:
    """Stands in for ``_common.launcher``: records which kernel would run, with which arguments."""

    def __init__(self, run: bool):
        self.launches: list[tuple[object, dict]] = []
        self.run = run

    def __call__(self, kernel):
        def with_grid(grid):
            def launch(*args, **kwargs):
                self.launches.append((kernel, kwargs))
                if self.run:
                    return kernel[grid](*args, **kwargs)
            return launch

        class Indexable:
            def __getitem__(self, grid):
                return with_grid(grid)

        return Indexable()


def _conv_inputs(channels_in=16, channels_out=16, residual=True):
    torch.manual_seed(3)
    x = torch.randn(2, channels_in, 5, 5).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels_out, channels_in, 3, 3) / (9 * channels_in) ** 0.5
    res = torch.randn(2, channels_out, 5, 5).contiguous(memory_format=torch.channels_last) if residual else None
    return x, weight, res


@needs_triton
@pytest.mark.parametrize("conv_tf32", [False, True], ids=["conv-ieee", "conv-tf32"])
def test_triton_conv_dot_precision_follows_the_convolution_flag(conv_tf32, monkeypatch, fp32_precision_restored):
    torch.backends.cudnn.allow_tf32 = conv_tf32
    torch.backends.cuda.matmul.allow_tf32 = not conv_tf32  # the old, wrong switch says the opposite
    recorder = _RecordingLauncher(run=True)
    monkeypatch.setattr(_common, "launcher", recorder)
    x, weight, residual = _conv_inputs()
    out = conv.conv_bias_act(x, conv.pack_weight(weight, 1), None, residual, (1, 1), (1, 1), (1, 1), True)
    ((_, flags),) = recorder.launches
    assert flags["DOT_IEEE"] is (not conv_tf32)
    expected = torch.relu(F.conv2d(x.double(), weight.double(), None, 1, 1) + residual.double())
    assert (out.double() - expected).abs().max().item() < 1e-4


# ------------------------------------------------------------------------ autotuning under capture


@needs_triton
def test_untuned_layer_under_graph_capture_runs_a_fixed_tile(monkeypatch):
    """The autotuner benchmarks (and synchronises) on a layer's first run: never inside a capture."""
    recorder = _RecordingLauncher(run=False)
    monkeypatch.setattr(_common, "launcher", recorder)
    monkeypatch.setattr(_common, "interpreted", lambda: False)
    monkeypatch.setattr(conv, "FORCED_CONFIG", None)
    monkeypatch.setattr(conv, "_tuned_layers", set())
    x, weight, residual = _conv_inputs()
    packed = conv.pack_weight(weight, 1)

    def run(capturing: bool):
        monkeypatch.setattr(conv, "_capturing", lambda device: capturing)
        conv.conv_bias_act(x, packed, None, residual, (1, 1), (1, 1), (1, 1), True)
        return recorder.launches[-1]

    kernel, kwargs = run(capturing=True)
    assert kernel is conv.conv2d_nhwc_kernel, "an untuned layer under capture went to the autotuner"
    fixed = conv.untuned_config(x, 16, 16)
    assert {name: kwargs[name] for name in fixed.kwargs} == fixed.kwargs
    assert (kwargs["num_warps"], kwargs["num_stages"]) == (fixed.num_warps, fixed.num_stages)
    kernel, _ = run(capturing=False)
    assert kernel is conv.conv2d_nhwc_autotuned
    kernel, _ = run(capturing=True)
    assert kernel is conv.conv2d_nhwc_autotuned, "a layer tuned eagerly must keep its tuned tile under capture"
    x_other = torch.randn(2, 16, 7, 7).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(conv, "_capturing", lambda device: True)
    conv.conv_bias_act(x_other, packed, None, None, (1, 1), (1, 1), (1, 1), True)
    assert recorder.launches[-1][0] is conv.conv2d_nhwc_kernel, "another shape is another autotune key"
    monkeypatch.setenv(conv.AUTOTUNE_ENV, "off")
    kernel, _ = run(capturing=False)
    assert kernel is conv.conv2d_nhwc_kernel, f"{conv.AUTOTUNE_ENV}=off must never autotune"
    monkeypatch.setenv(conv.AUTOTUNE_ENV, "sometimes")
    with pytest.raises(ValueError, match=conv.AUTOTUNE_ENV):
        run(capturing=False)


# ------------------------------------------------------------------------------------ selection


@pytest.fixture
def selector(monkeypatch, tmp_path):
    """The selector as on a GPU (timeable device), with a fake clock and a private disk cache."""
    monkeypatch.setenv(select.MODE_ENV, "measure")
    monkeypatch.setenv(select.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(select, "_timeable_device", lambda device: True)
    monkeypatch.setattr(select, "_compiling", lambda: False)
    monkeypatch.setattr(select, "_capturing", lambda: False)
    timed: list[str] = []

    def fake_time(fn):
        timed.append(fn())
        return {"triton": 2.0, "vendor": 1.0}[timed[-1]]

    monkeypatch.setattr(select, "_time_ms", fake_time)
    select.clear()
    yield timed
    select.clear()


CANDIDATES = {"triton": lambda: "triton", "vendor": lambda: "vendor"}
GPU = torch.device("cuda")


@needs_triton
@pytest.mark.parametrize("context", ["compile", "capture"])
def test_measured_winner_is_used_while_compiling_and_capturing(context, selector, monkeypatch):
    """A compiled or captured model takes the kernels eager measured (it used to take "triton" blindly)."""
    assert select.choose("layer", CANDIDATES, GPU) == "vendor"
    assert selector == ["triton", "vendor"]
    monkeypatch.setattr(select, "_compiling" if context == "compile" else "_capturing", lambda: True)
    assert select.choose("layer", CANDIDATES, GPU) == "vendor"
    select.clear()  # a new process: the disk cache answers
    assert select.choose("layer", CANDIDATES, GPU) == "vendor"
    assert selector == ["triton", "vendor"], "nothing may be timed while compiling or capturing"
    assert select.unmeasured() == []


@needs_triton
@pytest.mark.parametrize("context", ["compile", "capture"])
def test_unmeasured_layer_while_compiling_or_capturing_is_reported_not_timed(context, selector, monkeypatch):
    monkeypatch.setattr(select, "_compiling" if context == "compile" else "_capturing", lambda: True)
    assert select.choose("new-layer", CANDIDATES, GPU) == select.DEFAULT_CANDIDATE
    assert selector == []
    assert select.unmeasured() == ["new-layer"]


@needs_triton
def test_selection_traces_into_a_fullgraph_compile(selector, monkeypatch):
    """Under torch.compile the look-up runs once at trace time (no graph break, no file read traced)."""
    assert select.choose("layer", CANDIDATES, GPU) == "vendor"
    monkeypatch.setattr(select, "_compiling", lambda: torch.compiler.is_compiling())

    def unit(x):
        return x + 1 if select.choose("layer", CANDIDATES, GPU) == "vendor" else x - 1

    torch._dynamo.reset()
    compiled = torch.compile(unit, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(3)), torch.ones(3))
    torch._dynamo.reset()


@needs_triton
def test_layer_key_records_the_convolution_tf32_setting(fp32_precision_restored):
    from resnet_fast.ops.folding import ConvGeometry

    x, weight, _ = _conv_inputs(residual=False)
    geometry = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    torch.backends.cudnn.allow_tf32 = True
    with_tf32 = select.layer_key("infer", x, weight, geometry, False, True)
    torch.backends.cudnn.allow_tf32 = False
    without = select.layer_key("infer", x, weight, geometry, False, True)
    assert with_tf32.endswith("tf32" + "1") and without.endswith("tf32" + "0")


# ---------------------------------------------------------------------------------- empty tensors


@needs_triton
@pytest.mark.filterwarnings("ignore:var_mean.*degrees of freedom")
@pytest.mark.parametrize("case", ["stats-C0", "stats-N0", "backward-C0", "forward-C0", "conv-Cout0"])
def test_empty_tensors_launch_nothing_and_return_torch_shapes(case):
    y = torch.randn(2, 0, 5, 5) if "C0" in case else torch.randn(0, 3, 5, 5)
    if case.startswith("stats"):
        mean, var = bn_stats.batch_stats(y)
        ref_var, ref_mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        assert mean.shape == ref_mean.shape and var.shape == ref_var.shape
        assert torch.equal(mean.isnan(), ref_mean.isnan()) and torch.equal(var.isnan(), ref_var.isnan())
    elif case.startswith("backward"):
        channels = y.shape[1]
        grad_y, grad_weight, grad_bias, grad_residual = bn_act.bn_act_backward_host(
            y, y, y, torch.zeros(channels), torch.ones(channels), None, 1e-5, True, True)
        assert grad_y.shape == y.shape and grad_residual.shape == y.shape
        assert grad_weight.shape == grad_bias.shape == (channels,)
    elif case.startswith("forward"):
        out = bn_act.bn_act_forward_host(y, torch.zeros(0), torch.ones(0), None, None, None, 1e-5, True)
        assert out.shape == y.shape
    else:
        x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
        out = conv.conv_bias_act(x, conv.pack_weight(torch.randn(0, 8, 3, 3), 1), None, None,
                                 (1, 1), (1, 1), (1, 1), True)
        assert out.shape == (2, 0, 5, 5)


# ------------------------------------------------------------------------------- int64 offsets

_INT64_SCRIPT = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from resnet_fast.ops.triton import bn_act, bn_stats, conv

    CHANNELS, HEIGHT, WIDTH = 3, 2, 2
    STRIDE_N = 2**30 + 8  # int32; image 2 starts past 2**31 elements
    torch.manual_seed(0)

    def far_apart(values):
        """(3, C, H, W) images 2**30 elements apart in one fp16 storage (4 GiB, mostly never touched)."""
        storage = torch.empty(2 * STRIDE_N + CHANNELS * HEIGHT * WIDTH, dtype=torch.float16)
        view = storage.as_strided((3, CHANNELS, HEIGHT, WIDTH), (STRIDE_N, HEIGHT * WIDTH, WIDTH, 1))
        view.copy_(values)
        return view

    def check(name, got, want):
        error = (got.double() - want.double()).abs().max().item()
        assert error < 1e-2, f"{name}: max error {error}"
        print(name, "ok")

    y = torch.randn(3, CHANNELS, HEIGHT, WIDTH).half()
    mean, var = torch.randn(CHANNELS), torch.rand(CHANNELS) + 0.5
    which = os.environ["CASE"]
    if which == "forward":
        out = bn_act.bn_act_forward_host(far_apart(y), mean, var, None, None, far_apart(y), 1e-5, True)
        check(which, out, bn_act.bn_act_forward_host(y, mean, var, None, None, y, 1e-5, True))
    elif which == "stats":
        for got, want in zip(bn_stats.batch_stats(far_apart(y)), bn_stats.batch_stats(y)):
            check(which, got, want)
    elif which == "backward":
        got = bn_act.bn_act_backward_host(far_apart(y), y, far_apart(y), mean, var, None, 1e-5, False, True)
        want = bn_act.bn_act_backward_host(y, y, y, mean, var, None, 1e-5, False, True)
        for g, w in zip(got, want):
            check(which, g, w)
    elif which == "conv-residual":
        x = torch.randn(3, CHANNELS, HEIGHT, WIDTH).half().contiguous(memory_format=torch.channels_last)
        weight = conv.pack_weight(torch.randn(CHANNELS, CHANNELS, 1, 1).half(), 1)
        got = conv.conv_bias_act(x, weight, None, far_apart(y), (1, 1), (0, 0), (1, 1), True)
        check(which, got, conv.conv_bias_act(x, weight, None, y, (1, 1), (0, 0), (1, 1), True))
''')


@needs_triton
@pytest.mark.parametrize("case", ["forward", "stats", "backward", "conv-residual"])
def test_image_offsets_past_two_to_the_31_elements(case):
    """int32 image * stride wraps past 2**31 elements: reads land outside the tensor (a crash in the
    interpreter, wrong numbers on a GPU). Run in a child process, so a crash fails only this test."""
    env = dict(os.environ, CASE=case, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _INT64_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, (f"exit {done.returncode} (-11 = a read outside the tensor)\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    assert f"{case} ok" in done.stdout


# ------------------------------------------------------------------------ GPU architecture check


@pytest.mark.parametrize("archs, capability, runs", [
    ("9.0+PTX", (9, 0), True),
    ("9.0+PTX", (10, 0), True),   # PTX: the driver compiles it for newer GPUs
    ("9.0+PTX", (8, 0), False),
    ("9.0", (10, 0), False),      # a cubin runs only within its major version
    ("8.0", (8, 6), True),
    ("8.6", (8, 0), False),
    ("9.0a", (9, 0), True),
    ("9.0a+PTX", (10, 0), False),  # arch-specific features exist on 9.0 only
    ("7.5;8.0;9.0", (8, 9), True),
    ("7.5 8.0", (12, 0), False),
    ("", (8, 0), True),           # unknown: not held against the GPU
])
def test_kernel_image_reason(archs, capability, runs):
    reason = backends.kernel_image_reason(archs, capability)
    assert (reason is None) is runs, reason
    if not runs:
        assert f"{capability[0]}.{capability[1]}" in reason and archs in reason


def test_auto_falls_back_when_the_gpu_needs_another_architecture(monkeypatch):
    """A build made without a GPU targets 9.0+PTX; on an A100 auto must say so and run the reference."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(_extension, "load_error", lambda: None)
    monkeypatch.setattr(_extension, "build_info",
                        lambda: {"loaded": True, "cpu": True, "cuda": True, "cuda_archs": "9.0+PTX"})
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(backends, "_gpu_arch_reasons", {})
    reason = backends.unavailable_reason("extension", "cuda")
    assert reason is not None and "9.0+PTX" in reason and "8.0" in reason
    assert backends.resolve(None, "cuda") == "reference"
    with pytest.raises(backends.BackendUnavailableError, match="TORCH_CUDA_ARCH_LIST=8.0"):
        backends.resolve("extension", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(backends, "_gpu_arch_reasons", {})
    assert backends.resolve(None, "cuda") == "extension"

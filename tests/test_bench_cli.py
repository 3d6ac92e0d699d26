"""`resnet-fast bench` and `benchmarks/gpu_check.sh --dry-run`, on tiny CPU workloads."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_fast import bench
from resnet_fast.cli import CommandError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "resnet18", "--batch-size", "1", "--image-size", "32", "--iterations", "1", "--warmup", "0",
        "--peers", "none", "--device", "cpu"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_module_level_imports_are_light() -> None:
    """`resnet-fast --help` must not pay for torchvision, matplotlib or the ONNX peers."""
    code = ("import sys, resnet_fast.bench; heavy = [m for m in ('torchvision', 'matplotlib', 'onnxruntime', "
            "'openvino', 'onnx') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_registers_bench() -> None:
    from resnet_fast import cli

    assert ("bench", "resnet_fast.bench") in [(name, module) for name, module, _ in cli._COMMANDS]
    assert callable(bench.add_arguments) and callable(bench.run)


@pytest.mark.slow
def test_tiny_bench_run_writes_json_plot_and_small_error(tmp_path: Path) -> None:
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = subprocess.run([sys.executable, "-m", "resnet_fast.bench", *TINY, "--json", str(json_path),
                             "--plot", str(plot_path)], capture_output=True, text=True, env=_env(), cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"max abs error ([0-9.e+-]+), relative error ([0-9.e+-]+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) < 1e-3 and float(match.group(2)) < 1e-4, result.stdout
    assert "torchvision eager (NCHW)" in result.stdout and "FastResNet" in result.stdout
    assert "bench: " in result.stderr  # progress lines go to stderr

    report = json.loads(json_path.read_text())
    for field in ("date", "machine", "device", "dtype", "batch_size", "image_size", "torch", "model",
                  "max_abs_error", "relative_error", "results"):
        assert field in report, field
    assert report["model"] == "resnet18" and report["batch_size"] == 1 and report["dtype"] == "float32"
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    assert report["machine"]["cpu_count"] >= 1
    rows = {row["key"]: row for row in report["results"]}
    assert {"stock-nchw", "stock-channels-last", "fast-auto"} <= set(rows)
    assert not any(key.startswith("peer-") for key in rows)  # --peers none
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["ms_per_batch"] > 0 and row["images_per_s"] > 0 and row["first_output_s"] > 0
        assert row["max_abs_error"] < 1e-3
    assert rows["stock-nchw"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet7"], "--model 'resnet7' is unknown"),
    (["--dtype", "float16", "--device", "cpu"], "float16 is not supported on cpu"),
    (["--dtype", "int8"], "--dtype 'int8' is unknown"),
    (["--peers", "tvm"], "unknown peer(s) tvm"),
    (["--backend", "magic"], "--backend 'magic' is unknown"),
    (["--batch-size", "0", "--device", "cpu"], "--batch-size must be at least 1"),
    (["--image-size", "8", "--device", "cpu"], "--image-size must be at least 32"),
    (["--mode", "train", "--batch-size", "1", "--device", "cpu"], "needs --batch-size of at least 2"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--json", "/no/such/folder/out.json", "--device", "cpu"], "does not exist"),
], ids=["model", "dtype-on-device", "dtype", "peer", "backend", "batch", "image-size", "train-batch", "device",
        "json-folder"])
def test_bad_input_is_one_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        bench.config_from_args(_parse(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(CommandError, match="no CUDA device is visible"):
        bench.config_from_args(_parse(["--device", "cuda"]))


def test_unavailable_backend_says_why() -> None:
    if bench.backends.is_available("triton", "cpu"):
        pytest.skip("triton runs on this CPU (TRITON_INTERPRET=1)")
    with pytest.raises(CommandError, match="--backend triton is not available on cpu: .*triton"):
        bench.config_from_args(_parse(["--backend", "triton", "--device", "cpu"]))


def test_cpu_defaults_are_the_documented_job() -> None:
    config = bench.config_from_args(_parse(["--device", "cpu"]))
    assert (config.model, config.batch_size, config.image_size, config.dtype) == ("resnet50", 8, 224, torch.float32)
    assert "compile" not in config.peers  # ~40 s of compilation: opt-in on CPU
    assert config.backends == ["auto"]
    everything = bench.config_from_args(_parse(["--device", "cpu", "--peers", "compile,jit", "--backend", "all"]))
    assert everything.peers == ["compile", "jit"] and "reference" in everything.backends


def test_check_summary_from_partial_results(tmp_path: Path) -> None:
    steps = tmp_path / "steps.tsv"
    steps.write_text("build\tok\t0\t12.5\tpip install\nbenchmarks\ttimeout\t124\t150.0\tpytest benchmarks\n")
    pytest_json = tmp_path / "pb.json"
    pytest_json.write_text(json.dumps({"benchmarks": [
        {"group": "block-eval:layer1.0.conv2 3x3 64@56", "name": "a", "params": {"provider": "stock"},
         "stats": {"median": 0.002}, "extra_info": {"provider": "stock", "images_per_s": 500.0, "tflops": 1.0}},
        {"group": "block-eval:layer1.0.conv2 3x3 64@56", "name": "b", "params": {"provider": "fused-extension"},
         "stats": {"median": 0.001}, "extra_info": {"provider": "fused-extension", "images_per_s": 1000.0}},
    ]}))
    stem = tmp_path / "2026-01-01-test"
    bench.write_check_summary(str(stem), str(steps), str(tmp_path / "missing-cli.json"), str(pytest_json),
                              str(tmp_path / "timed-out-step.json"))
    summary = json.loads((stem.with_suffix(".json")).read_text())
    assert [s["verdict"] for s in summary["steps"]] == ["ok", "timeout"]
    rows = summary["benchmarks"]["block-eval:layer1.0.conv2 3x3 64@56"]
    assert rows[1]["speedup_vs_stock"] == pytest.approx(2.0)
    markdown = stem.with_suffix(".md").read_text()
    assert "| benchmarks | timeout (exit 124) | 150 |" in markdown and "fused-extension" in markdown


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("build", "tests", "bench-blocks", "bench-models", "bench-cli", "summary"):
        assert f"== {step}" in result.stdout, result.stdout
    assert "would run: pip install --no-build-isolation --no-deps -e ." in result.stdout
    summaries = list(tmp_path.glob("*-dry-run-cpu.json"))
    assert len(summaries) == 1, list(tmp_path.iterdir())
    summary = json.loads(summaries[0].read_text())
    assert {s["step"]: s["verdict"] for s in summary["steps"]} == {
        "build": "ok", "tests": "ok", "bench-blocks": "ok", "bench-models": "ok", "bench-cli": "ok"}
    assert summary["bench_cli"]["model"] == "resnet18"
    assert any(group.startswith("block-eval:layer4.1.conv2") for group in summary["benchmarks"])
    assert any(group.startswith("model-train:resnet18") for group in summary["benchmarks"])
    assert summaries[0].with_suffix(".md").exists()

"""`resnet-fast bench` and `benchmarks/gpu_check.sh --dry-run`, on tiny CPU workloads; inference of `bench`,
`eval` and the training loop's validation under `torch.inference_mode()`."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

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


def _gpu_check_report():
    spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "benchmarks" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_report_from_partial_results(tmp_path: Path) -> None:
    """A run cut short leaves some raw files out and a half-written last line: the report still comes out."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "steps.tsv").write_text("build\tok\t0\t12.5\tpip install\t120\n"
                                   "bench-blocks\ttimeout\t124\t60.0\tpytest benchmarks\t60\n")
    lines = [
        {"group": "block-eval:layer1.0.conv2 3x3 64@56", "name": "a", "params": {"provider": "stock"},
         "stats": {"median": 0.002}, "extra_info": {"provider": "stock", "images_per_s": 500.0, "tflops": 1.0}},
        {"group": "block-eval:layer1.0.conv2 3x3 64@56", "name": "b", "params": {"provider": "fused-extension"},
         "stats": {"median": 0.001}, "extra_info": {"provider": "fused-extension", "images_per_s": 1000.0}},
    ]
    (raw / "benchmarks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"group": "cut')
    (raw / "tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="1.5"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="2.0"><failure message="assert 1 == 2">x</failure>'
        '</testcase><testcase classname="tests.test_a" name="test_skip" time="0"><skipped message="no"/></testcase>'
        '</testsuite></testsuites>')
    stem = tmp_path / "2026-01-01-test"
    _gpu_check_report().main(["--raw", str(raw), "--stem", str(stem)])
    summary = json.loads(stem.with_suffix(".json").read_text())
    assert [s["verdict"] for s in summary["steps"]] == ["ok", "timeout"]
    rows = summary["benchmarks"]["block-eval:layer1.0.conv2 3x3 64@56"]
    assert rows[1]["speedup_vs_stock"] == pytest.approx(2.0)
    assert (summary["tests"]["passed"], summary["tests"]["failed"], summary["tests"]["skipped"]) == (1, 1, 1)
    markdown = stem.with_suffix(".md").read_text()
    assert "| bench-blocks | timeout (exit 124) | 60 | 60 |" in markdown and "fused-extension" in markdown
    assert "FAILED `tests.test_a::test_bad`: assert 1 == 2" in markdown


def test_gpu_check_report_print_is_cut_to_fit_the_reply(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    entry = {"group": "g" * 200, "name": "n", "params": {}, "stats": {"median": 0.001},
             "extra_info": {"provider": "p" * 200}}
    (raw / "benchmarks.jsonl").write_text((json.dumps(entry) + "\n") * 200)
    _gpu_check_report().main(["--raw", str(raw), "--stem", str(tmp_path / "r"), "--print"])
    printed = capsys.readouterr().out
    assert len(printed) < 12_000 and "cut at 9000 characters" in printed
    assert len((tmp_path / "r.md").read_text()) > 50_000  # the file keeps everything


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("build", "tests", "bench-cli", "bench-compile", "bench-blocks", "summary"):
        assert f"== {step}" in result.stdout, result.stdout
    assert "would run: MAX_JOBS=$(nproc) pip install --no-build-isolation --no-deps -e ." in result.stdout
    assert len(result.stdout) < 12_000  # the GPU machine's reply keeps the last 12,000 characters
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) <= 8, files  # what one device run can bring back
    assert all(len(path.relative_to(tmp_path).parts) <= 2 and path.stat().st_size < 16 << 20 for path in files)
    summaries = list(tmp_path.glob("*-dry-run-cpu.json"))
    assert len(summaries) == 1, files
    summary = json.loads(summaries[0].read_text())
    assert {s["step"]: s["verdict"] for s in summary["steps"]} == {
        "build": "ok", "tests": "ok", "bench-cli": "ok", "bench-compile": "ok", "bench-blocks": "ok"}
    assert summary["tests"]["passed"] > 0 and summary["tests"]["failed"] == 0
    assert summary["bench_cli"]["model"] == "resnet18"
    assert any(row["label"].startswith("torch.jit") for row in summary["bench_compile"]["results"])
    assert any(group.startswith("block-eval:layer4.1.conv2") for group in summary["benchmarks"])
    assert summaries[0].with_suffix(".md").exists()


# --------------------------------------------------------------------------------------------------------------------
# Inference runs under torch.inference_mode() (what users run), training with autograd: a global forward hook records,
# for every call of a whole model (torchvision ResNet or FastResNet), the grad mode it ran in.

MODEL_CLASSES = ("ResNet", "FastResNet")


@contextlib.contextmanager
def model_forward_modes() -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def record(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        if type(module).__name__ in MODEL_CLASSES:
            calls.append({"model": type(module).__name__, "training": module.training,
                          "inference_mode": torch.is_inference_mode_enabled(), "grad": torch.is_grad_enabled()})

    handle = torch.nn.modules.module.register_module_forward_hook(record)  # copies and converted models too
    try:
        yield calls
    finally:
        handle.remove()


def test_bench_eval_times_every_forward_under_inference_mode(capsys: pytest.CaptureFixture) -> None:
    """`resnet-fast bench` (eval): the accuracy check, first call, warm-up and timed rounds, of every provider."""
    with model_forward_modes() as calls:
        assert bench.run(_parse([*TINY, "--warmup", "1"])) == 0
    assert "FastResNet" in capsys.readouterr().out
    counts = {name: sum(call["model"] == name for call in calls) for name in MODEL_CLASSES}
    # Per provider (two torchvision, one FastResNet): first call + 1 warm-up + 1 timed round; plus one forward of
    # each in the accuracy check.
    assert counts == {"ResNet": 2 * 3 + 1, "FastResNet": 3 + 1}, calls
    outside = [call for call in calls if not call["inference_mode"] or call["training"]]
    assert not outside, f"bench eval forwards outside torch.inference_mode(): {outside}"


@pytest.mark.slow
def test_bench_train_times_steps_with_autograd(capsys: pytest.CaptureFixture) -> None:
    """`resnet-fast bench --mode train` stays a real training step: grad enabled, never inference mode."""
    with model_forward_modes() as calls:
        assert bench.run(_parse([*TINY, "--mode", "train", "--batch-size", "2"])) == 0
    capsys.readouterr()
    assert calls and not any(call["inference_mode"] for call in calls), calls
    steps = [call for call in calls if call["grad"]]
    assert sum(call["model"] == "FastResNet" for call in steps) >= 1 + 1, calls  # first call + 1 timed round
    assert all(call["training"] for call in steps), calls


def test_eval_cli_runs_the_model_under_inference_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`resnet-fast eval` on a torchvision checkpoint: warm-up and every test batch under inference_mode."""
    import torchvision

    from resnet_fast.cli import main

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    with model_forward_modes() as calls:
        status = main(["eval", "--checkpoint", str(path), "--data", "digits", "--batch-size", "180",
                       "--device", "cpu", "--json", str(tmp_path / "eval.json")])
    assert status == 0, capsys.readouterr()
    assert json.loads((tmp_path / "eval.json").read_text())["images"] == 360
    assert [call["model"] for call in calls] == ["FastResNet"] * 3, calls  # warm-up + 2 batches of 180
    outside = [call for call in calls if not call["inference_mode"] or call["training"]]
    assert not outside, f"resnet-fast eval forwards outside torch.inference_mode(): {outside}"


def test_training_validates_under_inference_mode_and_trains_on(tmp_path: Path) -> None:
    """`resnet-fast train`: each epoch's validation under inference_mode; training after it still has autograd
    (nothing made under inference_mode is used by the next epoch's steps)."""
    import numpy as np
    from PIL import Image

    from resnet_fast.train.loop import TrainConfig, train

    rng = np.random.default_rng(0)  # a 16-image folder of 2 colour classes: 2 epochs of one 8x8 step
    for label, colour in enumerate(((220, 40, 40), (40, 40, 220))):
        (tmp_path / f"class_{label}").mkdir()
        for i in range(8):
            pixels = np.clip(rng.normal(colour, 40, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"class_{label}" / f"{i:02d}.png")
    config = TrainConfig(data="imagefolder", data_dir=str(tmp_path), image_size=8, batch_size=16, epochs=2, lr=0.05)
    with model_forward_modes() as calls:
        result = train(config, device="cpu", progress=False, log=lambda message: None)
    assert len(result.history) == 2 and all(math.isfinite(loss) for loss in result.losses)
    evaluations = [i for i, call in enumerate(calls) if not call["training"]]
    steps = [i for i, call in enumerate(calls) if call["training"]]
    assert evaluations and steps and min(evaluations) < max(steps), calls  # epoch 2 trains after epoch 1's validation
    assert all(calls[i]["inference_mode"] for i in evaluations), f"validation outside inference_mode: {calls}"
    assert all(calls[i]["grad"] and not calls[i]["inference_mode"] for i in steps), calls

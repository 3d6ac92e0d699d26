"""The training / evaluation workflow: data, loop, checkpoints, resume, CLI errors, backends.

Runs are tiny (resnet18 with the 3x3 stem on 8x8 images, a few steps, or a
30-image folder) so the whole file stays well under a few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple

import pytest
import torch

from resnet_fast import backends
from resnet_fast.cli import main
from resnet_fast.train import checkpoint as ckpt
from resnet_fast.train.data import DataError, augment_batch, load_data, prepare_batch
from resnet_fast.train.loop import TrainConfig, make_scheduler, train
from tests.numerics import errors

QUIET = dict(progress=False, log=lambda message: None)


def make_image_folder(root, classes: int = 3, per_class: int = 10, size: int = 8, split: bool = False) -> str:
    """A tiny class-per-folder PNG data set whose classes differ by colour (learnable in a few steps)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]
    subsets = [("train", per_class), ("val", max(per_class // 3, 1))] if split else [("", per_class)]
    for subset, count in subsets:
        for c in range(classes):
            folder = os.path.join(root, subset, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colours[c], 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


def tiny_config(data_dir: str, **overrides) -> TrainConfig:
    values = dict(data="imagefolder", data_dir=data_dir, image_size=8, batch_size=8, epochs=2, lr=0.05,
                  backend="reference")
    values.update(overrides)
    return TrainConfig(**values)


def sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert status != 0, f"expected a failure, got exit status {status}"
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in the error line {lines[0]!r}"


# --------------------------------------------------------------------------------------------- data


def test_digits_split_is_seeded_stratified_and_resized():
    first = load_data("digits", image_size=16, seed=0)
    again = load_data("digits", image_size=16, seed=0)
    other = load_data("digits", image_size=16, seed=1)
    assert first.num_classes == 10
    assert first.train.images.shape[1:] == (3, 16, 16) and first.train.images.dtype == torch.uint8
    assert len(first.train) + len(first.test) == 1797
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.test.labels, again.test.labels)
    assert not torch.equal(first.test.labels, other.test.labels), "another seed should give another split"
    train_share = torch.bincount(first.train.labels, minlength=10) / len(first.train)
    test_share = torch.bincount(first.test.labels, minlength=10) / len(first.test)
    assert (train_share - test_share).abs().max() < 0.02, "the split should be stratified"


def test_image_folder_split_and_train_val_layout(tmp_path):
    flat = load_data("imagefolder", make_image_folder(tmp_path / "flat"), image_size=8, seed=0)
    assert flat.num_classes == 3 and len(flat.train) + len(flat.test) == 30
    image, label = flat.train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and 0 <= label < 3
    split = load_data("imagefolder", make_image_folder(tmp_path / "split", split=True), image_size=8)
    assert (len(split.train), len(split.test)) == (30, 9)


def test_cifar10_batches_are_read(tmp_path):
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        with open(tmp_path / name, "wb") as handle:
            pickle.dump(batch, handle)
    bundle = load_data("cifar10", str(tmp_path))
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (20, 4, 10)
    assert bundle.train.images.shape[1:] == (3, 32, 32)


def test_augmentation_is_a_seeded_crop_and_flip():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    first = augment_batch(images, torch.Generator().manual_seed(3), padding=0)
    again = augment_batch(images, torch.Generator().manual_seed(3), padding=0)
    assert torch.equal(first, again)
    for out, original in zip(first, images):  # with no padding: the image itself or its mirror
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))


def test_lr_schedules():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factors = {}
    for name in ("none", "cosine", "step"):
        scheduler = make_scheduler(optimizer, name, total_steps=8)
        factors[name] = [scheduler.lr_lambdas[0](step) for step in range(9)]
    assert factors["none"] == [1.0] * 9
    assert factors["cosine"][0] == 1.0 and factors["cosine"][4] == pytest.approx(0.5) and factors["cosine"][8] == 0
    assert factors["step"] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.01])


# --------------------------------------------------------------------------------------------- runs


def test_cli_train_then_eval_on_digits(tmp_path, capsys):
    out, report = tmp_path / "run", tmp_path / "metrics.json"
    status, stdout, _ = run_cli(capsys, "train", "--image-size", "8", "--batch-size", "16", "--max-steps", "3",
                                "--backend", "reference", "--out", str(out), "--json", str(report), "--quiet")
    assert status == 0
    assert "test acc" in stdout and "best test accuracy" in stdout, f"no summary table in:\n{stdout}"
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    metrics = json.loads(report.read_text())
    row = metrics["epochs"][0]
    assert set(row) >= {"loss", "train_acc", "test_acc", "images_per_s", "seconds"}
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["config"]["arch"] == "resnet18" and saved["config"]["small_input"] is True
    assert saved["config"]["num_classes"] == 10 and saved["step"] == 3

    status, stdout, _ = run_cli(capsys, "eval", "--checkpoint", str(out / "last.pt"), "--json",
                                str(tmp_path / "eval.json"), "--backend", "reference")
    assert status == 0 and "top-1" in stdout and "top-5" in stdout
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["images"] == 360
    assert evaluated["top1"] == pytest.approx(row["test_acc"]), "eval should reproduce the run's test accuracy"


def _state_dicts_equal(first: dict, second: dict, what: str) -> None:
    assert first.keys() == second.keys(), f"{what}: different keys"
    for key in first:
        a, b = first[key], second[key]
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f"{what}: {key} differs (max abs diff {(a.double() - b.double()).abs().max()})"
        elif isinstance(a, dict):
            _state_dicts_equal(a, b, f"{what}.{key}")
        else:
            assert a == b, f"{what}: {key} differs ({a!r} vs {b!r})"


@pytest.mark.parametrize("schedule, first_run", [
    pytest.param("none", dict(epochs=1), id="epochs1-then-resume-to-2"),
    pytest.param("cosine", dict(max_steps=5), id="stopped-mid-epoch-2-then-resumed"),
])
def test_resume_continues_bitwise(tmp_path, schedule, first_run):
    data_dir = make_image_folder(tmp_path / "images")
    full_dir, split_dir = str(tmp_path / "full"), str(tmp_path / "split")
    # (first + resumed == full also shows that the same seed gives the same numbers)
    full = train(tiny_config(data_dir, lr_schedule=schedule), out_dir=full_dir, **QUIET)

    first = train(tiny_config(data_dir, lr_schedule=schedule, **first_run), out_dir=split_dir, **QUIET)
    resumed_config = TrainConfig.from_dict(torch.load(os.path.join(split_dir, "last.pt"),
                                                      weights_only=True)["config"])
    resumed_config.epochs, resumed_config.max_steps = 2, None
    second = train(resumed_config, out_dir=split_dir, resume=os.path.join(split_dir, "last.pt"), **QUIET)

    assert first.losses + second.losses == full.losses, "losses of the resumed run differ from the full run"
    assert [row["loss"] for row in second.history] == [row["loss"] for row in full.history]
    assert [row["test_acc"] for row in second.history] == [row["test_acc"] for row in full.history]
    full_state = torch.load(os.path.join(full_dir, "last.pt"), weights_only=True)
    split_state = torch.load(os.path.join(split_dir, "last.pt"), weights_only=True)
    _state_dicts_equal(full_state["model"], split_state["model"], "model")
    _state_dicts_equal(full_state["optimizer"]["state"], split_state["optimizer"]["state"], "optimizer")
    assert full_state["step"] == split_state["step"] and full_state["epoch"] == split_state["epoch"] == 2


def test_checkpoints_interoperate_with_torchvision(tmp_path, capsys):
    import torchvision

    data_dir = make_image_folder(tmp_path / "images")
    train(tiny_config(data_dir, epochs=1, max_steps=2), out_dir=str(tmp_path / "run"), **QUIET)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)

    # FastResNet checkpoint -> torchvision (strict), same outputs.
    tv_model = torchvision.models.resnet18(num_classes=3)
    tv_model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv_model.maxpool = torch.nn.Identity()
    tv_model.load_state_dict(saved["model"], strict=True)
    fast = ckpt.build_model("resnet18", 3, small_input=True)
    fast.set_backend("reference")
    ckpt.load_model_weights(fast, saved["model"])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fast.eval()(x), tv_model.eval()(x), rtol=1e-4, atol=1e-4)

    # torchvision checkpoints, raw and as {"model": ...}, -> FastResNet (strict) and `resnet-fast eval`.
    tv_state = tv_model.state_dict()
    for name, payload in (("raw.pt", tv_state), ("wrapped.pt", {"model": tv_state})):
        torch.save(payload, tmp_path / name)
        loaded = ckpt.load_checkpoint(str(tmp_path / name))
        ckpt.load_model_weights(ckpt.build_model("resnet18", 3, small_input=True), loaded["model"])
        status, stdout, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path / name), "--data", "imagefolder",
                                      "--data-dir", data_dir, "--image-size", "8", "--backend", "reference")
        assert status == 0, err
        assert "resnet18" in stdout and "top-1" in stdout


@pytest.mark.parametrize("factory", ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet34"])
def test_architecture_is_read_off_torchvision_weights(factory):
    import torchvision

    with torch.device("meta"):
        state = getattr(torchvision.models, factory)(num_classes=7).state_dict()
    config = ckpt.infer_model_config(state)
    assert ckpt.arch_name_for(config) == factory
    assert config["num_classes"] == 7 and config["small_input"] is False


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, fragments", [
    pytest.param(["train", "--data", "cifar10", "--data-dir", "/nonexistent/cifar"], ["/nonexistent/cifar",
                                                                                     "does not exist"],
                 id="missing-dir"),
    pytest.param(["train", "--data", "imagefolder"], ["--data-dir"], id="no-data-dir"),
    pytest.param(["train", "--arch", "resnet19"], ["unknown arch", "resnet19"], id="unknown-arch"),
    pytest.param(["train", "--backend", "fastest"], ["unknown backend", "fastest"], id="unknown-backend"),
    pytest.param(["train", "--data", "mnist"], ["unknown data set", "mnist"], id="unknown-data"),
    pytest.param(["eval", "--checkpoint", "/nonexistent/last.pt"], ["/nonexistent/last.pt", "does not exist"],
                 id="missing-checkpoint"),
    pytest.param(["train", "--amp", "fp16", "--device", "cpu"], ["fp16", "CUDA"], id="fp16-on-cpu"),
])
def test_bad_command_lines_fail_with_one_line(capsys, argv, fragments):
    status, _, err = run_cli(capsys, *argv)
    assert_one_line_error(status, err, *fragments)


def test_wrong_data_formats(tmp_path, capsys):
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"this is not a pickle")
    status, _, err = run_cli(capsys, "train", "--data", "cifar10", "--data-dir", str(cifar))
    assert_one_line_error(status, err, "data_batch_1", "not a CIFAR-10 python batch")

    empty = tmp_path / "empty"
    empty.mkdir()
    status, _, err = run_cli(capsys, "train", "--data", "cifar10", "--data-dir", str(empty))
    assert_one_line_error(status, err, "no CIFAR-10 python batches", "--download")
    status, _, err = run_cli(capsys, "train", "--data", "imagefolder", "--data-dir", str(empty))
    assert_one_line_error(status, err, "no class subfolders")

    broken = tmp_path / "broken"
    for name in ("a", "b"):
        (broken / name).mkdir(parents=True)
        for i in range(3):
            (broken / name / f"{i}.png").write_bytes(b"not a png")
    # In a DataLoader worker too: the worker's traceback is reduced to the one-line reason.
    status, _, err = run_cli(capsys, "train", "--data", "imagefolder", "--data-dir", str(broken), "--image-size",
                             "8", "--workers", "1", "--quiet", "--backend", "reference")
    assert_one_line_error(status, err, "cannot read image", ".png")


def test_debug_flag_shows_the_traceback(capsys):
    with pytest.raises(DataError):
        main(["--debug", "train", "--data", "cifar10", "--data-dir", "/nonexistent/cifar"])


def test_bad_checkpoints_fail_cleanly_and_never_touch_existing_ones(tmp_path, capsys):
    data_dir = make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    train(tiny_config(data_dir, epochs=1, max_steps=1), out_dir=str(out), **QUIET)
    last = str(out / "last.pt")
    before = sha256(last)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(last, "rb").read()[:1000])
    cases = [
        (["train", "--resume", str(corrupt), "--out", str(out)], ["cannot read checkpoint", "corrupt.pt"]),
        (["train", "--resume", str(truncated), "--out", str(out)], ["cannot read checkpoint", "truncated.pt"]),
        (["eval", "--checkpoint", str(corrupt)], ["cannot read checkpoint"]),
        (["train", "--resume", last, "--arch", "resnet34"], ["--arch resnet34", "does not match"]),
        # another class count: the 3-class checkpoint on the 10-class digits
        (["eval", "--checkpoint", last, "--data", "digits", "--image-size", "8"], ["3 output classes", "10"]),
        # a fresh run into a folder with a checkpoint must not clobber it
        (["train", "--out", str(out), "--data", "imagefolder", "--data-dir", data_dir], ["already exists",
                                                                                         "--overwrite"]),
        # bad data with --overwrite fails before anything is written
        (["train", "--out", str(out), "--overwrite", "--data", "cifar10", "--data-dir", str(tmp_path / "nope")],
         ["does not exist"]),
    ]
    for argv, fragments in cases:
        status, _, err = run_cli(capsys, *argv)
        assert_one_line_error(status, err, *fragments)
        assert sha256(last) == before, f"{' '.join(argv)} changed the existing last.pt"

    # A checkpoint of another architecture names both sides.
    resnet34_state = ckpt.build_model("resnet34", 3, small_input=True).state_dict()
    with pytest.raises(ckpt.CheckpointError, match="holds a resnet34 with 3 classes.*does not fit resnet18"):
        ckpt.load_model_weights(ckpt.build_model("resnet18", 3, small_input=True), resnet34_state, "other.pt",
                                "resnet18")


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt.save_atomic({"model": {"w": torch.ones(3)}}, path)
    before = sha256(path)

    def interrupted_save(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"model": {"w": torch.zeros(3)}}, path)
    assert sha256(path) == before, "an interrupted save replaced the checkpoint"
    assert os.listdir(tmp_path) == ["last.pt"], "an interrupted save left a temporary file behind"


def test_best_checkpoint_keeps_its_contents_when_last_is_rewritten(tmp_path):
    last, best = str(tmp_path / "last.pt"), str(tmp_path / "best.pt")
    ckpt.save_atomic({"model": {"w": torch.ones(2)}}, last)
    ckpt.link_or_copy_atomic(last, best)
    ckpt.save_atomic({"model": {"w": torch.zeros(2)}}, last)
    assert torch.equal(torch.load(best, weights_only=True)["model"]["w"], torch.ones(2))
    assert torch.equal(torch.load(last, weights_only=True)["model"]["w"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_amp_bf16_on_cpu_follows_float32(tmp_path):
    data_dir = make_image_folder(tmp_path / "images")
    full = train(tiny_config(data_dir, epochs=1, max_steps=2), **QUIET)
    mixed = train(tiny_config(data_dir, epochs=1, max_steps=2, amp="bf16"), **QUIET)
    assert all(torch.isfinite(torch.tensor(mixed.losses))), mixed.losses
    # The first step's loss differs only by bf16 rounding of the forward pass.
    assert mixed.losses[0] == pytest.approx(full.losses[0], rel=0.05), (mixed.losses, full.losses)


# --------------------------------------------------------------------------------------------- backends


class _Run(NamedTuple):
    losses: list[float]
    # Per step, the parameters its loss was computed with, flattened, in float64 (empty unless asked for).
    params: list[torch.Tensor]


def _train_steps(backend: str, model_factory, dtype: torch.dtype, batch_size: int, steps: int,
                 channels_last: bool = False, keep_params: bool = False) -> _Run:
    """The first ``steps`` SGD steps (the CLI's optimiser settings) on fixed digits batches.

    ``channels_last`` lays out the model and the batches as ``train(channels_last=True)`` does.
    """
    bundle = load_data("digits", image_size=8, seed=0)
    torch.manual_seed(0)
    model = model_factory().to(dtype)
    model.set_backend(backend)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    run = _Run([], [])
    for step in range(steps):
        if keep_params:
            run.params.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
        index = torch.arange(step * batch_size, (step + 1) * batch_size) % len(bundle.train)
        x = prepare_batch(bundle.train.images[index], bundle.mean, bundle.std, torch.device("cpu"),
                          channels_last).to(dtype)
        loss = torch.nn.functional.cross_entropy(model(x), bundle.train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.losses.append(loss.item())
    return run


def _first_steps_losses(backend: str, model_factory, dtype: torch.dtype, batch_size: int,
                        steps: int = 20) -> list[float]:
    """Losses of the first ``steps`` SGD steps (the CLI's optimiser settings) on fixed digits batches."""
    return _train_steps(backend, model_factory, dtype, batch_size, steps).losses


def _losses_table(digits: int = 5, **runs: list[float]) -> str:
    return "\n".join(f"{name:>13}: {[round(v, digits) for v in values]}" for name, values in runs.items())


def _skip_unless_available(backend: str) -> None:
    reason = backends.unavailable_reason(backend, "cpu")
    if reason is not None:
        pytest.skip(f"backend {backend!r} not available on cpu: {reason}")


def _resnet18_small() -> torch.nn.Module:
    return ckpt.build_model("resnet18", 10, small_input=True)


def test_extension_training_follows_reference_float64():
    """float64: rounding cannot hide behind the chaos of training, so the 20 losses must agree to ~1e-9.

    (In float32 a 1-ulp nudge of the weights already moves the loss by ~1e-3 after 3 steps and by
    10-50% after 20, for the reference itself: see the float32 test below.)
    """
    _skip_unless_available("extension")
    expected = _first_steps_losses("reference", _resnet18_small, torch.float64, batch_size=16)
    actual = _first_steps_losses("extension", _resnet18_small, torch.float64, batch_size=16)
    for step, (got, want) in enumerate(zip(actual, expected)):
        assert got == pytest.approx(want, rel=1e-9), f"step {step}\n" + _losses_table(extension=actual,
                                                                                      reference=expected)


def _tiny_resnet() -> torch.nn.Module:
    from resnet_fast.models.resnet import BasicBlock, FastResNet

    return FastResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, small_input=True)


# ------------------------------------------------------------------- float32 trajectories vs float64
#
# The project's tolerance rule (tests/numerics.py) along a training trajectory. Every float32 run
# starts from the same weights as a float64 run of the reference backend and sees the same batches;
# at step s its error against float64 (of the loss, and of the parameters that loss was computed
# with, as max abs and relative L2 error) may be at most twice the largest error the stock float32
# run (reference backend, contiguous) has had at steps 0..s, plus a floor of a few float32 ulps.
# No tolerance is measured on one machine: every CPU brings its own stock error. (The BN running
# statistics are left to the unit tests: PyTorch's own channels_last batch norm accumulates them with
# over twice the error of its contiguous one on AVX-512.)
#
# Trajectories are short, because float32 training stops being comparable with a 2x rule after a
# few steps: with 10^5-10^6 ReLU inputs per step, sooner or later one lies within float32 rounding of
# 0, decides differently than in float64, and the backward pass of that step takes another gradient;
# from then on the error is ~100x the rounding (parameters: ~1e-7 -> 1e-5..1e-4 relative, the loss
# one step later: ~1e-6 -> 1e-5..1e-2) and grows chaotically. That step depends on the rounding, so
# on the CPU, the conv algorithm and the layout: for resnet18 (batch 16) the stock run on AVX2 takes
# another gradient at its second step already (runs nudged by an ulp sometimes at their first); for
# the tiny net (batch 8) no run, on AVX2 or AVX-512, did before its sixth. So the float32 trajectories
# are the tiny net's, over 5 steps: resnet18's would have to stop after 2, and even then a ReLU that
# flips in the first backward (3 of 24 ulp-nudged runs did) would fail a correct kernel on some
# machine. resnet18's kernels are held to float64 instead (test_extension_training_follows_reference_float64).

FLOAT32_EPS = torch.finfo(torch.float32).eps
TRAJECTORY_FACTOR = 2.0
# The floors, in float32 ulps: of the loss (16 ulps, 2e-6 relative: its forward pass rounds through
# ~20 layers, and one sample of the stock error, at step 0 say, can be far below that), and of the
# parameters (1 ulp of the largest one, and 1e-7 relative: storing the updated parameters in float32
# alone rounds each by up to half an ulp per step).
LOSS_FLOOR_ULPS = 16
PARAMS_FLOOR_ULPS = 1
# model: (factory, batch size, steps compared)
TRAJECTORIES = {"tiny": (_tiny_resnet, 8, 5)}


def _trajectory_errors(run: _Run, ref64: _Run) -> list[dict[str, float]]:
    """Per step, ``run``'s errors against ``ref64``: the loss's absolute error, the parameters' max abs
    and relative L2 error."""
    assert len(run.losses) == len(ref64.losses) and len(run.params) == len(ref64.params) == len(run.losses)
    rows = []
    for step, (loss, loss64) in enumerate(zip(run.losses, ref64.losses)):
        max_abs, rel = errors(run.params[step], ref64.params[step])
        rows.append({"loss": abs(loss - loss64), "params max abs": max_abs, "params rel": rel})
    return rows


def _trajectory_floors(ref64: _Run, step: int) -> dict[str, float]:
    return {"loss": LOSS_FLOOR_ULPS * FLOAT32_EPS * abs(ref64.losses[step]),
            "params max abs": PARAMS_FLOOR_ULPS * FLOAT32_EPS * ref64.params[step].abs().max().item(),
            "params rel": PARAMS_FLOOR_ULPS * FLOAT32_EPS}


def _errors_table(stock: list[dict[str, float]], limits: list[dict[str, float]],
                  candidates: dict[str, list[dict[str, float]]]) -> str:
    names = ["stock", "allowed", *candidates]
    lines = [f"{'step':>4}  {'error of':<16}" + "".join(f"{name:>14}" for name in names)]
    for step, row in enumerate(stock):
        for what in row:
            values = [row[what], limits[step][what], *(rows[step][what] for rows in candidates.values())]
            lines.append(f"{step:>4}  {what:<16}" + "".join(f"{value:>14.3e}" for value in values))
    return "\n".join(lines)


def _assert_trajectories_follow_float64(ref64: _Run, stock: _Run, **candidates: _Run) -> None:
    """Each candidate's error against ``ref64``, at every step and in every measure, is at most
    TRAJECTORY_FACTOR x the stock run's largest error so far, plus the floor (NaN never passes)."""
    stock_errors = _trajectory_errors(stock, ref64)
    limits, envelope = [], {}
    for step, row in enumerate(stock_errors):
        envelope = {what: max(envelope.get(what, 0.0), error) for what, error in row.items()}
        floors = _trajectory_floors(ref64, step)
        limits.append({what: TRAJECTORY_FACTOR * envelope[what] + floors[what] for what in row})
    candidate_errors = {name: _trajectory_errors(run, ref64) for name, run in candidates.items()}
    table = _errors_table(stock_errors, limits, candidate_errors)
    print(f"errors against float64 (allowed: {TRAJECTORY_FACTOR:g} x the stock error so far + floor)\n{table}")
    failures = [f"step {step}: {name} {what} error {error:.3e} > allowed {limits[step][what]:.3e} "
                f"(stock {stock_errors[step][what]:.3e})"
                for name, rows in candidate_errors.items() for step, row in enumerate(rows)
                for what, error in row.items() if not error <= limits[step][what]]
    if failures:
        losses = _losses_table(8, float64=ref64.losses, stock=stock.losses,
                               **{name: run.losses for name, run in candidates.items()})
        raise AssertionError(f"{failures[0]}" + (f" and {len(failures) - 1} more" if len(failures) > 1 else "")
                             + f"\nerrors against float64:\n{table}\nlosses:\n{losses}")


def _float64_and_stock(model: str) -> tuple[_Run, _Run, tuple]:
    factory, batch_size, steps = TRAJECTORIES[model]
    ref64 = _train_steps("reference", factory, torch.float64, batch_size, steps, keep_params=True)
    stock = _train_steps("reference", factory, torch.float32, batch_size, steps, keep_params=True)
    return ref64, stock, (factory, torch.float32, batch_size, steps)


@pytest.mark.parametrize("backend, model", [
    pytest.param("extension", "tiny", id="extension-tiny"),
    pytest.param("triton", "tiny", id="triton-tiny", marks=[pytest.mark.triton, pytest.mark.slow]),
])
def test_backend_training_follows_reference_float32(backend, model):
    """float32 training with a backend's kernels follows float64 as closely as stock PyTorch's does."""
    _skip_unless_available(backend)
    ref64, stock, settings = _float64_and_stock(model)
    fused = _train_steps(backend, *settings, keep_params=True)
    _assert_trajectories_follow_float64(ref64, stock, **{backend: fused})


@pytest.mark.parametrize("model", list(TRAJECTORIES))
def test_channels_last_matches_contiguous(model):
    """channels_last training (other conv algorithms) follows float64 as closely as contiguous does."""
    ref64, stock, settings = _float64_and_stock(model)
    nhwc = _train_steps("reference", *settings, channels_last=True, keep_params=True)
    _assert_trajectories_follow_float64(ref64, stock, channels_last=nhwc)

"""The training loop behind ``resnet-fast train`` (and the evaluation behind ``resnet-fast eval``).

The classic ResNet recipe: SGD with momentum 0.9 and weight decay 5e-4,
cross-entropy, loss and train accuracy per epoch, test accuracy after each
epoch, an optional cosine or step learning-rate schedule (per optimizer step).

:func:`train` reads top-down: check the settings, load what to resume, build the run
(:mod:`resnet_fast.train.steps`), then per epoch train, evaluate, log and checkpoint. The
settings and result types live in :mod:`resnet_fast.train.config`, the samplers in
:mod:`resnet_fast.train.sampling`; this module re-exports them.

Determinism: the model is initialised from ``seed``; the sampler draws each
epoch's permutation from its own generator and augmentation uses another, both
saved in checkpoints, so a resumed run continues bitwise where it stopped (on
CPU, where ``torch.use_deterministic_algorithms`` is switched on for the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from resnet_fast import backends
from resnet_fast.train import checkpoint as ckpt
from resnet_fast.train.config import (AMP_DTYPES, LR_SCHEDULES, MODEL_FIELDS, TrainConfig, TrainResult, autocast,
                                      check_amp, check_config, resolve_device)
from resnet_fast.train.data import DataBundle, load_data, prepare_batch
from resnet_fast.train.distributed import DistributedContext, init_from_env, sum_across
from resnet_fast.train.sampling import EpochSampler, ShardSampler, make_test_loader
from resnet_fast.train.steps import (build_run, check_resumed_settings, checkpoint_payload, epoch_row,
                                     load_resume_state, make_scheduler, save_checkpoint, train_epoch)

__all__ = ["TrainConfig", "TrainResult", "EpochSampler", "ShardSampler", "train", "evaluate", "make_scheduler",
           "LR_SCHEDULES", "AMP_DTYPES", "MODEL_FIELDS", "resolve_device", "check_amp", "format_summary",
           "write_json", "make_test_loader"]


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the duration of a run, restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def evaluate(model: nn.Module, loader: DataLoader, bundle: DataBundle, device: torch.device,
             amp: Optional[str] = None, channels_last: bool = False,
             context: Optional[DistributedContext] = None, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Loss, top-k accuracies (in %) and images/s of ``model`` (eval mode, under ``torch.inference_mode()``)
    over ``loader``.

    Only Python floats and the (normal) ``totals`` tensor leave the inference block, so a training loop can go
    on training ``model`` afterwards: the model's cached BN folds are built outside inference mode.
    """
    context = context or DistributedContext()
    model.eval()
    ks = [k for k in topk if k <= bundle.num_classes] or [1]
    totals = torch.zeros(2 + len(ks), dtype=torch.float64)  # loss sum, count, correct@k...
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in loader:
            x = prepare_batch(images, bundle.mean, bundle.std, device, channels_last)
            labels = labels.to(device)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            totals[0] += float(F.cross_entropy(logits, labels, reduction="sum"))
            totals[1] += labels.numel()
            top = logits.topk(max(ks), dim=1).indices
            hits = top == labels[:, None]
            for i, k in enumerate(ks):
                totals[2 + i] += float(hits[:, :k].any(dim=1).sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = sum_across(totals, context)
    count = max(float(totals[1]), 1.0)
    result = {"loss": float(totals[0]) / count, "images": int(totals[1]), "seconds": seconds,
              "images_per_s": float(totals[1]) / max(seconds, 1e-9)}
    for i, k in enumerate(ks):
        result[f"top{k}"] = 100.0 * float(totals[2 + i]) / count
    return result


def _resolve_model_settings(config: TrainConfig, bundle: DataBundle) -> TrainConfig:
    """``config`` with the data's image size and class count, and the defaults that depend on them, filled in."""
    small_input = config.small_input if config.small_input is not None else bundle.image_size <= 64
    if config.num_classes is not None and config.num_classes != bundle.num_classes:
        raise ckpt.CheckpointError(f"the model has {config.num_classes} classes but --data {config.data} has "
                                   f"{bundle.num_classes}")
    augment = bundle.augment if config.augment is None else config.augment
    return dataclasses.replace(config, image_size=bundle.image_size, small_input=small_input,
                               num_classes=bundle.num_classes, augment=augment)


def train(config: TrainConfig, *, out_dir: Optional[str] = None, resume: Optional[str] = None,
          device: Optional[str] = None, workers: int = 0, progress: bool = False,
          log: Callable[[str], None] = print, download: bool = False,
          overwrite: bool = True) -> TrainResult:
    """Train a FastResNet as ``config`` says; checkpoints into ``out_dir`` after each epoch (main process).

    ``resume``: a checkpoint of a previous run, continued exactly (model, optimizer,
    schedule, step, RNG states); ``config`` must then come from that checkpoint.
    Under ``torchrun`` each process trains on its shard with DistributedDataParallel.
    """
    try:
        device_type = torch.device(device).type if device not in (None, "auto") else \
            ("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:  # an unknown device name: resolve_device() below explains it
        device_type = "cpu"
    context = init_from_env(device_type)
    try:
        return _train(config, context, out_dir, resume, device, workers, progress, log, download, overwrite)
    finally:
        context.shutdown()


def _train(config: TrainConfig, context: DistributedContext, out_dir: Optional[str], resume: Optional[str],
           device_name: Optional[str], workers: int, progress: bool, log: Callable[[str], None], download: bool,
           overwrite: bool) -> TrainResult:
    """:func:`train` inside its process group: check, restore, build, then train and checkpoint epoch by epoch."""
    device = resolve_device(device_name, context)
    check_config(config, device, context, log)
    state = load_resume_state(resume, out_dir, overwrite)
    bundle = load_data(config.data, config.data_dir, config.image_size, config.seed, download=download)
    config = _resolve_model_settings(config, bundle)
    if state is not None:
        check_resumed_settings(state["config"], config, resume)
    with deterministic_algorithms(device.type == "cpu"):
        run = build_run(config, bundle, device, context, out_dir, state, resume)
        if run.start_epoch >= config.epochs:
            log(f"{resume} has already trained {run.start_epoch} of {config.epochs} epochs; pass --epochs N "
                f"(N > {run.start_epoch}) to train further")
            return run.result
        eval_loader = make_test_loader(bundle, config.batch_size, workers, device, context)
        if context.is_main:
            log(f"training {config.arch} (small_input={config.small_input}, {config.num_classes} classes) on "
                f"{bundle.description}; {device}, backend {backends.resolve(config.backend, device)}"
                f"{f', {context.world_size} processes' if context.enabled else ''}"
                f"{', sync-BN' if context.enabled and config.sync_bn else ''}")
        started = time.perf_counter()
        for index in range(run.start_epoch, config.epochs):
            epoch = train_epoch(run, index, bundle, device, context, workers, progress)
            test = evaluate(run.model, eval_loader, bundle, device, config.amp, config.channels_last, context)
            row = epoch_row(epoch, test, run.step)
            run.result.history.append(row)
            is_best = test["top1"] > run.result.best_test_acc  # best_test_acc starts below 0: the first is best
            if is_best:
                run.result.best_test_acc = test["top1"]
            if context.is_main:
                log(f"epoch {index + 1}/{config.epochs}{' (partial)' if not epoch.complete else ''}: "
                    f"loss {row['loss']:.4f}  train acc {row['train_acc']:.2f}%  test acc {row['test_acc']:.2f}%  "
                    f"{row['images_per_s']:.0f} img/s  {epoch.seconds:.1f} s")
                if out_dir is not None:
                    save_checkpoint(checkpoint_payload(run, epoch, test), out_dir, is_best)
            context.barrier()
            if epoch.stopped:
                break
        run.result.steps = run.step
        run.result.seconds = time.perf_counter() - started
    return run.result


def format_summary(result: TrainResult) -> str:
    """A plain-text table of the per-epoch metrics."""
    header = f"{'epoch':>5}  {'loss':>8}  {'train acc':>9}  {'test acc':>8}  {'img/s':>8}  {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for row in result.history:
        mark = "*" if row.get("partial") else " "
        lines.append(f"{row['epoch']:>4}{mark}  {row['loss']:>8.4f}  {row['train_acc']:>8.2f}%  "
                     f"{row['test_acc']:>7.2f}%  {row['images_per_s']:>8.0f}  {row['seconds']:>8.1f}")
    if any(row.get("partial") for row in result.history):
        lines.append("* partial epoch (stopped by --max-steps)")
    lines.append(f"best test accuracy {result.best_test_acc:.2f}%, {result.steps} steps, {result.seconds:.1f} s")
    return "\n".join(lines)


def write_json(result: TrainResult, path: str) -> None:
    """The per-epoch metrics as JSON, written atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w") as handle:
        json.dump(result.to_json(), handle, indent=2)
        handle.write("\n")
    os.replace(tmp_path, path)

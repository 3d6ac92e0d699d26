"""The steps of one training run that :func:`resnet_fast.train.loop.train` strings together.

Check a checkpoint to resume from (:func:`load_resume_state`, :func:`check_resumed_settings`), build the run's
model, DDP wrapper, optimizer, schedule and data order (:func:`build_run`, restored from the checkpoint when
resuming), train an epoch (:func:`train_epoch`), turn it into a history row (:func:`epoch_row`) and a
checkpoint (:func:`checkpoint_payload`, :func:`save_checkpoint`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_fast.ops import activation_pool
from resnet_fast.train import checkpoint as ckpt
from resnet_fast.train.config import LR_SCHEDULES, MODEL_FIELDS, TrainConfig, TrainResult, autocast
from resnet_fast.train.data import DataBundle, prepare_batch
from resnet_fast.train.distributed import DistributedContext, enable_sync_bn, sum_across
from resnet_fast.train.sampling import EpochSampler, train_loader

__all__ = ["make_scheduler", "load_resume_state", "check_resumed_settings", "Run", "build_run", "EpochStats",
           "train_epoch", "epoch_row", "checkpoint_payload", "save_checkpoint"]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: constant, cosine to 0, or x0.1 at 50% and 75% of ``total_steps``.

    Closed-form in the step count, so the schedule resumes exactly from ``last_epoch``.
    """
    total = max(int(total_steps), 1)
    if schedule == "none":
        def factor(step: int) -> float:
            return 1.0
    elif schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif schedule == "step":
        def factor(step: int) -> float:
            return 0.1 ** sum(step >= milestone for milestone in (total // 2, (3 * total) // 4))
    else:
        raise ValueError(f"unknown --lr-schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_resume_state(resume: Optional[str], out_dir: Optional[str], overwrite: bool) -> Optional[dict[str, Any]]:
    """The checkpoint ``--resume`` names (None for a new run); a new run refuses to overwrite ``out_dir/last.pt``
    unless ``overwrite``."""
    state = ckpt.load_checkpoint(resume) if resume is not None else None
    if state is not None and not {"config", "optimizer", "step"} <= state.keys():
        raise ckpt.CheckpointError(f"{resume} holds model weights only; --resume needs a checkpoint written by "
                                   "resnet-fast train (with optimizer state and step)")
    if out_dir is not None and state is None and not overwrite:
        existing = os.path.join(out_dir, "last.pt")
        if os.path.exists(existing):
            raise ValueError(f"{existing} already exists; pass --resume {existing} to continue that run or "
                             f"--overwrite to start a new one there")
    return state


def check_resumed_settings(saved: dict[str, Any], config: TrainConfig, resume: Optional[str]) -> None:
    """A resumed run keeps the network and data it was trained with (:data:`MODEL_FIELDS`)."""
    changed = [f"{name} {saved.get(name)!r} -> {getattr(config, name)!r}" for name in MODEL_FIELDS
               if saved.get(name) != getattr(config, name)]
    if changed:
        raise ckpt.CheckpointError(f"{resume} was trained with other settings than this run "
                                   f"({'; '.join(changed)})")


@dataclass
class Run:
    """The live state of one training run, built by :func:`build_run` and advanced by :func:`train_epoch`."""

    config: TrainConfig
    model: nn.Module                   # the FastResNet: evaluated and checkpointed
    train_model: nn.Module             # ``model``, or its DistributedDataParallel wrapper: what the steps call
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Optional[torch.amp.GradScaler]  # fp16 only
    sampler: EpochSampler
    augment_generator: Optional[torch.Generator]
    result: TrainResult
    step: int = 0                      # optimizer steps so far, over the whole run
    start_epoch: int = 0
    partial: Optional[dict[str, Any]] = None  # the interrupted epoch a checkpoint resumes: samples, totals, seconds


def build_run(config: TrainConfig, bundle: DataBundle, device: torch.device, context: DistributedContext,
              out_dir: Optional[str], state: Optional[dict[str, Any]], resume: Optional[str]) -> Run:
    """Model, DDP wrapper, optimizer, schedule, data order and generators of a run; restored from ``state`` when
    resuming. The order of construction is part of the run's determinism: keep it."""
    model = _build_model(config, device, context, state, resume)
    train_model = _ddp_wrapper(model, device, context)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    sampler = EpochSampler(len(bundle.train), config.seed, context.world_size, context.rank)
    steps_per_epoch = math.ceil(sampler.per_replica / config.batch_size)
    scheduler = make_scheduler(optimizer, config.lr_schedule, steps_per_epoch * config.epochs)
    augment_generator = torch.Generator().manual_seed(config.seed + 1) if config.augment else None
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    run = Run(config, model, train_model, optimizer, scheduler, scaler, sampler, augment_generator,
              TrainResult(config=config, out_dir=out_dir))
    if state is not None:
        _restore(run, state)
    return run


def _build_model(config: TrainConfig, device: torch.device, context: DistributedContext,
                 state: Optional[dict[str, Any]], resume: Optional[str]) -> nn.Module:
    """The FastResNet of ``config`` on ``device``: seeded weights (or the checkpoint's), layout, sync-BN."""
    torch.manual_seed(config.seed)  # same initial weights in every process (DDP also broadcasts them)
    model = ckpt.build_model(config.arch, config.num_classes, config.small_input)  # type: ignore[arg-type]
    model.set_backend(config.backend)
    if state is not None:
        ckpt.load_model_weights(model, state["model"], resume or "checkpoint", config.arch)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if context.enabled and config.sync_bn:
        enable_sync_bn(model)
    return model


def _ddp_wrapper(model: nn.Module, device: torch.device, context: DistributedContext) -> nn.Module:
    """``model`` in DistributedDataParallel under torchrun; ``model`` itself in a single process."""
    if not context.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _restore(run: Run, state: dict[str, Any]) -> None:
    """Continue where checkpoint ``state`` stopped: optimizer, schedule, scaler, step, history, RNG states, and
    the sample order of an epoch it interrupted."""
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.step = int(state["step"])
    run.start_epoch = int(state["epoch"])
    run.result.history = [row for row in state.get("history", []) if not row.get("partial")]
    run.result.best_test_acc = float(state.get("best_test_acc", -1.0))
    run.partial = state.get("partial")
    ckpt.restore_rng_state(state["rng"], run.sampler.generator, run.augment_generator)
    if run.partial is not None:
        run.sampler.replay_epoch(state["rng"]["sampler_epoch_start"], skip=run.partial["samples"])


@dataclass
class EpochStats:
    """What one epoch (or the part of it before ``--max-steps``) did."""

    index: int                 # 0-based
    totals: Tensor             # loss sum, correct, images: this process (float64)
    global_totals: Tensor      # the same over all processes
    seconds: float             # training time, including the part before a resume
    samples_done: int          # of this process's shard
    complete: bool
    stopped: bool              # --max-steps reached


def train_epoch(run: Run, index: int, bundle: DataBundle, device: torch.device, context: DistributedContext,
                workers: int, progress: bool) -> EpochStats:
    """Train epoch ``index`` (the rest of it, when a checkpoint interrupted it) and sum its totals over processes."""
    config = run.config
    partial, run.partial = run.partial, None  # only the first epoch of a resumed run continues a partial one
    if partial is None:
        run.sampler.new_epoch()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images (this process)
    seconds = 0.0
    if partial is not None:
        totals = torch.tensor(partial["totals"], dtype=torch.float64)
        seconds = float(partial["seconds"])
    samples_done = run.sampler.skip
    loader = train_loader(bundle, run.sampler, config.batch_size, workers, device)
    bar = _progress_bar(len(loader), f"epoch {index + 1}/{config.epochs}", progress and context.is_main)
    run.model.train()
    stopped = False
    epoch_start = time.perf_counter()
    for images, labels in loader:
        x = prepare_batch(images, bundle.mean, bundle.std, device, config.channels_last, run.augment_generator)
        labels = labels.to(device, non_blocking=True)
        loss, logits = _train_step(run, x, labels, device)
        samples_done += labels.numel()
        loss_value = float(loss.detach())
        run.result.losses.append(loss_value)
        totals[0] += loss_value * labels.numel()
        totals[1] += float((logits.detach().argmax(dim=1) == labels).sum())
        totals[2] += labels.numel()
        if bar is not None:
            elapsed = seconds + time.perf_counter() - epoch_start
            bar.update(1)
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{100 * totals[1] / totals[2]:.1f}%",
                            img_s=f"{totals[2] * context.world_size / max(elapsed, 1e-9):.0f}")
        if config.max_steps is not None and run.step >= config.max_steps:
            stopped = True
            break
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds += time.perf_counter() - epoch_start
    return EpochStats(index, totals, sum_across(totals, context), seconds, samples_done,
                      complete=samples_done >= run.sampler.per_replica, stopped=stopped)


def _train_step(run: Run, x: Tensor, labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """One optimizer step (and schedule step) on a batch; returns the loss and the logits."""
    # The whole step in the model's CPU activation pool: backward and optimizer buffers too.
    with activation_pool.model_scope(run.model, x):
        with autocast(device, run.config.amp):
            logits = run.train_model(x)
            loss = F.cross_entropy(logits.float(), labels)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return loss, logits


def epoch_row(epoch: EpochStats, test: dict[str, float], step: int) -> dict[str, Any]:
    """The history row of an epoch: loss and train accuracy over all processes, test metrics, throughput."""
    images = max(float(epoch.global_totals[2]), 1.0)
    row = {"epoch": epoch.index + 1, "loss": float(epoch.global_totals[0]) / images,
           "train_acc": 100.0 * float(epoch.global_totals[1]) / images, "test_acc": test["top1"],
           "test_loss": test["loss"], "images_per_s": images / max(epoch.seconds, 1e-9), "seconds": epoch.seconds,
           "steps": step}
    if not epoch.complete:
        row["partial"] = True
    return row


def checkpoint_payload(run: Run, epoch: EpochStats, test: dict[str, float]) -> dict[str, Any]:
    """Everything :func:`_restore` needs to continue the run exactly after ``epoch`` (also after a partial one)."""
    return {
        "format": ckpt.FORMAT,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "epoch": epoch.index + 1 if epoch.complete else epoch.index,
        "step": run.step,
        "rng": dict(ckpt.capture_rng_state(run.sampler.generator, run.augment_generator),
                    sampler_epoch_start=run.sampler.epoch_start_state),
        "partial": None if epoch.complete else {"samples": epoch.samples_done, "totals": epoch.totals.tolist(),
                                                "seconds": epoch.seconds},
        "config": run.config.to_dict(),
        "history": run.result.history,
        "best_test_acc": run.result.best_test_acc,
        "test": test,
    }


def save_checkpoint(payload: dict[str, Any], out_dir: str, is_best: bool) -> None:
    """``out_dir/last.pt``, atomically; ``best.pt`` points at it when this epoch has the best test accuracy."""
    ckpt.save_atomic(payload, os.path.join(out_dir, "last.pt"))
    if is_best:
        ckpt.link_or_copy_atomic(os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt"))


def _progress_bar(total: int, description: str, enabled: bool) -> Any:
    """A tqdm bar of an epoch's steps on stderr, or None (tqdm is imported only when a bar is shown)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True, unit="step")

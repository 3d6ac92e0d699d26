"""The training loop behind ``resnet-fast train`` (and the evaluation behind ``resnet-fast eval``).

The classic ResNet recipe: SGD with momentum 0.9 and weight decay 5e-4,
cross-entropy, loss and train accuracy per epoch, test accuracy after each
epoch, an optional cosine or step learning-rate schedule (per optimizer step).

Determinism: the model is initialised from ``seed``; the sampler draws each
epoch's permutation from its own generator and augmentation uses another, both
saved in checkpoints, so a resumed run continues bitwise where it stopped (on
CPU, where ``torch.use_deterministic_algorithms`` is switched on for the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from resnet_fast.ops import activation_pool
from resnet_fast.train import checkpoint as ckpt
from resnet_fast.train.data import DataBundle, load_data, prepare_batch
from resnet_fast.train.distributed import DistributedContext, enable_sync_bn, init_from_env, sum_across

__all__ = ["TrainConfig", "TrainResult", "EpochSampler", "ShardSampler", "train", "evaluate", "make_scheduler",
           "LR_SCHEDULES", "AMP_DTYPES", "resolve_device", "format_summary", "write_json", "make_test_loader"]

LR_SCHEDULES = ("none", "cosine", "step")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that define the network or its data: a resumed run must not change them.
MODEL_FIELDS = ("arch", "data", "image_size", "small_input", "num_classes")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint as ``config``)."""

    arch: str = "resnet18"
    data: str = "digits"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None  # None: the data set's default (digits 8, cifar10 32, imagefolder 224)
    small_input: Optional[bool] = None  # None: True for images up to 64x64 (3x3 stem, no max-pool)
    num_classes: Optional[int] = None  # None: from the data
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    seed: int = 0
    amp: Optional[str] = None  # None, "bf16" or "fp16"
    channels_last: bool = False
    backend: Optional[str] = None
    sync_bn: bool = False
    augment: Optional[bool] = None  # None: the data set's default (crop + flip for cifar10 / image folders)
    max_steps: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class TrainResult:
    """What a run produced: per-epoch metrics, the best test accuracy and where checkpoints went."""

    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    best_test_acc: float = -1.0  # -1: nothing evaluated yet
    steps: int = 0
    seconds: float = 0.0
    out_dir: Optional[str] = None
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process's batch

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "epochs": self.history, "best_test_acc": self.best_test_acc,
                "final_test_acc": self.history[-1]["test_acc"] if self.history else None, "steps": self.steps,
                "seconds": self.seconds}


class EpochSampler(Sampler[int]):
    """Shuffled indices, one shard per process (``DistributedSampler`` semantics) and resumable mid-epoch.

    Each epoch's permutation is drawn from ``generator``; :attr:`epoch_start_state`
    is the generator's state before that draw, so a checkpoint can replay the
    epoch. Every process uses the same seed, hence the same permutation; the
    list is padded (by wrapping) to a multiple of ``num_replicas``.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start_state = self.generator.get_state()
        self.skip = 0
        self._order: Optional[list[int]] = None
        self.per_replica = math.ceil(size / num_replicas)

    def new_epoch(self, skip: int = 0) -> None:
        """Draw this epoch's order; ``skip`` leaves out the first samples of this shard (mid-epoch resume)."""
        self.epoch_start_state = self.generator.get_state()
        order = torch.randperm(self.size, generator=self.generator).tolist()
        total = self.per_replica * self.num_replicas
        order += order[: total - len(order)]
        self._order = order[self.rank:total:self.num_replicas]
        self.skip = skip

    def replay_epoch(self, state: torch.Tensor, skip: int) -> None:
        """Restore the order of an epoch that a checkpoint interrupted."""
        self.generator.set_state(state)
        self.new_epoch(skip)

    def __iter__(self) -> Iterator[int]:
        if self._order is None:
            self.new_epoch()
        return iter(self._order[self.skip:])  # type: ignore[index]

    def __len__(self) -> int:
        return self.per_replica - self.skip


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: each test sample evaluated by exactly one process."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def resolve_device(name: Optional[str], context: Optional[DistributedContext] = None) -> torch.device:
    """``--device`` -> a torch.device (default: CUDA when available); one CUDA device per local rank."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"resnet_fast trains on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", context.local_rank if context is not None else 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


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


def _autocast(device: torch.device, amp: Optional[str]) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _check_amp(amp: Optional[str], device: torch.device) -> None:
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; choose bf16 or fp16")
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 runs on CUDA only; use --amp bf16 on the CPU")


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
            with _autocast(device, amp):
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


def _progress_bar(total: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True, unit="step")


def _train_loader(bundle: DataBundle, sampler: Sampler, batch_size: int, workers: int,
                  device: torch.device) -> DataLoader:
    return DataLoader(bundle.train, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))  # keeps the loader off the global RNG


def make_test_loader(bundle: DataBundle, batch_size: int, workers: int, device: torch.device,
                context: Optional[DistributedContext] = None) -> DataLoader:
    """Sequential loader over this process's shard of the test split."""
    context = context or DistributedContext()
    sampler = ShardSampler(len(bundle.test), context.world_size, context.rank)
    return DataLoader(bundle.test, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda")


def _resolve_model_settings(config: TrainConfig, bundle: DataBundle) -> TrainConfig:
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
    from resnet_fast import backends

    device = resolve_device(device_name, context)
    _check_amp(config.amp, device)
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown --lr-schedule {config.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    for name, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {config.max_steps}")
    if not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")
    if config.sync_bn and not context.enabled:
        log("note: --sync-bn has no effect in a single process (run under torchrun for multi-process training)")
    backends.resolve(config.backend, device)  # an unavailable backend fails now, saying why

    state = ckpt.load_checkpoint(resume) if resume is not None else None
    if state is not None and not {"config", "optimizer", "step"} <= state.keys():
        raise ckpt.CheckpointError(f"{resume} holds model weights only; --resume needs a checkpoint written by "
                                   "resnet-fast train (with optimizer state and step)")
    if out_dir is not None and state is None and not overwrite:
        existing = os.path.join(out_dir, "last.pt")
        if os.path.exists(existing):
            raise ValueError(f"{existing} already exists; pass --resume {existing} to continue that run or "
                             f"--overwrite to start a new one there")

    bundle = load_data(config.data, config.data_dir, config.image_size, config.seed, download=download)
    config = _resolve_model_settings(config, bundle)
    if state is not None:
        saved = state["config"]
        changed = [f"{name} {saved.get(name)!r} -> {getattr(config, name)!r}" for name in MODEL_FIELDS
                   if saved.get(name) != getattr(config, name)]
        if changed:
            raise ckpt.CheckpointError(f"{resume} was trained with other settings than this run "
                                       f"({'; '.join(changed)})")
    deterministic = device.type == "cpu"
    with deterministic_algorithms(deterministic):
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
        train_model: nn.Module = model
        if context.enabled:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        sampler = EpochSampler(len(bundle.train), config.seed, context.world_size, context.rank)
        steps_per_epoch = math.ceil(sampler.per_replica / config.batch_size)
        scheduler = make_scheduler(optimizer, config.lr_schedule, steps_per_epoch * config.epochs)
        augment_generator = torch.Generator().manual_seed(config.seed + 1) if config.augment else None
        scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None

        result = TrainResult(config=config, out_dir=out_dir)
        step, start_epoch, partial = 0, 0, None
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
            start_epoch = int(state["epoch"])
            result.history = [row for row in state.get("history", []) if not row.get("partial")]
            result.best_test_acc = float(state.get("best_test_acc", -1.0))
            partial = state.get("partial")
            ckpt.restore_rng_state(state["rng"], sampler.generator, augment_generator)
            if partial is not None:
                sampler.replay_epoch(state["rng"]["sampler_epoch_start"], skip=partial["samples"])
        if start_epoch >= config.epochs:
            log(f"{resume} has already trained {start_epoch} of {config.epochs} epochs; pass --epochs N "
                f"(N > {start_epoch}) to train further")
            return result

        eval_loader = make_test_loader(bundle, config.batch_size, workers, device, context)
        if context.is_main:
            log(f"training {config.arch} (small_input={config.small_input}, {config.num_classes} classes) on "
                f"{bundle.description}; {device}, backend {backends.resolve(config.backend, device)}"
                f"{f', {context.world_size} processes' if context.enabled else ''}"
                f"{', sync-BN' if context.enabled and config.sync_bn else ''}")
        started = time.perf_counter()
        stop = False
        for epoch in range(start_epoch, config.epochs):
            if partial is None:
                sampler.new_epoch()
            totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images (this process)
            seconds = 0.0
            if partial is not None:
                totals = torch.tensor(partial["totals"], dtype=torch.float64)
                seconds = float(partial["seconds"])
            partial = None
            epoch_samples_done = sampler.skip
            loader = _train_loader(bundle, sampler, config.batch_size, workers, device)
            bar = _progress_bar(len(loader), f"epoch {epoch + 1}/{config.epochs}", progress and context.is_main)
            model.train()
            epoch_start = time.perf_counter()
            for images, labels in loader:
                x = prepare_batch(images, bundle.mean, bundle.std, device, config.channels_last, augment_generator)
                labels = labels.to(device, non_blocking=True)
                # The whole step in the model's CPU activation pool: backward and optimizer buffers too.
                with activation_pool.model_scope(model, x):
                    with _autocast(device, config.amp):
                        logits = train_model(x)
                        loss = F.cross_entropy(logits.float(), labels)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                scheduler.step()
                step += 1
                epoch_samples_done += labels.numel()
                loss_value = float(loss.detach())
                result.losses.append(loss_value)
                totals[0] += loss_value * labels.numel()
                totals[1] += float((logits.detach().argmax(dim=1) == labels).sum())
                totals[2] += labels.numel()
                if bar is not None:
                    elapsed = seconds + time.perf_counter() - epoch_start
                    bar.update(1)
                    bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{100 * totals[1] / totals[2]:.1f}%",
                                    img_s=f"{totals[2] * context.world_size / max(elapsed, 1e-9):.0f}")
                if config.max_steps is not None and step >= config.max_steps:
                    stop = True
                    break
            if bar is not None:
                bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - epoch_start
            complete = epoch_samples_done >= sampler.per_replica
            global_totals = sum_across(totals, context)
            test = evaluate(model, eval_loader, bundle, device, config.amp, config.channels_last, context)
            images = max(float(global_totals[2]), 1.0)
            row = {"epoch": epoch + 1, "loss": float(global_totals[0]) / images,
                   "train_acc": 100.0 * float(global_totals[1]) / images, "test_acc": test["top1"],
                   "test_loss": test["loss"], "images_per_s": images / max(seconds, 1e-9), "seconds": seconds,
                   "steps": step}
            if not complete:
                row["partial"] = True
            result.history.append(row)
            is_best = test["top1"] > result.best_test_acc  # best_test_acc starts below 0: the first is best
            if is_best:
                result.best_test_acc = test["top1"]
            if context.is_main:
                log(f"epoch {epoch + 1}/{config.epochs}{' (partial)' if not complete else ''}: "
                    f"loss {row['loss']:.4f}  train acc {row['train_acc']:.2f}%  test acc {row['test_acc']:.2f}%  "
                    f"{row['images_per_s']:.0f} img/s  {seconds:.1f} s")
                if out_dir is not None:
                    payload = {
                        "format": ckpt.FORMAT,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch + 1 if complete else epoch,
                        "step": step,
                        "rng": dict(ckpt.capture_rng_state(sampler.generator, augment_generator),
                                    sampler_epoch_start=sampler.epoch_start_state),
                        "partial": None if complete else {"samples": epoch_samples_done,
                                                          "totals": totals.tolist(), "seconds": seconds},
                        "config": config.to_dict(),
                        "history": result.history,
                        "best_test_acc": result.best_test_acc,
                        "test": test,
                    }
                    ckpt.save_atomic(payload, os.path.join(out_dir, "last.pt"))
                    if is_best:
                        ckpt.link_or_copy_atomic(os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt"))
            context.barrier()
            if stop:
                break
        result.steps = step
        result.seconds = time.perf_counter() - started
    return result


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

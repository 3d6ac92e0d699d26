"""What a training run is: its settings (:class:`TrainConfig`, checked by :func:`check_config`), the device it
runs on, and what it produced (:class:`TrainResult`).

:mod:`resnet_fast.train.loop` re-exports these names (they were defined there first and are imported from there).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from resnet_fast import backends
from resnet_fast.train.distributed import DistributedContext

__all__ = ["TrainConfig", "TrainResult", "LR_SCHEDULES", "AMP_DTYPES", "MODEL_FIELDS", "resolve_device",
           "check_amp", "autocast", "check_config"]

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


def check_amp(amp: Optional[str], device: torch.device) -> None:
    """Raise ValueError when ``--amp`` names no mixed-precision dtype, or one ``device`` cannot run (fp16 on CPU)."""
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp {amp!r}; choose bf16 or fp16")
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 runs on CUDA only; use --amp bf16 on the CPU")


def autocast(device: torch.device, amp: Optional[str]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp``'s dtype on ``device``'s type; a no-op context when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def check_config(config: TrainConfig, device: torch.device, context: DistributedContext,
                 log: Callable[[str], None] = print) -> None:
    """Raise ValueError (or the backend's error) for settings a run cannot start with, before any data is loaded.

    Unknown ``amp`` / ``lr_schedule``, non-positive epochs, batch size, step limit or learning rate, and a
    backend that cannot run on ``device`` (the error says why). ``log`` gets a note when ``sync_bn`` has no effect.
    """
    check_amp(config.amp, device)
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

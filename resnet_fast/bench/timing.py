"""How the bench calls and times one unit of work: the PyTorch runners, device synchronisation, interleaved rounds."""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch
from torch import Tensor, nn

from resnet_fast.ops.activation_pool import model_scope

__all__ = ["Runner", "synchronize", "eager_eval_runner", "train_step_runner", "interleaved_rounds", "progress"]

# A runner does one unit of work (one batch of inference, or one training step) and returns the output logits.
Runner = Callable[[], Tensor]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer around a call measures the call and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(message: str, end: str = "\n") -> None:
    """A progress line on stderr (stdout keeps the table)."""
    print(message, end=end, file=sys.stderr, flush=True)


def eager_eval_runner(model: nn.Module, images: Tensor) -> Runner:
    """Inference under ``torch.inference_mode()`` (what users run) with the model and input as given.

    Every inference provider that runs in PyTorch times its calls through this runner (eager torchvision,
    FastResNet, torch.compile, TorchScript), so their ratios compare like with like. The output is an
    inference tensor: read it (errors, copies), don't feed it to autograd.
    """
    def run() -> Tensor:
        with torch.inference_mode():
            return model(images)
    return run


def train_step_runner(model: nn.Module, images: Tensor, targets: Tensor, lr: float = 0.01) -> Runner:
    """One full training step: forward, cross-entropy, backward, SGD (momentum 0.9) update.

    A FastResNet's step runs inside its activation pool, as in ``resnet-fast train``.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()

    def run() -> Tensor:
        with model_scope(model, images):
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), targets)
            loss.backward()
            optimizer.step()
        return logits.detach()
    return run


def interleaved_rounds(runners: dict[str, Runner], iterations: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call of every runner, over ``iterations`` rounds of one call each (in ``runners``' order).

    Interleaving makes a change in machine load during the run touch every runner alike, so the ratios
    between them stay comparable. Each call is timed up to the end of its GPU work.
    """
    seconds: dict[str, list[float]] = {key: [] for key in runners}
    for round_index in range(iterations):
        progress(f"bench: timing round {round_index + 1}/{iterations} of {len(runners)} providers", end="\r")
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[key].append(time.perf_counter() - start)
    progress("")
    return seconds

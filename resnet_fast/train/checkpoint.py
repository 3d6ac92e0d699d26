"""Checkpoints: atomic writes, torchvision-compatible model weights, architecture inference.

A FastResNet checkpoint is a dict::

    {"format": "resnet_fast.train/1", "model": state_dict (torchvision keys), "optimizer": ...,
     "scheduler": ..., "epoch": completed epochs, "step": optimizer steps, "rng": {...},
     "config": {"arch", "num_classes", "small_input", "data", ... hyper-parameters}, "history": [...]}

Loading also accepts a raw torchvision ``state_dict`` or ``{"model": state_dict}``;
the architecture is then read off the weights' names and shapes.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["CheckpointError", "FORMAT", "save_atomic", "link_or_copy_atomic", "load_checkpoint", "model_state_from", "infer_model_config",
           "arch_name_for", "build_model", "load_model_weights", "capture_rng_state", "restore_rng_state"]

FORMAT = "resnet_fast.train/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the requested model: the message says which and why."""


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that readers see the old file or the complete new one, never a torn one.

    Writes a temporary file in the same directory (same file system, so the rename is
    atomic), fsyncs it, then ``os.replace``s it over ``path`` and fsyncs the directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; a checkpoint gets torch.save's usual mode
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:  # also on KeyboardInterrupt: leave no temp file, keep the old checkpoint
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def link_or_copy_atomic(source: str, target: str) -> None:
    """Make ``target`` a copy of the finished file ``source``, atomically (a hard link when possible).

    A later :func:`save_atomic` to ``source`` replaces the name, not the inode, so the
    linked ``target`` keeps its contents.
    """
    import shutil

    directory = os.path.dirname(os.path.abspath(target))
    tmp_path = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        try:
            os.link(source, tmp_path)
        except OSError:  # no hard links on this file system: copy and fsync instead
            shutil.copyfile(source, tmp_path)
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; a missing, corrupt or foreign file raises :class:`CheckpointError`.

    Returns a dict with at least ``"model"`` (a state_dict); torchvision-style files
    (a bare state_dict) are wrapped as ``{"model": state_dict}``.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        # weights_only: a checkpoint is data, never code to run (numpy RNG state is stored as lists).
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip, pickle and OS errors all mean "unreadable"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {message}") from None
    state = model_state_from(obj, path)
    if isinstance(obj, dict) and "model" in obj:
        checkpoint = dict(obj)
        checkpoint["model"] = state
        return checkpoint
    return {"model": state}


def model_state_from(obj: Any, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state_dict inside a loaded checkpoint (``{"model": sd}``, ``{"state_dict": sd}`` or ``sd``)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no model state_dict (expected a state_dict or {{'model': state_dict}})")
    # Weights saved from DistributedDataParallel or torch.compile carry a prefix: strip it.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def infer_model_config(state: dict[str, torch.Tensor], path: str = "checkpoint") -> dict[str, Any]:
    """FastResNet constructor arguments read off a ResNet state_dict's keys and shapes."""
    required = ["conv1.weight", "fc.weight", "layer1.0.conv1.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a ResNet state_dict (missing {', '.join(missing)})")
    block = "Bottleneck" if "layer1.0.conv3.weight" in state else "BasicBlock"
    layers = []
    for stage in (1, 2, 3, 4):
        count = 0
        while f"layer{stage}.{count}.conv1.weight" in state:
            count += 1
        if count == 0:
            raise CheckpointError(f"{path} is not a ResNet state_dict (no blocks in layer{stage})")
        layers.append(count)
    groups, width_per_group = 1, 64
    if block == "Bottleneck":
        conv2 = state["layer1.0.conv2.weight"]  # (width, width / groups, 3, 3); width = groups * width_per_group
        width = conv2.shape[0]
        groups = width // conv2.shape[1]
        width_per_group = width // groups
    stem = state["conv1.weight"]
    return dict(block=block, layers=layers, num_classes=int(state["fc.weight"].shape[0]), groups=groups,
                width_per_group=width_per_group, small_input=tuple(stem.shape[-2:]) == (3, 3))


def arch_name_for(config: dict[str, Any]) -> Optional[str]:
    """The factory name (``resnet18`` ...) whose architecture matches ``config``, if any."""
    from resnet_fast.models.resnet import ARCHITECTURES

    for name, factory in ARCHITECTURES.items():
        model_config = _factory_config(name, factory)
        if all(model_config[k] == config.get(k) for k in ("block", "layers", "groups", "width_per_group")):
            return name
    return None


_FACTORY_CONFIGS: dict[str, dict[str, Any]] = {}


def _factory_config(name: str, factory: Any) -> dict[str, Any]:
    if name not in _FACTORY_CONFIGS:
        with torch.device("meta"):  # no memory, no init cost: only the config is read
            _FACTORY_CONFIGS[name] = dict(factory(num_classes=1).config)
    return _FACTORY_CONFIGS[name]


def build_model(arch: str, num_classes: int, small_input: bool) -> nn.Module:
    """A FastResNet from its factory name; an unknown name raises :class:`CheckpointError`-free ValueError."""
    from resnet_fast.models.resnet import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, small_input=small_input)


def load_model_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str = "checkpoint",
                       arch: Optional[str] = None) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line explanation on mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        try:
            found = infer_model_config(state, path)
            found_name = arch_name_for(found) or f"{found['block']} {found['layers']}"
            what = (f"{path} holds a {found_name} with {found['num_classes']} classes"
                    f"{' (small_input)' if found['small_input'] else ''}")
        except CheckpointError:
            what = f"{path} does not hold a ResNet"
        wanted = getattr(model, "config", {})
        target = (f"{arch or 'the model'} with {wanted.get('num_classes', '?')} classes"
                  f"{' (small_input)' if wanted.get('small_input') else ''}")
        details = (mismatched[:2] and f"size mismatch: {'; '.join(mismatched[:2])}") or \
                  (missing and f"missing {len(missing)} keys, e.g. {missing[0]}") or \
                  f"unexpected {len(unexpected)} keys, e.g. {unexpected[0]}"
        raise CheckpointError(f"{what}, which does not fit {target} ({details})")
    model.load_state_dict(state, strict=True)


def capture_rng_state(sampler_generator: Optional[torch.Generator] = None,
                      augment_generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """Every random state a resumed run needs, in types that ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _python_state_to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if sampler_generator is not None:
        state["sampler"] = sampler_generator.get_state()
    if augment_generator is not None:
        state["augment"] = augment_generator.get_state()
    return state


def restore_rng_state(state: dict[str, Any], sampler_generator: Optional[torch.Generator] = None,
                      augment_generator: Optional[torch.Generator] = None) -> None:
    """Undo :func:`capture_rng_state`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if sampler_generator is not None and "sampler" in state:
        sampler_generator.set_state(state["sampler"])
    if augment_generator is not None and "augment" in state:
        augment_generator.set_state(state["augment"])


def _python_state_to_lists(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]

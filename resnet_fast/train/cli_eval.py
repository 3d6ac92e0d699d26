"""``resnet-fast eval``: top-1 / top-5 accuracy and images/s of a checkpoint on a test split.

The model runs under ``torch.inference_mode()`` (:func:`resnet_fast.train.loop.evaluate`), warm-up included.

The architecture, class count, data set and image size come from the checkpoint's
``config``; a torchvision checkpoint (a bare state_dict or ``{"model": state_dict}``)
works too: its architecture is read off the weights, and ``--data`` says what to test on.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from resnet_fast.errors import CommandError

__all__ = ["add_arguments", "run", "evaluate_checkpoint"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a resnet-fast train checkpoint (last.pt / best.pt) or a torchvision state_dict")
    parser.add_argument("--data", default=None, metavar="NAME",
                        help="digits, cifar10 or imagefolder (default: the checkpoint's, else digits)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="folder of the data (cifar10, imagefolder)")
    parser.add_argument("--image-size", type=int, default=None, metavar="PX",
                        help="input size (default: the checkpoint's, else the data set's default)")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="fused-unit backend: reference, extension, triton or auto (default: auto)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                        help="mixed precision via torch.autocast")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")


def evaluate_checkpoint(path: str, data: str | None = None, data_dir: str | None = None,
                        image_size: int | None = None, backend: str | None = None, batch_size: int = 256,
                        device: str | None = None, amp: str | None = None, channels_last: bool = False,
                        workers: int = 0) -> dict[str, Any]:
    """Load ``path``, build its model and measure loss, top-1/top-5 (%) and images/s on the test split."""
    import torch

    from resnet_fast import backends
    from resnet_fast.models.resnet import BasicBlock, Bottleneck, FastResNet
    from resnet_fast.train import checkpoint as ckpt
    from resnet_fast.train.data import load_data
    from resnet_fast.train.loop import check_amp, evaluate, make_test_loader, resolve_device

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    torch_device = resolve_device(device)
    check_amp(amp, torch_device)
    if backend is not None:
        backends.resolve(backend, torch_device)  # unknown or unavailable: fail now, saying why
    state = ckpt.load_checkpoint(path)
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    weights = ckpt.infer_model_config(state["model"], path)
    data_name = data or saved.get("data") or "digits"
    same_data = data_name == saved.get("data")
    bundle = load_data(data_name, data_dir if data_dir is not None else (saved.get("data_dir") if same_data else None),
                       image_size if image_size is not None else (saved.get("image_size") if same_data else None),
                       seed=int(saved.get("seed", 0)))
    if weights["num_classes"] != bundle.num_classes:
        raise ckpt.CheckpointError(f"{path} has {weights['num_classes']} output classes but --data {data_name} has "
                                   f"{bundle.num_classes}")
    block = BasicBlock if weights["block"] == "BasicBlock" else Bottleneck
    model = FastResNet(block, weights["layers"], num_classes=weights["num_classes"], groups=weights["groups"],
                       width_per_group=weights["width_per_group"], small_input=weights["small_input"],
                       backend=backend)
    arch = saved.get("arch") or ckpt.arch_name_for(weights) or f"{weights['block']} {weights['layers']}"
    ckpt.load_model_weights(model, state["model"], path, arch)
    model.to(torch_device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_test_loader(bundle, batch_size, workers, torch_device)
    with torch.inference_mode():  # warm-up (folds BN into the convs, primes the allocator) outside the timing
        model.eval()(torch.zeros(1, 3, bundle.image_size, bundle.image_size, device=torch_device))
    result = evaluate(model, loader, bundle, torch_device, amp, channels_last)
    result.update(checkpoint=path, arch=arch, data=bundle.description, device=str(torch_device),
                  backend=backends.resolve(backend, torch_device), epoch=state.get("epoch"))
    return result


def run(args: argparse.Namespace) -> int:
    """Evaluate and print one line per metric; write --json."""
    if args.data is not None:
        from resnet_fast.train.data import DATA_SETS

        if args.data not in DATA_SETS:
            raise CommandError(f"unknown data set {args.data!r}; choose one of {', '.join(DATA_SETS)}")
    result = evaluate_checkpoint(args.checkpoint, args.data, args.data_dir, args.image_size, args.backend,
                                 args.batch_size, args.device, args.amp, args.channels_last, args.workers)
    print(f"{result['arch']} from {result['checkpoint']} on {result['data']} ({result['device']}, backend "
          f"{result['backend']})")
    top5 = f"  top-5 {result['top5']:.2f}%" if "top5" in result else ""
    print(f"top-1 {result['top1']:.2f}%{top5}  loss {result['loss']:.4f}  {result['images_per_s']:.0f} images/s "
          f"({result['images']} images)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    sys.stdout.flush()
    return 0

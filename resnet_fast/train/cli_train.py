"""``resnet-fast train``: train a FastResNet (default: resnet18, 3x3 stem, on the bundled handwritten digits).

Multi-process: ``torchrun --nproc-per-node N -m resnet_fast.cli train ... [--sync-bn]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from resnet_fast.errors import CommandError

__all__ = ["add_arguments", "run", "config_from_args"]

# Options that map one-to-one onto TrainConfig fields (None in argparse = "not given").
_CONFIG_OPTIONS = ("arch", "data", "data_dir", "image_size", "small_input", "epochs", "batch_size", "lr", "momentum",
                   "weight_decay", "lr_schedule", "seed", "amp", "channels_last", "backend", "sync_bn", "augment",
                   "max_steps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` options. Defaults are None so a resumed run can tell what was given explicitly."""
    from resnet_fast.train.data import DATA_SETS

    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="NAME",
                      help=f"data set: {', '.join(DATA_SETS)} (default: digits, bundled with scikit-learn)")
    data.add_argument("--data-dir", default=None, metavar="DIR",
                      help="cifar10: folder with data_batch_1..5 and test_batch; imagefolder: class-per-folder "
                           "images (train/ + val/, or split by --seed)")
    data.add_argument("--download", action="store_true", help="cifar10: download into --data-dir if missing")
    data.add_argument("--image-size", type=int, default=None, metavar="PX",
                      help="square input size (default: digits 8 (their own size), cifar10 32, imagefolder 224)")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                      help="random crop + flip (default: on for cifar10 / imagefolder, off for digits)")
    data.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0)")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=None, metavar="ARCH", help="resnet18 (default), resnet34, resnet50, ...")
    model.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                       help="3x3 stride-1 stem without max-pool (default: on for images up to 64x64)")
    model.add_argument("--backend", default=None, metavar="NAME",
                       help="fused-unit backend: reference, extension, triton or auto (default: auto)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help="epochs to train (total, also when resuming; "
                                                                 "default 5)")
    optim.add_argument("--batch-size", type=int, default=None, help="per-process batch size (default 64)")
    optim.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.05)")
    optim.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    optim.add_argument("--weight-decay", type=float, default=None, help="weight decay (default 5e-4)")
    optim.add_argument("--lr-schedule", default=None, choices=["none", "cosine", "step"],
                       help="per-step schedule: none, cosine (default) or step (x0.1 at 50%% and 75%%)")
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    optim.add_argument("--seed", type=int, default=None, help="seed for weights, split, shuffling (default 0)")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    run_group.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                           help="mixed precision via torch.autocast: bf16 (default when given) or fp16 (CUDA)")
    run_group.add_argument("--channels-last", action="store_true", default=None, help="NHWC memory format")
    run_group.add_argument("--sync-bn", action="store_true", default=None,
                           help="under torchrun: BatchNorm statistics over all processes (fused path)")
    run_group.add_argument("--out", default=None, metavar="DIR",
                           help="write last.pt and best.pt here after each epoch (default: the --resume folder)")
    run_group.add_argument("--overwrite", action="store_true",
                           help="start a new run in an --out folder that already holds last.pt")
    run_group.add_argument("--resume", default=None, metavar="PATH", help="continue the run saved in PATH exactly")
    run_group.add_argument("--json", default=None, metavar="PATH", help="write per-epoch metrics as JSON")
    run_group.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def config_from_args(args: argparse.Namespace) -> Any:
    """The run's TrainConfig: defaults < checkpoint (when resuming) < options given on the command line."""
    from resnet_fast.models.resnet import ARCHITECTURES
    from resnet_fast.train import checkpoint as ckpt
    from resnet_fast.train.data import DATA_SETS
    from resnet_fast.train.config import MODEL_FIELDS, TrainConfig

    given = {name: getattr(args, name) for name in _CONFIG_OPTIONS if getattr(args, name, None) is not None}
    if "arch" in given and given["arch"] not in ARCHITECTURES:
        raise CommandError(f"unknown arch {given['arch']!r}; choose one of {', '.join(ARCHITECTURES)}")
    if "data" in given and given["data"] not in DATA_SETS:
        raise CommandError(f"unknown data set {given['data']!r}; choose one of {', '.join(DATA_SETS)}")
    if "backend" in given:
        from resnet_fast.backends import check_name

        try:
            check_name(given["backend"])
        except ValueError as error:
            raise CommandError(str(error)) from None
    if args.resume is None:
        return TrainConfig(**given)
    state = ckpt.load_checkpoint(args.resume)
    if "config" not in state:
        raise CommandError(f"{args.resume} holds model weights only; --resume needs a checkpoint written by "
                           "resnet-fast train")
    config = TrainConfig.from_dict(state["config"])
    for name, value in given.items():
        saved = getattr(config, name)
        if name in MODEL_FIELDS and saved is not None and value != saved:
            raise CommandError(f"--{name.replace('_', '-')} {value} does not match the checkpoint's "
                               f"{name} {saved} ({args.resume})")
        setattr(config, name, value)
    if "max_steps" not in given:
        config.max_steps = None  # a step limit belongs to the run that set it, not to its continuation
    return config


def run(args: argparse.Namespace) -> int:
    """Train; print the summary table; write --json. Returns the exit status."""
    from resnet_fast.train.loop import format_summary, train, write_json

    if args.workers < 0:
        raise CommandError(f"--workers must be >= 0, got {args.workers}")
    config = config_from_args(args)
    out_dir = args.out if args.out is not None else (os.path.dirname(os.path.abspath(args.resume))
                                                     if args.resume else None)
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CommandError(f"--out {out_dir} exists and is not a directory")
    rank = int(os.environ.get("RANK", "0"))
    show_progress = not args.quiet and sys.stderr.isatty()

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    result = train(config, out_dir=out_dir, resume=args.resume, device=args.device, workers=args.workers,
                   progress=show_progress, log=log, download=args.download, overwrite=args.overwrite or
                   args.resume is not None)
    if rank == 0:
        if result.history:
            print(format_summary(result))
        if out_dir is not None and result.history:
            print(f"checkpoints: {os.path.join(out_dir, 'last.pt')}, {os.path.join(out_dir, 'best.pt')}")
        elif out_dir is None:
            print("no --out given: no checkpoint written")
        if args.json:
            write_json(result, args.json)
    return 0

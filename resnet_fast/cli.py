"""``resnet-fast``: bench | train | eval | info."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from resnet_fast.errors import CommandError

# (subcommand, module, help); each module provides add_arguments(parser) and run(args) -> int.
_COMMANDS = [
    ("bench", "resnet_fast.bench", "time FastResNet against torchvision eager and its peers (the main job)"),
    ("train", "resnet_fast.train.cli_train", "train a FastResNet (default: the bundled handwritten digits)"),
    ("eval", "resnet_fast.train.cli_eval", "evaluate a checkpoint: top-1 / top-5 accuracy and images/s"),
    ("info", "resnet_fast.info", "show versions, backends (available or why not), the build, every setting, "
                                 "and (--explain ARCH) which kernel runs each unit of a model"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-fast",
        description="ResNets with fused conv + BatchNorm + residual + ReLU kernels. "
                    "Run `resnet-fast COMMAND --help` for each command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in _COMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("resnet-fast: interrupted", file=sys.stderr)
        return 130
    except (CommandError, FileNotFoundError, NotADirectoryError, ValueError, TypeError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"resnet-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

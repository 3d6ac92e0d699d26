"""``resnet-fast``: bench | train | eval | info."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Optional, Sequence

from resnet_fast.errors import CommandError

# (subcommand, module, help); each module provides add_arguments(parser) and run(args) -> int.
_COMMANDS = [
    ("bench", "resnet_fast.bench", "time FastResNet against torchvision eager and its peers (the main job)"),
    ("train", "resnet_fast.train.cli_train", "train a FastResNet (default: the bundled handwritten digits)"),
    ("eval", "resnet_fast.train.cli_eval", "evaluate a checkpoint: top-1 / top-5 accuracy and images/s"),
    ("info", "resnet_fast.cli", "show versions, backends (available or why not) and how the extension was built"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def info_report() -> dict:
    import platform

    import torch

    from resnet_fast import __version__, _extension, backends

    report = {
        "resnet_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": None,
        "extension": _extension.build_info(),
        "backends": backends.describe(),
        "requested_backend": None,
        "cpu_conv3x3": None,
        "cpu_activation_pool": None,
        "cpu_blocked_stages": None,
        "weight_check": None,
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        pass
    report["requested_backend"] = _setting(backends.requested_backend)
    from resnet_fast.nn import fused

    report["weight_check"] = _setting(fused.weight_check)
    if report["extension"]["loaded"]:
        from resnet_fast.ops import activation_pool, blocked, extension

        report["cpu_conv3x3"] = _setting(extension.cpu_conv3x3_algorithm)
        report["cpu_activation_pool"] = _setting(lambda: "on" if activation_pool.enabled() else "off")
        report["cpu_blocked_stages"] = _setting(lambda: "on" if blocked.enabled() else "off")
    return report


def _setting(read: Callable[[], str]) -> str:
    """An environment-driven setting as the package reads it, or why its value is invalid."""
    try:
        return read()
    except ValueError as error:
        return f"invalid: {error}"


def run(args: argparse.Namespace) -> int:
    report = info_report()
    if args.json:
        import json

        print(json.dumps(report, indent=2))
        return 0
    ext = report["extension"]
    print(f"resnet_fast {report['resnet_fast']}  python {report['python']}  torch {report['torch']} "
          f"(CUDA {report['torch_cuda'] or 'none'})  triton {report['triton'] or 'not installed'}")
    print(f"GPU: {report['gpu'] or 'none visible'}")
    if ext["loaded"]:
        kinds = "CPU + CUDA" if ext["cuda"] else "CPU only"
        archs = f" (archs {ext['cuda_archs']})" if ext["cuda"] else ""
        cpu_build = f"CPU code {ext.get('cpu_isa', '?')}, threads {ext.get('cpu_parallel', '?')}"
        print(f"extension resnet_fast._C: loaded, {kinds} kernels compiled{archs}; {cpu_build}")
        setting = os.environ.get("RESNET_FAST_CPU_CONV3X3", "auto")
        print(f"CPU inference 3x3 stride-1 convolutions: {report['cpu_conv3x3']} (RESNET_FAST_CPU_CONV3X3={setting})")
        from resnet_fast.ops.activation_pool import ENV_VAR as pool_variable

        setting = os.environ.get(pool_variable, "1")
        print(f"CPU activation pool (buffers kept between passes): {report['cpu_activation_pool']} "
              f"({pool_variable}={setting})")
        from resnet_fast.ops.blocked import ENV_VAR as blocked_variable

        setting = os.environ.get(blocked_variable, "auto")
        print(f"CPU inference residual stages on 8-channel blocks: {report['cpu_blocked_stages']} "
              f"({blocked_variable}={setting})")
    else:
        print(f"extension resnet_fast._C: not loaded: {ext['error']}")
    from resnet_fast.nn.fused import WEIGHT_CHECK_ENV

    print(f"folded-weight cache sees edits by: {report['weight_check']} "
          f"({WEIGHT_CHECK_ENV}={os.environ.get(WEIGHT_CHECK_ENV, 'content')})")
    print(f"requested backend: {report['requested_backend']} (argument > use_backend() > RESNET_FAST_BACKEND > auto)")
    print(f"{'backend':<10} {'device':<6} {'available':<9} note")
    for row in report["backends"]:
        note = "chosen by auto" if row["auto"] else row["reason"]
        print(f"{row['backend']:<10} {row['device']:<6} {'yes' if row['available'] else 'no':<9} {note}")
    return 0


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

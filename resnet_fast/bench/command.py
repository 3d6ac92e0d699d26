"""``resnet-fast bench``: time FastResNet against torchvision eager and its peers.

The command line: :func:`add_arguments` (the options), :func:`config_from_args` (one-line errors, the device's
defaults), :func:`run` (the job) and :func:`main` (``python -m resnet_fast.bench``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Optional, Sequence

import torch

from resnet_fast import backends
from resnet_fast.bench.peers import COMPILE_MODES, PEERS, installed_peers
from resnet_fast.bench.providers import DEFAULTS, DTYPES, DTYPES_BY_DEVICE, BenchConfig, build_providers, \
    fast_model, first_step_errors, make_inputs, make_torchvision_model, measure, preferred_memory_format
from resnet_fast.bench.report import format_table, machine_info, report, write_plot
from resnet_fast.errors import CommandError
from resnet_fast.numerics import errors

__all__ = ["add_arguments", "config_from_args", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``resnet-fast bench``; every default depends on the device, so they are resolved in :func:`run`."""
    parser.add_argument("--model", help="torchvision ResNet name (default: resnet50)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: 8 on CPU, 256 on GPU)")
    parser.add_argument("--image-size", type=int, help="square image side in pixels (default: 224)")
    parser.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval",
                        help="eval: inference on one batch under torch.inference_mode(); "
                             "train: forward + backward + SGD step (default: eval)")
    parser.add_argument("--backend", default="auto",
                        help="FastResNet backend: auto | all (every available one) | reference | extension | triton")
    parser.add_argument("--peers", default="default",
                        help="comma list of compile, jit, onnxruntime, openvino; or none | all | default "
                             "(default: jit, onnxruntime and openvino where installed; compile costs ~40 s "
                             "of compilation on 2 CPU cores, so it is opt-in on CPU)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile mode of the compile peer (default: default; max-autotune tunes "
                             "every convolution and takes minutes more)")
    parser.add_argument("--memory-format", choices=("auto", "nchw", "channels_last"), default="auto",
                        help="FastResNet's input/weight layout (default: auto = the fastest on the device)")
    parser.add_argument("--iterations", type=int,
                        help="timed rounds; each round calls every provider once, interleaved (default: 3 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, help="untimed iterations before timing (default: 1 CPU, 10 GPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch (default: 0)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) of images/s")


def _resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {name}: resnet_fast runs on cpu and cuda devices")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {name}: no CUDA device is visible (torch.cuda.is_available() is False"
                                 f"{'; torch is a CPU-only build' if torch.version.cuda is None else ''})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _resolve_backends(value: str, device: torch.device) -> list[str]:
    value = value.strip().lower()
    if value == "all":
        available = [name for name in backends.BACKENDS if backends.is_available(name, device)]
        # "auto" duplicates one of these; list each concrete backend once.
        return available
    if value == "auto":
        return ["auto"]
    names = [part.strip() for part in value.split(",") if part.strip()]
    for name in names:
        if name not in backends.BACKENDS:
            raise CommandError(f"--backend {name!r} is unknown; choose auto, all or "
                                 f"{', '.join(backends.BACKENDS)}")
        reason = backends.unavailable_reason(name, device)
        if reason is not None:
            raise CommandError(f"--backend {name} is not available on {device.type}: {reason}")
    return names


def _resolve_peers(value: str, device: torch.device, mode: str) -> list[str]:
    value = value.strip().lower()
    if value == "none":
        return []
    if value in ("all", "default"):
        found = installed_peers()
        if mode == "train":
            found = ["compile"]
        if value == "default" and device.type == "cpu":
            found = [peer for peer in found if peer != "compile"]  # ~40 s of compilation on 2 cores: opt-in
        if device.type == "cuda":
            found = [peer for peer in found if peer in ("compile", "jit")]  # ONNX peers are CPU-only here
        return found
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise CommandError(f"--peers: unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}, "
                             "or none / all / default")
    return names


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Validate the options (one-line errors) and fill in the device's defaults."""
    import torchvision

    from resnet_fast.models.resnet import ARCHITECTURES

    device = _resolve_device(args.device)
    defaults = DEFAULTS[device.type]
    model = (args.model or defaults["model"]).strip().lower()
    if model not in ARCHITECTURES or not hasattr(torchvision.models, model):
        raise CommandError(f"--model {model!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    dtype_name = (args.dtype or defaults["dtype"]).strip().lower()
    if dtype_name not in DTYPES:
        raise CommandError(f"--dtype {dtype_name!r} is unknown; choose float32, bfloat16 or float16")
    dtype = DTYPES[dtype_name]
    if dtype not in DTYPES_BY_DEVICE[device.type]:
        allowed = ", ".join(str(d).replace("torch.", "") for d in DTYPES_BY_DEVICE[device.type])
        raise CommandError(f"--dtype {dtype_name} is not supported on {device.type}; choose {allowed}")
    batch_size = defaults["batch_size"] if args.batch_size is None else args.batch_size
    image_size = defaults["image_size"] if args.image_size is None else args.image_size
    iterations = defaults["iterations"] if args.iterations is None else args.iterations
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    if batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {batch_size}")
    if args.mode == "train" and batch_size < 2:
        raise CommandError("--mode train needs --batch-size of at least 2 (BatchNorm batch statistics)")
    if image_size < 32:
        raise CommandError(f"--image-size must be at least 32 (five stride-2 stages), got {image_size}")
    if iterations < 1 or warmup < 0:
        raise CommandError(f"--iterations must be >= 1 and --warmup >= 0, got {iterations} and {warmup}")
    if args.threads is not None:
        if args.threads < 1:
            raise CommandError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    memory_format = {"auto": preferred_memory_format(device), "nchw": torch.contiguous_format,
                     "channels_last": torch.channels_last}[args.memory_format]
    for path_option in ("json", "plot"):
        path = getattr(args, path_option)
        if path and os.path.dirname(os.path.abspath(path)) and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise CommandError(f"--{path_option} {path}: folder {os.path.dirname(os.path.abspath(path))} "
                                 "does not exist")
    return BenchConfig(model=model, batch_size=batch_size, image_size=image_size, dtype=dtype, device=device,
                       mode=args.mode, backends=_resolve_backends(args.backend, device),
                       peers=_resolve_peers(args.peers, device, args.mode), iterations=iterations, warmup=warmup,
                       fast_memory_format=memory_format, seed=args.seed,
                       compile_mode=getattr(args, "compile_mode", "default"))


def run(args: argparse.Namespace) -> int:
    """``resnet-fast bench``: check FastResNet against torchvision, time every provider, print the table."""
    config = config_from_args(args)
    dtype_name = str(config.dtype).replace("torch.", "")
    print(f"{config.model} {config.mode}, batch {config.batch_size}, {config.image_size}x{config.image_size}, "
          f"{dtype_name}, {config.device} ({machine_info(config.device)['gpu'] or machine_info(config.device)['cpu']}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    base_model = make_torchvision_model(config.model, config.seed, config.device, config.dtype)
    images, targets = make_inputs(config)

    # The headline check: FastResNet (auto backend) against torchvision eager, same weights, same batch. Models are
    # built outside any inference context, as users build them; eval forwards run under inference_mode, as timed,
    # train-mode forwards (batch statistics; running stats updated on the copies) under no_grad.
    mode_model = copy.deepcopy(base_model).train(config.mode == "train")
    fast = fast_model(copy.deepcopy(base_model).train(config.mode == "train"), None, config.fast_memory_format)
    with torch.inference_mode() if config.mode == "eval" else torch.no_grad():
        reference = mode_model(images)
        fast_output = fast(images.contiguous(memory_format=config.fast_memory_format))
    fast_errors = errors(fast_output, reference)
    del mode_model, fast, fast_output, reference
    print(f"FastResNet ({backends.auto_backend(config.device)}) vs torchvision: max abs error "
          f"{fast_errors[0]:.2e}, relative error {fast_errors[1]:.2e}")

    providers = build_providers(config, base_model, images, targets)
    measure(config, providers, images)
    if config.mode == "train":
        first_step_errors(config, base_model, images, targets, providers)
    print(format_table(providers))
    results = report(config, providers, fast_errors)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, config, providers)
        print(f"wrote {args.plot}")
    if not any(p.status == "ok" for p in providers):
        raise CommandError("no provider could run")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m resnet_fast.bench ...``: the same as ``resnet-fast bench ...``, without the other commands."""
    parser = argparse.ArgumentParser(prog="resnet-fast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CommandError, ValueError, RuntimeError) as error:
        if args.debug:
            raise
        print(f"resnet-fast bench: error: {error}", file=sys.stderr)
        return 2


"""What correctness in every context costs: FastResNet eval passes timed in interleaved rounds.

Variants, each against the package's defaults (``torch.inference_mode()``, ``RESNET_FAST_WEIGHT_CHECK=content``,
NaN-propagating ReLU after oneDNN's convolutions):

* ``no_grad``: the same model under ``torch.no_grad()`` instead of ``inference_mode``;
* ``version-check``: ``RESNET_FAST_WEIGHT_CHECK=version`` (no content fingerprint of the weights per pass);
* ``relu-post-op``: oneDNN's fused ReLU post-op, as before NaN propagation was fixed (maps NaN to 0);
* ``torchvision``: the stock model, for scale.

    python benchmarks/bench_context_costs.py [--arch resnet50] [--batch 8] [--size 224] [--rounds 9] [--only relu-post-op]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from typing import Callable, Iterator

import torch
import torchvision

import resnet_fast
from resnet_fast.ops import extension


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _mkldnn_with_relu_post_op(x, folded, residual, relu):
    """The oneDNN unit as it was: ReLU as a post-op (NaN -> 0). For this comparison only."""
    packed = extension._mkldnn_packed_weight(folded, x)
    g = folded.geometry
    x = x.contiguous(memory_format=torch.channels_last)
    bias = folded.bias.detach().to(x.dtype)
    geometry = (list(g.padding), list(g.stride), list(g.dilation), g.groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *geometry, "relu" if relu else "none",
                                                       [None], "")
    residual = residual.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *geometry, "add", None,
                                                          "relu" if relu else None, [None], "")


@contextlib.contextmanager
def relu_post_op() -> Iterator[None]:
    original = extension._conv_bias_act_mkldnn
    extension._conv_bias_act_mkldnn = _mkldnn_with_relu_post_op
    try:
        yield
    finally:
        extension._conv_bias_act_mkldnn = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variants to time against the default "
                        "(e.g. version-check): a paired comparison of two models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tv = getattr(torchvision.models, args.arch)().eval()
    # One model per variant: each keeps its own fold cache (a cache key made under one setting would be
    # rebuilt under the next, and every round would time the fold and the weight packing).
    def fast() -> torch.nn.Module:
        return resnet_fast.FastResNet.from_torchvision(tv).eval()

    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)

    def timed(model: torch.nn.Module, grad_context: Callable, stack: Callable = contextlib.nullcontext):
        def run() -> None:
            with grad_context(), stack():
                model(x)
        return run

    variants = {
        "default (inference_mode)": lambda: timed(fast(), torch.inference_mode),
        "no_grad": lambda: timed(fast(), torch.no_grad),
        "version-check": lambda: timed(fast(), torch.inference_mode,
                                       lambda: environment(RESNET_FAST_WEIGHT_CHECK="version")),
        "relu-post-op": lambda: timed(fast(), torch.inference_mode, relu_post_op),
        "torchvision": lambda: timed(tv, torch.inference_mode),
    }
    chosen = ["default (inference_mode)"] + [name for name in variants if name != "default (inference_mode)"
                                             and (not args.only or name in args.only.split(","))]
    variants = {name: variants[name]() for name in chosen}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run()
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)  # no variant always runs right after another one
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{args.arch} eval, batch {args.batch}, {args.size}x{args.size}, float32, channels_last, "
          f"{args.threads} threads, {platform.processor() or platform.machine()} ({capability}), torch "
          f"{torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, median of {args.rounds} rounds")
    default = times["default (inference_mode)"]
    base = statistics.median(default)
    for name, values in times.items():
        median = statistics.median(values)
        faster = sum(mine < theirs for mine, theirs in zip(values, default))
        print(f"  {name:<26} {median * 1e3:8.1f} ms   {median / base:5.3f}x the default   "
              f"faster than it in {faster} of {args.rounds} rounds")


if __name__ == "__main__":
    main()

"""What correctness in every context costs: FastResNet eval passes timed in interleaved rounds.

Variants, each against the package's defaults (``torch.inference_mode()``, ``RESNET_FAST_WEIGHT_CHECK=content``,
oneDNN's ReLU post-op where the unit's operands are finite, else ReLU in place after the convolution):

* ``no_grad``: the same model under ``torch.no_grad()`` instead of ``inference_mode``;
* ``version-check``: ``RESNET_FAST_WEIGHT_CHECK=version`` (no content fingerprint of the weights per pass);
* ``relu-post-op always``: oneDNN's fused ReLU post-op without the finiteness check of its operands, as
  before NaN propagation was fixed (maps NaN to 0);
* ``relu_ after always``: ReLU in place after every oneDNN convolution, the finiteness check skipped;
* ``torchvision``: the stock model, for scale.

    python benchmarks/bench_context_costs.py [--arch resnet50] [--batch 8] [--size 224] [--rounds 9]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
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


@contextlib.contextmanager
def operands_deemed(finite: bool) -> Iterator[None]:
    """Force the oneDNN units' finiteness check: True always fuses the ReLU post-op (as before NaN
    propagation: NaN -> 0), False always runs ReLU in place after the convolution."""
    original = extension._finite
    extension._finite = lambda t: finite
    try:
        yield
    finally:
        extension._finite = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
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
        "default (inference_mode)": timed(fast(), torch.inference_mode),
        "no_grad": timed(fast(), torch.no_grad),
        "version-check": timed(fast(), torch.inference_mode, lambda: environment(RESNET_FAST_WEIGHT_CHECK="version")),
        "relu-post-op always": timed(fast(), torch.inference_mode, lambda: operands_deemed(True)),
        "relu_ after always": timed(fast(), torch.inference_mode, lambda: operands_deemed(False)),
        "torchvision": timed(tv, torch.inference_mode),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():
        run()
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{args.arch} eval, batch {args.batch}, {args.size}x{args.size}, float32, channels_last, "
          f"{args.threads} threads, {platform.processor() or platform.machine()} ({capability}), torch "
          f"{torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, median of {args.rounds} rounds")
    base = statistics.median(times["default (inference_mode)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<26} {median * 1e3:8.1f} ms   {median / base:5.3f}x the default")


if __name__ == "__main__":
    main()

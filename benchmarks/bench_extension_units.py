"""Speed of the ``extension`` backend's two units against the stock PyTorch layers, on CPU.

* training: ``extension.bn_act_train`` (BN with batch stats + residual + ReLU, forward and
  backward) vs ``nn.BatchNorm2d -> out += identity -> relu_`` (torchvision's block tail),
  at the ResNet-50 stage shapes (C=256@56, 512@28, 1024@14, 2048@7).
* inference: ``extension.conv_bias_act`` (conv3x3 with BN folded, + residual + ReLU) vs
  ``Conv2d -> BatchNorm2d(eval) -> += identity -> relu_``, conv3x3 C->C at 64@56, 128@28,
  256@14, 512@7. Inputs are NCHW and the unit's conversion to channels_last is timed. Both run under
  ``torch.inference_mode()`` (as users run inference); the BN fold is built outside it, untimed.

Prints the median time of each (stock and fused timed in alternation, so both see the same
machine load) and the ratio stock/fused per shape and as a geometric mean.

    python benchmarks/bench_extension_units.py [--threads 2] [--batch 8] [--repeats 7] [--layout nchw|cl]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn

from resnet_fast.ops import extension
from resnet_fast.ops.folding import ConvGeometry, fold_conv_bn

TRAIN_SHAPES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
INFER_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def median_seconds_interleaved(stock, fused, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median time of each, timed in alternation so that both see the same machine load."""
    for _ in range(warmup):
        stock()
        fused()
    times = {stock: [], fused: []}
    for _ in range(repeats):
        for fn in (stock, fused):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return statistics.median(times[stock]), statistics.median(times[fused])


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def bench_training(batch: int, repeats: int, memory_format: torch.memory_format, dtype: torch.dtype):
    ratios = []
    print(f"training BN + add + ReLU, forward + backward ({dtype}, batch {batch}, {memory_format})")
    for channels, size in TRAIN_SHAPES:
        shape = (batch, channels, size, size)
        y = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
        identity = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()
        grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format)
        bn = nn.BatchNorm2d(channels).to(dtype).train()
        running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()

        # Gradients are set to None before each step, as optimizer.zero_grad() does by default: a
        # training step writes fresh gradients rather than accumulating into the previous step's.
        leaves = (y, identity, bn.weight, bn.bias)

        def stock():
            for leaf in leaves:
                leaf.grad = None
            out = bn(y)
            out += identity
            out = torch.relu_(out)
            out.backward(grad)

        def fused():
            for leaf in leaves:
                leaf.grad = None
            out = extension.bn_act_train(y, bn.weight, bn.bias, running_mean, running_var, 0.1, bn.eps, identity,
                                         True)
            out.backward(grad)

        t_stock, t_fused = median_seconds_interleaved(stock, fused, repeats)
        ratios.append(t_stock / t_fused)
        print(f"  C={channels:5d} {size:3d}x{size:<3d}  stock {t_stock * 1e3:8.2f} ms  fused {t_fused * 1e3:8.2f} ms"
              f"  ratio {ratios[-1]:.2f}x")
    print(f"  geometric mean ratio {geometric_mean(ratios):.2f}x")
    return geometric_mean(ratios)


def bench_inference(batch: int, repeats: int, input_format: torch.memory_format, dtype: torch.dtype):
    ratios = []
    print(f"inference conv3x3 + BN + add + ReLU ({dtype}, batch {batch}, input {input_format})")
    for channels, size in INFER_SHAPES:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype).eval()
        bn = nn.BatchNorm2d(channels).to(dtype).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=input_format)
        identity = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=input_format)
        # Folded outside inference_mode, as FastResNet's fold cache is: an inference tensor has no version
        # counter, so the extension would re-pack its weight on every call instead of once.
        with torch.no_grad():
            folded = fold_conv_bn(conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                                  ConvGeometry((1, 1), (1, 1), (1, 1), 1))

        @torch.inference_mode()
        def stock():
            out = bn(conv(x))
            out += identity
            return torch.relu_(out)

        @torch.inference_mode()
        def fused():
            return extension.conv_bias_act(x, folded, identity, True)

        torch.testing.assert_close(fused(), stock(), rtol=1e-3, atol=1e-3)
        t_stock, t_fused = median_seconds_interleaved(stock, fused, repeats)
        ratios.append(t_stock / t_fused)
        print(f"  C={channels:4d} {size:3d}x{size:<3d}  stock {t_stock * 1e3:8.2f} ms  fused {t_fused * 1e3:8.2f} ms"
              f"  ratio {ratios[-1]:.2f}x")
    print(f"  geometric mean ratio {geometric_mean(ratios):.2f}x")
    return geometric_mean(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layout", choices=["nchw", "cl"], default="nchw",
                        help="memory format of the activations (training) and of the input (inference)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--only", choices=["training", "inference"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.layout == "cl" else torch.contiguous_format
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "training"):
        bench_training(args.batch, args.repeats, memory_format, dtype)
    if args.only in (None, "inference"):
        bench_inference(args.batch, args.repeats, memory_format, dtype)


if __name__ == "__main__":
    main()

"""``resnet-fast bench``: time FastResNet against torchvision eager and its peers.

The default job builds torchvision's ResNet-50 (random init, seeded), a
FastResNet with the same weights, checks that both give the same outputs, builds
every provider, then times them on one batch in interleaved rounds (one call of
each per round, so load changes touch all alike) and prints a table of medians.
Inference of every PyTorch provider (torchvision eager, FastResNet, torch.compile,
TorchScript) runs under ``torch.inference_mode()``, as users run it; training steps
run with autograd::

    provider                      ms/batch  images/s  vs eager  first output  max err
    torchvision eager (NCHW)         ...

Providers: torchvision eager (NCHW and channels_last), FastResNet (the ``auto``
backend, or every available backend with ``--backend all``) and the peers
``torch.compile`` (inductor with freezing), ``torch.jit.freeze`` +
``optimize_for_inference``, ONNX Runtime (CPU provider) and OpenVINO (CPU).

Modules:

* :mod:`~resnet_fast.bench.timing`: the PyTorch runners, device synchronisation, interleaved timed rounds.
* :mod:`~resnet_fast.bench.peers`: torch.compile, TorchScript, ONNX Runtime and OpenVINO runners.
* :mod:`~resnet_fast.bench.providers`: the job, its model and batch, the rows; building, checking, timing them.
* :mod:`~resnet_fast.bench.report`: machine info, the JSON document, the table, the plot.
* :mod:`~resnet_fast.bench.command`: the command line (``add_arguments`` / ``run``, as ``resnet-fast`` needs).

Only light imports live at module level: torchvision, matplotlib, onnx,
onnxruntime and openvino are imported where they are used, so ``resnet-fast
--help`` stays fast. The runner builders (:func:`compiled_runner`,
:func:`jit_runner`, ...) are shared with the pytest-benchmark suites in
``benchmarks/`` (their pytest-benchmark helpers live in ``benchmarks/_helpers.py``).
"""

from __future__ import annotations

from resnet_fast import backends
from resnet_fast.bench.command import add_arguments, config_from_args, main, run
from resnet_fast.bench.peers import (COMPILE_MODES, PEERS, PeerUnavailable, compiled_runner, installed_peers,
                                     jit_runner, onnxruntime_runner, openvino_runner, peer_runner)
from resnet_fast.bench.providers import (DEFAULTS, DTYPES, DTYPES_BY_DEVICE, BenchConfig, Provider, build_providers,
                                         fast_model, first_step_errors, make_inputs, make_torchvision_model, measure,
                                         preferred_memory_format)
from resnet_fast.bench.report import format_table, image_flops, machine_info, report, write_plot
from resnet_fast.bench.timing import Runner, eager_eval_runner, synchronize, train_step_runner

__all__ = [
    "add_arguments", "run", "main", "config_from_args",
    "PEERS", "COMPILE_MODES", "PeerUnavailable", "compiled_runner", "jit_runner", "onnxruntime_runner",
    "openvino_runner", "peer_runner", "installed_peers",
    "DTYPES", "DTYPES_BY_DEVICE", "DEFAULTS", "BenchConfig", "Provider", "preferred_memory_format", "fast_model",
    "make_inputs", "make_torchvision_model", "build_providers", "measure", "first_step_errors",
    "machine_info", "report", "format_table", "write_plot", "image_flops",
    "Runner", "synchronize", "eager_eval_runner", "train_step_runner", "backends",
]

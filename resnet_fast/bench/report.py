"""What the bench reports: the machine, the JSON document, the text table, the bar chart, and FLOPs per image.

torchvision and matplotlib are imported where they are used, so importing this module stays light.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Optional

import torch
from torch import Tensor, nn

from resnet_fast.bench.providers import BenchConfig, Provider

__all__ = ["machine_info", "report", "format_table", "write_plot", "image_flops"]


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: host, CPU, threads, GPU, versions."""
    import torchvision

    from resnet_fast import __version__, _extension

    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "resnet_fast": __version__,
        "extension": _extension.build_info(),
    }


def report(config: BenchConfig, providers: list[Provider], fast_errors: tuple[float, float]) -> dict[str, Any]:
    """The JSON document of one run: when, where, the job, FastResNet's errors and every provider's row."""
    dtype_name = str(config.dtype).replace("torch.", "")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(config.device),
        "device": str(config.device),
        "device_name": (torch.cuda.get_device_name(config.device) if config.device.type == "cuda"
                        else machine_info(config.device)["cpu"]),
        "torch": torch.__version__,
        "model": config.model,
        "mode": config.mode,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "dtype": dtype_name,
        "fast_memory_format": "channels_last" if config.fast_memory_format == torch.channels_last else "NCHW",
        "iterations": config.iterations,
        "warmup": config.warmup,
        "max_abs_error": fast_errors[0],
        "relative_error": fast_errors[1],
        "results": [p.as_dict() for p in providers],
    }


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(providers: list[Provider]) -> str:
    """The comparison as aligned text, one provider per line; skipped/failed rows say why."""
    width = max(len(p.label) for p in providers) + 2
    header = (f"{'provider':<{width}}{'ms/batch':>10}{'images/s':>10}{'vs eager':>10}{'first out':>11}"
              f"{'max err':>10}")
    lines = [header, "-" * len(header)]
    for p in providers:
        if p.status != "ok":
            lines.append(f"{p.label:<{width}}{p.status}: {p.note}")
            continue
        speedup = "-" if p.speedup_vs_eager is None else f"{p.speedup_vs_eager:.2f}x"
        first = "-" if p.first_output_s is None else f"{p.first_output_s:.1f} s"
        lines.append(f"{p.label:<{width}}{_fmt(p.ms_per_batch, '.1f'):>10}{_fmt(p.images_per_s, '.1f'):>10}"
                     f"{speedup:>10}{first:>11}{_fmt(p.max_abs_error, '.1e'):>10}")
    return "\n".join(lines)


def write_plot(path: str, config: BenchConfig, providers: list[Provider]) -> None:
    """A horizontal bar chart of images/s per provider, labelled with the speed-up vs eager NCHW."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    rows = [p for p in providers if p.images_per_s]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    colors = {"stock": "#888888", "fast": "#1f77b4", "peer": "#ff7f0e"}
    ax.barh([p.label for p in rows], [p.images_per_s for p in rows], color=[colors[p.kind] for p in rows])
    for index, p in enumerate(rows):
        ax.text(p.images_per_s, index, f" {p.speedup_vs_eager or 0:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("images/s (higher is better)")
    dtype_name = str(config.dtype).replace("torch.", "")
    ax.set_title(f"{config.model} {config.mode}, batch {config.batch_size}, {config.image_size}px, {dtype_name}, "
                 f"{config.device}")
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_flops(model_name: str, image_size: int) -> float:
    """Multiply-add count x 2 of one forward pass for ``model_name`` at ``image_size`` (conv + fc), by a meta trace."""
    import torchvision

    model = getattr(torchvision.models, model_name)().to("meta")
    total = 0.0

    def count(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            out_positions = output.shape[2] * output.shape[3]
            total += 2.0 * module.weight.numel() * out_positions
        elif isinstance(module, nn.Linear):
            total += 2.0 * module.weight.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    return total

"""``resnet-fast info``: versions, backends (available or why not), the build, every setting, and
(``--explain ARCH``) the execution plan of a model for an input."""

from __future__ import annotations

import argparse
import json
import platform

from resnet_fast import settings
from resnet_fast.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--explain", metavar="ARCH", default=None,
                        help="also print the execution plan of model ARCH (e.g. resnet50, random weights) in eval "
                             "mode under torch.inference_mode(): every unit's kernel and why (measured or rule)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of --explain's input (default 8)")
    parser.add_argument("--image-size", type=int, default=224, help="height and width of --explain's input "
                                                                    "(default 224)")


def settings_rows() -> list[dict]:
    """Every run-time setting with its current value (or why the value is invalid)."""
    rows = []
    for setting in settings.TABLE:
        try:
            current = setting.read()
        except ValueError as error:
            current = f"invalid: {error}"
        rows.append({"name": setting.name, "env": setting.env, "value": current, "default": setting.default,
                     "choices": list(setting.choices) if setting.choices else None, "doc": setting.doc})
    return rows


def info_report() -> dict:
    import torch

    from resnet_fast import _extension, backends
    from resnet_fast._version import __version__

    report = {
        "resnet_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": None,
        "extension": _extension.build_info(),
        "backends": backends.describe(),
        "settings": settings_rows(),
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        pass
    return report


def explain_report(arch: str, batch: int, image_size: int) -> dict:
    """The plan of ``arch`` (random weights, eval) for a ``(batch, 3, image_size, image_size)`` input."""
    import torch

    from resnet_fast.models.resnet import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise CommandError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if batch < 1 or image_size < 32:
        raise CommandError(f"--batch must be >= 1 and --image-size >= 32, got {batch} and {image_size}")
    model = ARCHITECTURES[arch]().eval()
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plan = model.explain(x)
    return {"arch": arch, "signature": plan.signature, "kind": plan.kind, "why": plan.why, "layout": plan.layout,
            "planning_seconds": plan.planning_seconds, "units": plan.rows(), "text": str(plan)}


def run(args: argparse.Namespace) -> int:
    report = info_report()
    if args.explain:
        report["plan"] = explain_report(args.explain, args.batch, args.image_size)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ext = report["extension"]
    print(f"resnet_fast {report['resnet_fast']}  python {report['python']}  torch {report['torch']} "
          f"(CUDA {report['torch_cuda'] or 'none'}, CPU {report['torch_cpu_capability']})  "
          f"triton {report['triton'] or 'not installed'}")
    print(f"GPU: {report['gpu'] or 'none visible'}")
    if ext["loaded"]:
        kinds = "CPU + CUDA" if ext["cuda"] else "CPU only"
        archs = f" (archs {ext['cuda_archs']})" if ext["cuda"] else ""
        isa = ext.get("cpu_isa_active", ext.get("cpu_isa", "?"))
        variants = ext.get("cpu_isa_variants")
        isa_text = f"{isa} (built: {', '.join(variants)})" if variants else isa
        print(f"extension resnet_fast._C: loaded, {kinds} kernels compiled{archs}; CPU code {isa_text}, "
              f"threads {ext.get('cpu_parallel', '?')}")
    else:
        print(f"extension resnet_fast._C: not loaded: {ext['error']}")
    print(f"{'backend':<10} {'device':<6} {'available':<9} note")
    for row in report["backends"]:
        note = "chosen by auto" if row["auto"] else row["reason"]
        print(f"{row['backend']:<10} {row['device']:<6} {'yes' if row['available'] else 'no':<9} {note}")
    print("settings (environment variable = value; the default in brackets):")
    width = max(len(row["env"]) for row in report["settings"])
    for row in report["settings"]:
        print(f"  {row['env']:<{width}} = {row['value']:<8} [{row['default']}]  {row['doc']}")
    if args.explain:
        print()
        print(report["plan"]["text"])
    return 0

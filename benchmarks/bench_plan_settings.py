"""``auto`` against every forced CPU kernel setting, in one interleaved run, and the time to first output.

    python benchmarks/bench_plan_settings.py                      # ResNet-50, batch 8, 224², fp32
    python benchmarks/bench_plan_settings.py --batch-size 1 --rounds 15
    python benchmarks/bench_plan_settings.py --model resnet18 --dtype bfloat16

One model, one input; each setting gets its own execution plan (settings are part of a plan's key), made
before timing starts; then rounds of one call per setting, in turn, under ``torch.inference_mode()``.
Prints a markdown table (median ms, ratio to ``auto``) headed by the machine, ISA, torch and date.
The time to first output (model built, weights random, one call: plan timing included) is measured
in a fresh interpreter per setting.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

SETTINGS = {
    "auto": {},
    "blocked + winograd": {"RESNET_FAST_CPU_BLOCKED": "1", "RESNET_FAST_CPU_CONV3X3": "winograd"},
    "blocked, no winograd": {"RESNET_FAST_CPU_BLOCKED": "1", "RESNET_FAST_CPU_CONV3X3": "onednn"},
    "channels_last + winograd": {"RESNET_FAST_CPU_BLOCKED": "0", "RESNET_FAST_CPU_CONV3X3": "winograd"},
    "channels_last, oneDNN only": {"RESNET_FAST_CPU_BLOCKED": "0", "RESNET_FAST_CPU_CONV3X3": "onednn"},
}
VARIABLES = ("RESNET_FAST_CPU_BLOCKED", "RESNET_FAST_CPU_CONV3X3")

FIRST_OUTPUT = """
import sys, time
start = time.perf_counter()
import torch, resnet_fast
model = getattr(resnet_fast, sys.argv[1])().eval().to(getattr(torch, sys.argv[4]))
x = torch.randn(int(sys.argv[2]), 3, int(sys.argv[3]), int(sys.argv[3])).to(getattr(torch, sys.argv[4]))
built = time.perf_counter()
with torch.inference_mode():
    model(x)
print(time.perf_counter() - built, built - start)
"""


def machine() -> str:
    from resnet_fast import _extension

    model = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = open("/proc/cpuinfo", encoding="utf-8").read()
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    if " avx512_bf16" in flags:
        isa += " (+BF16)"
    info = _extension.build_info()
    kernels = info.get("cpu_isa_active", info.get("cpu_isa", "?"))
    return (f"{model}, {os.cpu_count()} cores, {isa}; torch {torch.__version__} (CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}), kernels {kernels}, {torch.get_num_threads()} threads")


def set_variables(values: dict) -> None:
    for name in VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-first-output", action="store_true", help="skip the fresh-interpreter runs")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch-size must be >= 1")

    import resnet_fast

    dtype = getattr(torch, args.dtype)
    settings = SETTINGS if dtype == torch.float32 else {"auto": {}}
    model = getattr(resnet_fast, args.model)().eval().to(dtype)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                    generator=torch.Generator().manual_seed(0)).to(dtype)
    plans = {}
    with torch.inference_mode():
        for name, values in settings.items():
            set_variables(values)
            plans[name] = model.explain(x)
            model(x)  # warm: packed weights, the activation pool
        times: dict[str, list[float]] = {name: [] for name in settings}
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr)
            for name, values in settings.items():
                set_variables(values)
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    set_variables({})

    first = {}
    if not args.no_first_output:
        for name, values in settings.items():
            env = {key: value for key, value in os.environ.items() if key not in VARIABLES}
            env.update(values)
            result = subprocess.run([sys.executable, "-c", FIRST_OUTPUT, args.model, str(args.batch_size),
                                     str(args.image_size), args.dtype], capture_output=True, text=True, env=env,
                                    check=True)
            first[name] = float(result.stdout.split()[0])

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{args.model} eval, batch {args.batch_size}, {args.image_size}², {args.dtype}, "
          f"{args.rounds} interleaved rounds, {when}")
    print(f"machine: {machine()}")
    print()
    print("| setting | layout | kernels (units) | median ms | auto ms / this | first output s |")
    print("| --- | --- | --- | --- | --- | --- |")
    auto = statistics.median(times["auto"])
    for name in settings:
        median = statistics.median(times[name])
        kernels: dict[str, int] = {}
        for row in plans[name].rows():
            kernels[row["kernel"]] = kernels.get(row["kernel"], 0) + 1
        kernel_text = ", ".join(f"{kernel} {count}" for kernel, count in sorted(kernels.items()))
        first_text = f"{first[name]:.2f}" if name in first else ""
        print(f"| {name} | {plans[name].layout if plans[name].kind == 'planned trunk' else plans[name].kind} | "
              f"{kernel_text} | {median * 1e3:.1f} | {auto / median:.2f}x | {first_text} |")
    print()
    print(f"auto: {plans['auto'].why}; planned in {plans['auto'].planning_seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

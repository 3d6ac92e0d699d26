"""Build script for the ``resnet_fast._C`` extension.

The CPU kernels are always built. The CUDA kernels are built whenever a CUDA
toolkit and a CUDA build of torch are present, even on a machine with no GPU.

Environment:
  RESNET_FAST_SKIP_EXTENSION=1   build no extension (pure Python package)
  RESNET_FAST_BUILD_CUDA=0|1     force the CUDA part off / on (default: auto)
  TORCH_CUDA_ARCH_LIST           CUDA architectures (default: the visible GPU's, else "9.0+PTX")
  CUDA_HOME                      CUDA toolkit root (default: detected, /usr/local/cuda preferred)
  RESNET_FAST_CPU_AVX2=0|1       compile the CPU kernels for AVX2+FMA+F16C (default: on for x86-64 build
                                 machines whose CPU has them; the built library then needs AVX2)
  RESNET_FAST_CPU_AVX512=0|1     also compile the AVX-512 variants of the kernels in csrc/cpu/avx512/
                                 (default: on whenever the baseline is AVX2; the build machine need not
                                 have AVX-512: the library picks the variant at run time by CPUID)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _find_cuda_home() -> str | None:
    """A toolkit root whose bin/nvcc is the real compiler.

    ``/usr/local/bin/nvcc`` may be a wrapper script, which makes torch guess
    ``CUDA_HOME=/usr/local`` and fail at link time, so prefer real roots.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def _wheel_cuda_include_dirs() -> list[str]:
    """Headers (cuSPARSE, cuBLAS, ...) that torch's CUDA headers include, shipped in nvidia-* wheels."""
    dirs = []
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _cpu_vector_flags() -> list[str]:
    """Compiler flags selecting at::vec's implementation for the CPU kernels.

    AVX2+FMA+F16C (``-mavx2 -mfma -mf16c`` and ATen's ``CPU_CAPABILITY=AVX2`` macros, the same ones
    ATen's own AVX2 kernels are built with) when the build machine has them; otherwise
    at::vec's portable ``DEFAULT`` implementation.
    """
    portable = ["-DCPU_CAPABILITY=DEFAULT"]
    import platform

    wanted = _env_flag("RESNET_FAST_CPU_AVX2")
    if wanted is False or platform.machine().lower() not in ("x86_64", "amd64"):
        return portable
    if wanted is None:
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return portable
        if not all(re.search(rf"\b{feature}\b", flags) for feature in ("avx2", "fma", "f16c")):
            return portable
    return list(_AVX2_FLAGS)


_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
# The AVX-512 variant (csrc/cpu/avx512/*.cpp): at::vec's AVX512 implementation, as ATen's own
# AVX-512 kernels are built. Chosen at run time (csrc/cpu/isa_dispatch_cpu.cpp), so the build
# machine need not have AVX-512.
_AVX512_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                 "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]


def _cpu_isa_variants(baseline_flags: list[str]) -> dict[str, list[str]]:
    """Extra ISA variants to compile, {name: flags}: their sources are csrc/cpu/<name>/*.cpp."""
    if baseline_flags != _AVX2_FLAGS or _env_flag("RESNET_FAST_CPU_AVX512") is False:
        return {}
    return {"avx512": _AVX512_FLAGS}


def _variant_build_ext(base, variant_flags: dict[str, list[str]], baseline_flags: list[str]):
    """``base`` (a BuildExtension class) that compiles csrc/cpu/<variant>/*.cpp with that variant's flags.

    BuildExtension gives every C++ source of an extension the same flags (one ninja file). This
    subclass compiles each variant's sources first, through the same compiler wrapper (ninja or not),
    with the baseline's vector flags swapped for the variant's, and hands their objects to the link
    as extra objects. Those come after the baseline's objects on the link line, so where both define
    the same inline function of a shared header (torch's, the standard library's), the linker keeps
    the baseline's copy: code outside the variant's own namespaces never runs the variant's instructions.
    """

    class VariantBuildExtension(base):
        def build_extension(self, ext):
            prefixes = {name: os.path.join("csrc", "cpu", name) + os.sep for name in variant_flags}
            groups = {name: [s for s in ext.sources if os.path.normpath(s).startswith(prefix)]
                      for name, prefix in prefixes.items()}
            variant_sources = [s for group in groups.values() for s in group]
            if not variant_sources:
                return super().build_extension(ext)
            original = (ext.sources, ext.extra_objects, ext.depends)
            try:
                objects = []
                for name, sources in groups.items():
                    if not sources:
                        continue
                    args = ext.extra_compile_args
                    cxx = list(args["cxx"] if isinstance(args, dict) else args)
                    cxx = [f for f in cxx if f not in baseline_flags] + variant_flags[name]
                    postargs = dict(args, cxx=cxx) if isinstance(args, dict) else cxx
                    print(f"resnet_fast: compiling the {name} variant: {' '.join(sources)}")
                    objects += self.compiler.compile(sources, output_dir=self.build_temp,
                                                     macros=ext.define_macros + [(m,) for m in ext.undef_macros or []],
                                                     include_dirs=ext.include_dirs, debug=self.debug,
                                                     extra_postargs=postargs, depends=ext.depends)
                ext.sources = [s for s in ext.sources if s not in variant_sources]
                ext.extra_objects = list(ext.extra_objects or []) + objects
                ext.depends = list(ext.depends or []) + variant_sources  # relink when only a variant changed
                return super().build_extension(ext)
            finally:
                ext.sources, ext.extra_objects, ext.depends = original

    return VariantBuildExtension


def _openmp_flags(torch) -> list[str]:
    """``-fopenmp`` when torch's CPU thread pool is OpenMP (Linux wheels).

    ``at::parallel_for`` is header code: without ``-fopenmp`` its ``#pragma omp parallel`` is
    silently dropped and every kernel of the extension runs on one thread. The extension then
    links ``libgomp.so.1``, which resolves to the copy torch has already loaded.
    """
    if sys.platform == "darwin" or not getattr(torch._C, "has_openmp", False):
        return []
    return ["-fopenmp"]


def _default_arch_list(torch) -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0+PTX"


def _extensions():
    if _env_flag("RESNET_FAST_SKIP_EXTENSION"):
        print("resnet_fast: RESNET_FAST_SKIP_EXTENSION set, building without resnet_fast._C")
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("resnet-fast needs PyTorch to build: install torch first (pip install torch), "
                 "then pip install --no-build-isolation .")

    want_cuda = _env_flag("RESNET_FAST_BUILD_CUDA")
    can_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda and not can_cuda:
        sys.exit("resnet-fast: RESNET_FAST_BUILD_CUDA=1 but "
                 + ("torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found"))
    with_cuda = can_cuda if want_cuda is None else want_cuda

    sources = [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("csrc/*.cpp")) + sorted(ROOT.glob("csrc/cpu/*.cpp"))]
    # at::vec headers carry CUDA-style `#pragma unroll`s that GCC ignores (and would warn about, per loop).
    openmp = _openmp_flags(torch)
    vector_flags = _cpu_vector_flags()
    variants = _cpu_isa_variants(vector_flags)
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas"] + vector_flags + openmp
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    for name in variants:
        sources += [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob(f"csrc/cpu/{name}/*.cpp"))]
        define_macros.append((f"RESNET_FAST_CPU_VARIANT_{name.upper()}", "1"))
    include_dirs = [str(ROOT / "csrc")]
    arch_list = ""

    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or _default_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("csrc/cuda/*.cu")) + sorted(ROOT.glob("csrc/cuda/*.cpp"))]
        include_dirs += _wheel_cuda_include_dirs()
        define_macros.append(("RESNET_FAST_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}
        print(f"resnet_fast: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, archs {arch_list})")
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        print("resnet_fast: building CPU kernels only")
    # Stringified in C++ (csrc/extension.cpp); no quotes or separators that a shell would split on.
    define_macros.append(("RESNET_FAST_CUDA_ARCHS", re.sub(r"[;\s]+", ",", arch_list.strip()) or "none"))

    ext = ext_cls(
        name="resnet_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=openmp,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    if variants:
        print(f"resnet_fast: CPU kernel variants {', '.join(['avx2'] + list(variants))} (chosen at run time)")
        build_ext = _variant_build_ext(build_ext, variants, vector_flags)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

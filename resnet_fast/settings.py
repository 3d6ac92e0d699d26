"""Every run-time setting of resnet_fast, in one table: environment variable, choices, default, doc.

Settings are read from the environment when a decision is made: once per model pass by an
execution plan (``resnet_fast.models.plan``), once per call by the functional ops. A value outside
its choices raises a ValueError that names the variable and the choices. ``resnet-fast info``
prints this table and the README's settings table is checked against it (tests/test_settings.py).
Build-time settings (``RESNET_FAST_SKIP_EXTENSION`` ...) belong to ``setup.py``.

>>> from resnet_fast import settings
>>> settings.value("cpu_blocked")   # "auto" unless RESNET_FAST_CPU_BLOCKED is set
'auto'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Setting:
    """One run-time setting. ``choices`` is None for a free-form value (a path)."""

    name: str
    env: str
    choices: Optional[tuple[str, ...]]
    default: str
    doc: str
    aliases: tuple[tuple[str, str], ...] = ()  # accepted spellings: (given, meaning)

    def read(self) -> str:
        """The current value (the default when unset or empty), validated."""
        raw = os.environ.get(self.env, "").strip()
        if not raw:
            return self.default
        if self.choices is None:
            return raw
        value = dict(self.aliases).get(raw.lower(), raw.lower())
        if value not in self.choices:
            raise ValueError(f"{self.env} must be one of {', '.join(self.choices)}; got {raw!r}")
        return value


_ON_OFF = (("true", "1"), ("yes", "1"), ("on", "1"), ("false", "0"), ("no", "0"), ("off", "0"))

TABLE: tuple[Setting, ...] = (
    Setting("backend", "RESNET_FAST_BACKEND", ("auto", "reference", "extension", "triton"), "auto",
            "backend of every unit not pinned by backend= or use_backend()"),
    Setting("cpu_blocked", "RESNET_FAST_CPU_BLOCKED", ("auto", "1", "0"), "auto",
            "CPU float32 inference: residual stages on 8-channel blocks (1), channels_last (0), or measured (auto)"),
    Setting("cpu_conv3x3", "RESNET_FAST_CPU_CONV3X3", ("auto", "winograd", "onednn"), "auto",
            "CPU float32 inference 3x3 stride-1 convs: Winograd, oneDNN, or measured per shape (auto)"),
    Setting("cpu_conv", "RESNET_FAST_CPU_CONV", ("auto", "onednn", "gemm"), "auto",
            "CPU training convs: oneDNN, im2col + one GEMM, or measured per shape (auto)"),
    Setting("plan_cache", "RESNET_FAST_PLAN_CACHE", ("0", "1"), "0",
            "keep the CPU kernel timings on disk (cpu_timings.json in the cache folder), so a new process "
            "plans without timing", aliases=_ON_OFF),
    Setting("cpu_activation_pool", "RESNET_FAST_CPU_ACTIVATION_POOL", ("1", "0"), "1",
            "CPU: keep activation buffers between passes (1) or allocate per pass (0)", aliases=_ON_OFF),
    Setting("weight_check", "RESNET_FAST_WEIGHT_CHECK", ("content", "version"), "content",
            "how the folded-weight cache sees edits: version counters plus a content fingerprint, or versions only"),
    Setting("triton_select", "RESNET_FAST_TRITON_SELECT", ("measure", "triton", "vendor"), "measure",
            "CUDA, triton backend: time Triton against cuDNN per layer, or pin one"),
    Setting("triton_autotune", "RESNET_FAST_TRITON_AUTOTUNE", ("full", "off"), "full",
            "CUDA, triton backend: autotune the conv tile per shape, or run a fixed tile"),
    Setting("cache_dir", "RESNET_FAST_CACHE_DIR", None, "~/.cache/resnet_fast",
            "folder of the on-disk caches (Triton selection, CPU kernel timings)"),
    Setting("cpu_isa", "RESNET_FAST_CPU_ISA", ("auto", "avx2", "avx512"), "auto",
            "CPU kernels' instruction set, read once when resnet_fast._C loads (auto: the best the CPU has)"),
)

_BY_NAME = {setting.name: setting for setting in TABLE}


def setting(name: str) -> Setting:
    """The :class:`Setting` called ``name`` (a KeyError lists the names)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no setting {name!r}; the settings are {', '.join(_BY_NAME)}") from None


def value(name: str) -> str:
    """The current value of setting ``name``, validated (``setting(name).read()``)."""
    return setting(name).read()


def snapshot(names: Optional[tuple[str, ...]] = None) -> tuple[tuple[str, str], ...]:
    """(name, value) of the given settings (default: all), e.g. for a cache key."""
    return tuple((name, value(name)) for name in (names or tuple(_BY_NAME)))


def cache_dir() -> str:
    """The folder of resnet_fast's on-disk caches (``RESNET_FAST_CACHE_DIR``, default ~/.cache/resnet_fast)."""
    return os.path.expanduser(value("cache_dir"))


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (Triton's own ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def markdown_table() -> str:
    """The README's settings table, generated from :data:`TABLE` (tests/test_settings.py keeps them equal)."""
    lines = ["| variable | values | default | effect |", "| --- | --- | --- | --- |"]
    for entry in TABLE:
        values = " / ".join(f"`{choice}`" for choice in entry.choices) if entry.choices else "a path"
        lines.append(f"| `{entry.env}` | {values} | `{entry.default}` | {entry.doc} |")
    return "\n".join(lines)

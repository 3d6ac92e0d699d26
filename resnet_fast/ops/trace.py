"""Which kernel each unit ran, and why, recorded while a ``recording()`` block is open.

``FastResNet.explain`` runs a pass inside ``recording()`` where a unit's kernel is chosen per call
(training, CUDA, autocast, other dtypes), so what it prints is what ran. Outside a recording,
:func:`record` costs one context-variable lookup. While ``torch.compile`` traces, nothing is recorded
(torch < 2.14 cannot trace ``ContextVar.get``; a compiled graph is not a recorded pass).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

_entries: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("resnet_fast_trace", default=None)


def record(kernel: str, why: str) -> None:
    """Note that the unit being run uses ``kernel`` (``why``: the rule or the measured times)."""
    if torch.compiler.is_compiling():
        return
    entries = _entries.get()
    if entries is not None:
        entries.append((kernel, why))


def recorded() -> int:
    """How many units have been recorded in the open recording (0 when none is open)."""
    if torch.compiler.is_compiling():
        return 0
    entries = _entries.get()
    return 0 if entries is None else len(entries)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect ``(kernel, why)`` of every unit run inside the block, in order."""
    entries: list = []
    token = _entries.set(entries)
    try:
        yield entries
    finally:
        _entries.reset(token)


def recording_open() -> bool:
    """Whether a recording is open (to skip building a ``why`` nobody reads)."""
    return not torch.compiler.is_compiling() and _entries.get() is not None

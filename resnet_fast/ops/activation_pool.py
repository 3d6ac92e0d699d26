"""CPU buffers of a model's passes, kept for the next pass.

glibc gives large freed blocks back to the kernel, so every pass of a model re-faults its
activations in page by page: about 15k page faults of 4-5 us in one ResNet-50 batch-8 pass
on a 2-core VM (``benchmarks/NOTES.md``). An :class:`ActivationPool` keeps those blocks: inside
``with pool.scope(x):`` the thread's CPU allocations of at least 128 KiB come from the pool,
reused by exact size in the next pass; blocks a whole pass did not use are freed when it ends.
A block freed after its scope (a returned output, an activation saved for backward) still goes
back to the pool. Results are bit-identical with and without the pool (only where the memory
comes from changes).

:class:`~resnet_fast.models.resnet.FastResNet` owns one (``model.activation_pool``) and opens its
scope around every CPU forward. A training loop gets the backward and optimizer step pooled too
by opening the scope around the whole step, as ``resnet-fast train`` does::

    with model.activation_pool.scope(images):
        loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()

``RESNET_FAST_CPU_ACTIVATION_POOL=0`` turns it off.

Equivalent PyTorch: running the same ops without the pool (torch's CPU allocator, i.e. malloc).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from torch import nn

from resnet_fast import _extension, settings

ENV_VAR = settings.setting("cpu_activation_pool").env


def enabled() -> bool:
    """False when ``RESNET_FAST_CPU_ACTIVATION_POOL`` is 0/false/no/off, or the extension is not loaded."""
    return settings.value("cpu_activation_pool") == "1" and _extension.extension() is not None


class ActivationPool:
    """A pool of CPU activation buffers (see the module docstring); safe to share between threads.

    Copies and pickles of a pool (e.g. of the model that owns it) start empty.
    """

    def __init__(self) -> None:
        self._handle: Optional[object] = None

    def _pool(self) -> Optional[object]:
        if self._handle is None:
            module = _extension.extension()
            if module is None:
                return None
            self._handle = module.ActivationPool()
        return self._handle

    def applies(self, x: torch.Tensor) -> bool:
        """Whether a pass on ``x`` uses the pool: CPU input, pool enabled, not compiling."""
        return x.device.type == "cpu" and not torch.compiler.is_compiling() and enabled()

    def scope(self, x: torch.Tensor) -> ContextManager:
        """Context manager of one pass on ``x``: the pool serves this thread's large CPU allocations
        when :meth:`applies`, else nothing changes."""
        pool = self._pool() if self.applies(x) else None
        return contextlib.nullcontext() if pool is None else pool.scope()

    def release(self) -> None:
        """Free the cached buffers now (buffers held by live tensors are freed with them)."""
        if self._handle is not None:
            self._handle.release()

    def stats(self) -> dict:
        """``{"cached_bytes", "lent_bytes", "hits", "misses", "passes", "installed"}`` (zeros before first use)."""
        if self._handle is None:
            return {"cached_bytes": 0, "lent_bytes": 0, "hits": 0, "misses": 0, "passes": 0,
                    "installed": False}
        return dict(self._handle.stats())

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._handle = None

    def __deepcopy__(self, memo: dict) -> "ActivationPool":
        return ActivationPool()

    def __repr__(self) -> str:
        stats = self.stats()
        return f"ActivationPool(cached={stats['cached_bytes'] / 2**20:.1f} MiB, passes={stats['passes']})"


def model_scope(model: nn.Module, x: torch.Tensor) -> ContextManager:
    """``model.activation_pool.scope(x)`` for a model that owns a pool, else a no-op context."""
    pool = getattr(model, "activation_pool", None)
    return contextlib.nullcontext() if pool is None else pool.scope(x)

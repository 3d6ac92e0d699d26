"""Loads the compiled ``resnet_fast._C`` extension, lazily and without ever raising at import.

The load error is kept so that a user who asks for the ``extension`` backend gets
one sentence saying why it is not there.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


_loaded: Optional[tuple[Optional[ModuleType], Optional[str]]] = None


def _load() -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) or (None, reason); tried once per process (a plain global, so torch.compile traces it)."""
    global _loaded
    if _loaded is None:
        _loaded = _try_import()
    return _loaded


def _try_import() -> tuple[Optional[ModuleType], Optional[str]]:
    # The op schemas must exist before the library's kernels are registered against them.
    from resnet_fast import _op_schemas  # noqa: F401

    try:
        module = importlib.import_module("resnet_fast._C")
    except ImportError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, ModuleNotFoundError) and error.name == "resnet_fast._C":
            reason = ("resnet_fast._C is not built (install with `pip install --no-build-isolation .`, "
                      "without RESNET_FAST_SKIP_EXTENSION)")
        else:
            reason = f"resnet_fast._C failed to load: {message}"
        return None, reason
    except Exception as error:  # a broken build must not break `import resnet_fast`
        return None, f"resnet_fast._C failed to load: {type(error).__name__}: {error}"
    return module, None


def extension() -> Optional[ModuleType]:
    """The loaded ``resnet_fast._C`` module, or None."""
    return _load()[0]


def load_error() -> Optional[str]:
    """Why the extension is unavailable, in one sentence; None when it loaded."""
    return _load()[1]


def build_info() -> dict:
    """How the extension was built: ``{"loaded", "cpu", "cuda", "cuda_archs", "error"}``."""
    module, error = _load()
    if module is None:
        return {"loaded": False, "cpu": False, "cuda": False, "cuda_archs": "", "error": error}
    info = dict(module.build_info())
    info.update(loaded=True, error=None)
    return info


def has_cuda_kernels() -> bool:
    info = build_info()
    return bool(info["loaded"] and info["cuda"])

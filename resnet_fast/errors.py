"""The errors resnet_fast raises on purpose, in one place every layer may import.

``BackendUnavailableError`` (an explicitly requested backend cannot run) is raised by the ops;
``CommandError`` by the commands (``bench``, ``train``, ``eval``, ``info``), which ``resnet-fast``
prints as one line with exit status 2.
"""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given device."""


class CommandError(Exception):
    """A user-facing error of a command: printed as one line, exit status 2, no traceback unless --debug."""

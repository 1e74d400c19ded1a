"""Exception types raised by stmorph.

Every error caused by the user's data derives from :class:`StmorphError`, so a
caller (and the command line, which prints one line and exits non-zero) can
tell bad input apart from a bug.
"""

from __future__ import annotations

import os

__all__ = ["StmorphError", "InputError", "ImageError", "DependencyError", "OutputExistsError", "OutputError"]


class StmorphError(Exception):
    """Base class of every error stmorph raises on purpose.

    ``cli`` is the message as the command line says it, where that differs: its flags (``--force``,
    ``--pixel-scale``) instead of the Python keywords (``force=True``, ``pixel_scale=``), or without a
    hint the command line cannot follow. :meth:`cli_message` gives it, else the message itself.
    """

    def __init__(self, *args, cli: str | None = None):
        super().__init__(*args)
        self.cli = cli

    def cli_message(self) -> str:
        """The message as the command line prints it."""
        return str(self) if getattr(self, "cli", None) is None else self.cli


class InputError(StmorphError, ValueError):
    """An input file or object is missing, malformed or inconsistent.

    Parameters
    ----------
    message
        What is wrong and, where possible, what to do about it.
    path
        The file or folder the problem was found in (optional).
    cli
        The message as the command line says it, where it differs (see :class:`StmorphError`).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, *, cli: str | None = None):
        self.path = None if path is None else os.fspath(path)
        if cli is not None and self.path:
            cli = f"{self.path}: {cli}"
        super().__init__(f"{self.path}: {message}" if self.path else message, cli=cli)


class ImageError(InputError):
    """An image cannot be read, is truncated, or has an unsupported layout."""


class DependencyError(StmorphError, ImportError):
    """An optional dependency or a weights file needed for this call is missing."""


class OutputExistsError(StmorphError, FileExistsError):
    """An output already exists and overwriting was not requested."""


class OutputError(StmorphError, OSError):
    """An output cannot be written: its folder is a file, not writable, or the disk is full."""

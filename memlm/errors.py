"""User-facing errors: a one-line message plus a hint; the CLI prints both and exits 2."""

from __future__ import annotations


class MemlmError(Exception):
    """A mistake the user can fix (bad input, missing file, impossible settings)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def require_extra(module: str, extra: str):
    """Import an optional heavy dependency, or say which memlm extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MemlmError(
            f"this feature needs the optional package '{module.split('.')[0]}'",
            f"pip install 'memlm[{extra}]'",
        ) from e

"""User-facing errors: a one-line message plus a hint; the CLI prints both and exits 2."""

from __future__ import annotations

import errno
import os
import re


class MemlmError(Exception):
    """A mistake the user can fix (bad input, missing file, impossible settings)."""

    exit_code = 2
    label = "error"  # what the CLI prints before the message

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class Interrupted(MemlmError):
    """A run that stopped on SIGINT / SIGTERM after saving its work; the process exits with
    128 + the signal's number, as a shell reports a process the signal ended."""

    label = "stopped"

    def __init__(self, message: str, hint: str | None, signum: int):
        super().__init__(message, hint)
        self.exit_code = 128 + signum


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (library errors can run to many lines)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


# What to do about a failed read or write, by errno.
_IO_HINTS = {
    errno.ENOSPC: "the disk is full: free some space (or write elsewhere), then run the command again",
    errno.EDQUOT: "your disk quota is used up: free some space (or write elsewhere), then run the command again",
    errno.EROFS: "that file system is read-only: choose a folder on a writable disk",
    errno.EACCES: "you may not write or read there: fix the folder's permissions or choose another one",
    errno.EPERM: "you may not write or read there: fix the folder's permissions or choose another one",
    errno.ENOENT: "a folder vanished while memlm was using it: check that nothing else deletes it, then run again",
    errno.EIO: "the disk reported an input/output error: check it (dmesg, smartctl) before trusting its files",
}
_RUST_IO = re.compile(r"Os \{ code: (\d+)")  # how safetensors (Rust) spells an OS error
_TOKENIZERS_IO = re.compile(r"\(os error (\d+)\)")  # how tokenizers (Rust) does


def os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, or the one a Rust library (safetensors, tokenizers)
    reports in its message; None when `e` is not about the operating system."""
    if isinstance(e, OSError):
        return e
    found = _RUST_IO.search(str(e)) or _TOKENIZERS_IO.search(str(e))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def io_error(e: BaseException, doing: str) -> MemlmError:
    """A failed read or write as one line: what memlm was doing, the system's reason, the fix.

    `doing` completes "cannot ...", e.g. "save checkpoint step-000007 in runs/x".
    """
    os_err = os_error_of(e)
    if os_err is None:
        return MemlmError(f"cannot {doing}: {first_line(e)}")
    reason = os_err.strerror or first_line(os_err)
    where = f" ({os_err.filename})" if os_err.filename else ""
    hint = _IO_HINTS.get(os_err.errno, "check the disk and the path, then run the command again")
    return MemlmError(f"cannot {doing}: {reason}{where}", hint)


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

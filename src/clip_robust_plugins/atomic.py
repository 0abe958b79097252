"""All-or-nothing file writing: a failed run leaves nothing half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import EvalError


def write_files(targets: Sequence[tuple[str, Callable[[str], None]]]) -> list[str]:
    """Write several files all-or-nothing.

    Each ``writer(tmp_path)`` fills a staged temporary file beside its target; only when
    every writer succeeded are they renamed into place.  Returns the target paths.
    """
    staged: list[tuple[str, str]] = []
    try:
        for target, writer in targets:
            directory = os.path.dirname(os.path.abspath(target))
            Path(directory).mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".partial", dir=directory)
            os.close(fd)
            staged.append((tmp, target))
            writer(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for tmp, target in staged:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [t for t, _ in targets]


def check_writable(path: str) -> None:
    """Fail early when ``path``'s directory cannot be created or written (before any work)."""
    directory = Path(os.path.dirname(os.path.abspath(path)))
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise EvalError(f"{path}: cannot write here ({probe} is not a writable directory)")

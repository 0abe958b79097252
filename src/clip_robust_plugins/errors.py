"""One-line error messages, also for errors raised inside DataLoader worker processes.

torch re-raises a worker's exception in the main process as the same type with the
message ``"Caught DatasetError in DataLoader worker process 0.\\nOriginal Traceback
(most recent call last): ... <module>.DatasetError: <message>"``.  Its first line says
nothing about the input, so :func:`one_line` recovers the original message (the last
line of that traceback) and the CLI can still print one line naming the file and key.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.$")
_QUALIFIED = re.compile(r"^[A-Za-z_][\w.]*: ")


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or the original one when torch wrapped a worker error."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = text.splitlines()
    if _WORKER.match(lines[0]) and len(lines) > 1 and "Traceback" in lines[1]:
        last = next((line for line in reversed(lines) if line.strip()), lines[0])
        return _QUALIFIED.sub("", last, count=1) or lines[0]
    return lines[0]


class EvalError(RuntimeError):
    """A run cannot proceed; the message says why in one line."""


class PluginError(RuntimeError):
    """A plugin broke the rules (duplicate name, wrong record type, unknown name, an undeclared
    option or split); public as ``clip_robust_plugins.PluginError``."""


class PluginFailure(EvalError):
    """A plugin's own code raised: the message names the plugin, what it was doing and the stage.

    The original exception is chained (``__cause__``), so ``--trace_plugins`` can show it.
    """


def passthrough_errors() -> tuple[type[BaseException], ...]:
    """The package's own error types: their message already names the input, shown unchanged."""
    from .datasets.base import DatasetError
    from .groups import GroupSchemaError
    from .states import StateError

    return (EvalError, DatasetError, GroupSchemaError, PluginError, StateError)


@contextlib.contextmanager
def stage(what: str, name: str) -> Iterator[None]:
    """Run plugin code as stage ``name`` of ``what`` (e.g. ``mitigation 'dfr' (plugin 'p')``).

    Any exception but the package's own error types becomes one :class:`PluginFailure`
    line, ``<what> failed in <name>: <Type>: <message>``.
    """
    try:
        yield
    except passthrough_errors():
        raise
    except Exception as exc:
        raise PluginFailure(f"{what} failed in {name}: {type(exc).__name__}: {one_line(exc)}") from exc

"""Flag helpers shared by the plugins: argparse ``type=`` validators (a bad value is argparse's
one-line usage error naming the flag rather than a failure deep inside a fit), and one
dataclass per method or dataset that defines both its ``--<prefix><field>`` flags
(:func:`option`, :func:`config_flags`) and its typed config (:func:`config_from_options`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """A finite float ``> 0``."""
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A float ``>= 0`` (a loss weight, a weight decay)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    """A float in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


class OptionFlag:
    """One ``--<prefix><field>`` flag of a config dataclass: its ``dest``, argparse keyword
    arguments and ``declaration`` (the :func:`option` call it came from, the same object for
    a field a config inherits or nests, so two records sharing a field share the flag)."""

    def __init__(self, dest: str, kwargs: dict[str, Any], declaration: Any):
        self.dest = dest
        self.kwargs = kwargs
        self.declaration = declaration

    @property
    def flag(self) -> str:
        return self.dest if self.declaration.get("positional") else f"--{self.dest}"


def nested(config_cls: type, prefix: str | None = None) -> Any:
    """A config field holding another option dataclass: its flags join the outer config's,
    under the same prefix (e.g. RaVL's fine-tuning settings inside the ``ravl`` config), or
    under ``prefix`` when given (a command that reads RaVL's ``--ravl_*`` discovery settings)."""
    return dataclasses.field(default_factory=config_cls, metadata={"nested": config_cls, "prefix": prefix})


def _nested_prefix(f: dataclasses.Field, prefix: str) -> str:
    own = f.metadata.get("prefix")
    return prefix if own is None else own


def config_flags(config_cls: type, prefix: str, topic: str = "") -> list[OptionFlag]:
    """The flags of every :func:`option` field of ``config_cls`` (nested configs flattened).

    Flags default to None so :func:`config_from_options` can tell "not given" from a value
    and fall back to the dataclass default: the dataclass is the one source of defaults.
    ``topic`` (if any) starts each help text.
    """
    flags = []
    for f in dataclasses.fields(config_cls):
        if "nested" in f.metadata:
            flags += config_flags(f.metadata["nested"], _nested_prefix(f, prefix), topic)
            continue
        meta = f.metadata.get("flag")
        if meta is None:
            continue
        flags.append(OptionFlag(f"{prefix}{f.name}", _flag_kwargs(f.default, meta, topic), meta))
    return flags


def _flag_kwargs(default: Any, meta: dict[str, Any], topic: str) -> dict[str, Any]:
    """argparse keyword arguments of one :func:`option` field (see :func:`config_flags`)."""
    if meta["switch"]:
        shown = ""
    elif meta["required"] or meta["positional"]:
        shown = " (required)"
    else:
        shown = " (default: " + ("none" if default is None else
                                 " ".join(map(str, default)) if isinstance(default, tuple) else str(default)) + ")"
    lead = f"{topic}: " if topic else ""
    kwargs: dict[str, Any] = {"help": f"{lead}{meta['help']}{shown}"}
    if not meta["positional"]:
        kwargs["default"] = None
    if meta["required"]:
        kwargs["required"] = True
    for key in ("choices", "metavar"):
        if meta[key] is not None:
            kwargs[key] = meta[key]
    if meta["switch"]:
        kwargs.update(action="store_true", default=False)
    elif isinstance(default, bool) and meta["type"] is None:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        value_type = meta["type"]
        if value_type is None and default is not None and default != ():
            value_type = type(default[0]) if isinstance(default, tuple) else type(default)
        if value_type is not None and value_type is not str:
            kwargs["type"] = value_type
        if meta["nargs"] is not None:
            kwargs["nargs"] = meta["nargs"]
        elif isinstance(default, tuple):
            kwargs["nargs"] = "+"
    return kwargs


def add_config_flags(parser: Any, config_cls: type, prefix: str, topic: str | None = None) -> None:
    """One ``--<prefix><field>`` flag per :func:`option` field of ``config_cls`` (see :func:`config_flags`)."""
    for flag in config_flags(config_cls, prefix, prefix.rstrip("_") if topic is None else topic):
        parser.add_argument(flag.flag, **flag.kwargs)


def config_from_options(config_cls: type, prefix: str, options: Any, *, owner: str | None = None,
                        **explicit: Any) -> Any:
    """A plugin's config dataclass from its parsed flags.

    Each :func:`option` field takes ``--<prefix><field>`` when that flag was given (not None),
    else the field's default; fields without a flag keep their default; ``explicit`` values
    win.  A flag the parsed namespace does not have at all (a misspelt prefix, or a command
    that never declared it) is a :class:`~clip_robust_plugins.plugins.PluginError` naming
    ``owner`` and the flag, never a silent default.
    """
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.name in explicit or not f.init:
            continue
        if "nested" in f.metadata:
            values[f.name] = config_from_options(f.metadata["nested"], _nested_prefix(f, prefix), options, owner=owner)
            continue
        if "flag" not in f.metadata:
            continue
        dest = f"{prefix}{f.name}"
        if not hasattr(options, dest):
            from .errors import PluginError

            raise PluginError(f"{owner or config_cls.__name__}: reads option --{dest}, which this command does not "
                              f"declare (a misspelt option_prefix {prefix!r}, or flags never added)")
        value = getattr(options, dest)
        if value is None or (value is False and f.metadata["flag"]["switch"]):
            continue
        if isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return config_cls(**values, **explicit)


#: how errors and help headings name each kind of record
RECORD_WORDS = {"DatasetSpec": "dataset", "MitigationSpec": "method", "MetricSpec": "metric",
                "ViewProviderSpec": "view provider", "RegionProposerSpec": "region proposer"}


def record_label(spec: Any) -> str:
    """``method 'cfr'``, ``dataset 'spurious_shapes'``: a record as errors name it."""
    return f"{RECORD_WORDS.get(type(spec).__name__, type(spec).__name__)} {spec.name!r}"


def spec_config(spec: Any, options: Any) -> Any:
    """The typed config a record declared with ``options=``/``option_prefix=``, from parsed
    flags (None when it declares none)."""
    if getattr(spec, "options", None) is None:
        return None
    return config_from_options(spec.options, spec.option_prefix, options, owner=record_label(spec))


def option(default: Any, help: str, *, type: Callable[[str], Any] | None = None, choices: Any = None,
           metavar: str | None = None, nargs: str | None = None, required: bool = False,
           positional: bool = False, switch: bool = False) -> Any:
    """A config dataclass field that is also a command-line flag (see :func:`add_config_flags`).

    ``help`` says what the setting does; the flag's help appends the default.  ``type``
    defaults to the type of ``default`` (bools become ``--flag/--no-flag``; ``switch=True``
    makes an off-by-default bool a plain ``--flag``); a tuple default takes one or more values
    (``nargs`` overrides).  A command's inputs may be ``required`` flags or a ``positional``
    argument (named by the field, ``nargs="+"`` for a list).
    """
    meta = {"help": help, "type": type, "choices": choices, "metavar": metavar, "nargs": nargs,
            "required": required, "positional": positional, "switch": switch}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    if switch and default is not False:
        raise TypeError("a switch option is off by default (default False)")
    return dataclasses.field(default=default, metadata={"flag": meta})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How a dataset is read and its features cached: shared by ``eval`` and the commands that
    read datasets the same way (``discover`` nests it)."""

    feature_cache: str | None = option(
        None, "feature cache directory (none: $CLIP_ROBUST_FEATURE_CACHE or ~/.cache/clip_robust_plugins/features)",
        type=str, metavar="DIR")
    no_feature_cache: bool = option(False, "do not read or write cached features", switch=True)
    shard_pattern: str | None = option(
        None, "wds/ datasets: each split's shards as a brace pattern with {split}, relative to --dataset_root or "
        "absolute, e.g. '{split}/shard-{000..011}.tar' (instead of {split}/nshards.txt)", type=str, metavar="PATTERN")
    allow_pipe_urls: bool = option(
        False, "allow webdataset pipe: URLs in --shard_pattern; their text runs as a shell command (only for "
        "commands you trust)", switch=True)
    skip_bad_samples: bool = option(
        False, "skip samples whose image does not decode or whose features are not finite (recorded in the results "
        "JSON under robust.skipped_samples) instead of failing; every other bad input stays an error", switch=True)


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The :class:`DataConfig` flags in their own help group (``eval``)."""
    add_config_flags(parser.add_argument_group("data and feature cache"), DataConfig, "", topic="")

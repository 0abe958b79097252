"""The one plugin manager, entry-point discovery, and the registry built from the hooks.

- Built-in plugins (:data:`BUILTIN_PLUGINS`) are ordinary modules using the same hooks
  as third parties; nothing else in the package registers anything.
- Installed plugins are found through the entry-point group ``clip_robust_plugins``.
  ``CLIP_ROBUST_PLUGINS`` restricts them: a comma-separated list of entry-point names
  to load, or the empty string to load none (built-ins always load).
- A plugin that fails to import gives one warning naming it; the rest still works.
- ``CLIP_ROBUST_TRACE=1`` (or ``--trace_plugins``) logs every hook call to stderr.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError  # defined with the other error types; public here as always
from .specs import (
    CheckpointSpec,
    CommandSpec,
    DatasetSpec,
    MetricSpec,
    MitigationSpec,
    ModelLoaderSpec,
    RegionProposerSpec,
    ViewProviderSpec,
)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
ENV_ALLOWLIST = "CLIP_ROBUST_PLUGINS"
ENV_TRACE = "CLIP_ROBUST_TRACE"

BUILTIN_PLUGINS = (
    "clip_robust_plugins.models",
    "clip_robust_plugins.metrics",
    "clip_robust_plugins.datasets.spurious_shapes",
    "clip_robust_plugins.datasets.spurious_quadrants",
    "clip_robust_plugins.datasets.clipworld.plugin",
    "clip_robust_plugins.datasets.waterbirds",
    "clip_robust_plugins.datasets.celeba",
    "clip_robust_plugins.datasets.subpop",
    "clip_robust_plugins.datasets.imagefolder",
    "clip_robust_plugins.datasets.spawrious",
    "clip_robust_plugins.datasets.metashift",
    "clip_robust_plugins.datasets.imagenet9",
    "clip_robust_plugins.datasets.counteranimal",
    "clip_robust_plugins.mitigations.zeroshot",
    "clip_robust_plugins.mitigations.erm_head",
    "clip_robust_plugins.mitigations.dfr",
    "clip_robust_plugins.mitigations.heads.group_dro",
    "clip_robust_plugins.mitigations.heads.jtt",
    "clip_robust_plugins.mitigations.heads.afr",
    "clip_robust_plugins.mitigations.heads.class_balanced",
    "clip_robust_plugins.mitigations.cfr",
    "clip_robust_plugins.mitigations.ravl.plugin",
    "clip_robust_plugins.mitigations.seraser",
    "clip_robust_plugins.mitigations.tpt",
    "clip_robust_plugins.mitigations.wise_ft",
    "clip_robust_plugins.mitigations.contrastive_adapter",
    "clip_robust_plugins.mitigations.text.group_prompts",
    "clip_robust_plugins.mitigations.text.orth_proj",
    "clip_robust_plugins.mitigations.text.orth_cali",
    "clip_robust_plugins.mitigations.text.roboshot",
    "clip_robust_plugins.mitigations.text.perception_clip",
    "clip_robust_plugins.mitigations.text.tie_star",
    "clip_robust_plugins.export.command",
    "clip_robust_plugins.report",
)




class PluginImportWarning(UserWarning):
    """An installed or requested plugin could not be imported; it is skipped."""


def _make_manager(trace: bool) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if trace:
        pm.trace.root.setwriter(lambda line: sys.stderr.write(f"[clip_robust_plugins trace] {line}"))
        pm.enable_tracing()
    return pm


def _allowed_entry_points() -> list[importlib.metadata.EntryPoint]:
    allow = os.environ.get(ENV_ALLOWLIST)
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    found = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if allowed:
        unknown = sorted(allowed - {ep.name for ep in found})
        if unknown:
            warnings.warn(
                f"clip_robust_plugins: {ENV_ALLOWLIST} names {unknown}, which no installed package provides "
                f"(installed: {sorted(ep.name for ep in found)})",
                PluginImportWarning,
                stacklevel=3,
            )
    return [ep for ep in found if allowed is None or ep.name in allowed]


def _warn_import(name: str, exc: BaseException) -> None:
    warnings.warn(
        f"clip_robust_plugins: plugin {name!r} failed to import and is skipped: {type(exc).__name__}: {exc}",
        PluginImportWarning,
        stacklevel=3,
    )


#: entry-point name -> version of the distribution that declared it (module names may differ)
_DIST_VERSIONS: dict[str, str] = {}


def build_plugin_manager(extra_modules: Iterable[str] = (), trace: bool | None = None) -> pluggy.PluginManager:
    """A fresh manager with built-ins, allowed installed plugins and ``extra_modules``.

    ``extra_modules`` are import paths given with ``--plugin``; like installed plugins
    they warn and are skipped when they fail to import.
    """
    if trace is None:
        trace = os.environ.get(ENV_TRACE, "") not in ("", "0")
    pm = _make_manager(trace)
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    for ep in _allowed_entry_points():
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure must not break the tool
            _warn_import(ep.name, exc)
            continue
        pm.register(plugin, name=ep.name)
        if ep.dist is not None:
            _DIST_VERSIONS[ep.name] = ep.dist.version
    for modname in extra_modules:
        if pm.has_plugin(modname):
            continue
        try:
            plugin = importlib.import_module(modname)
        except Exception as exc:  # noqa: BLE001
            _warn_import(modname, exc)
            continue
        pm.register(plugin, name=modname)
    return pm


@dataclass
class Registry:
    """Everything the plugins registered, by name, with the plugin that registered it."""

    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    metrics: dict[str, MetricSpec] = field(default_factory=dict)
    mitigations: dict[str, MitigationSpec] = field(default_factory=dict)
    model_loaders: dict[str, ModelLoaderSpec] = field(default_factory=dict)
    checkpoints: dict[str, CheckpointSpec] = field(default_factory=dict)
    view_providers: dict[str, ViewProviderSpec] = field(default_factory=dict)
    region_proposers: dict[str, RegionProposerSpec] = field(default_factory=dict)
    commands: dict[str, CommandSpec] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def owner(self, kind: str, name: str) -> str:
        return self.owners[(kind, name)]

    def dataset(self, name: str) -> DatasetSpec:
        return self._get("datasets", name)

    def mitigation(self, name: str) -> MitigationSpec:
        return self._get("mitigations", name)

    def model_loader(self, name: str) -> ModelLoaderSpec:
        return self._get("model_loaders", name)

    def view_provider(self, name: str) -> ViewProviderSpec:
        return self._get("view_providers", name)

    def region_proposer(self, name: str) -> RegionProposerSpec:
        return self._get("region_proposers", name)

    def checkpoint(self, model: str, pretrained: str) -> CheckpointSpec | None:
        return self.checkpoints.get(f"{model},{pretrained}")

    def model_config_paths(self, model: str) -> list:
        return [c.config for c in self.checkpoints.values() if c.model == model and c.config is not None]

    def _get(self, kind: str, name: str) -> Any:
        table = getattr(self, kind)
        if name not in table:
            known = ", ".join(sorted(table)) or "(none)"
            raise PluginError(f"unknown {kind[:-1].replace('_', ' ')} {name!r}; registered: {known}")
        return table[name]


_HOOKS: tuple[tuple[str, str, type], ...] = (
    ("register_datasets", "datasets", DatasetSpec),
    ("register_metrics", "metrics", MetricSpec),
    ("register_mitigations", "mitigations", MitigationSpec),
    ("register_model_loaders", "model_loaders", ModelLoaderSpec),
    ("register_checkpoints", "checkpoints", CheckpointSpec),
    ("register_view_providers", "view_providers", ViewProviderSpec),
    ("register_region_proposers", "region_proposers", RegionProposerSpec),
    ("register_commands", "commands", CommandSpec),
)
#: registry tables listed per plugin by ``clip_benchmark_robust plugins``
REGISTRY_KINDS = tuple(kind for _, kind, _ in _HOOKS)


def per_plugin_callers(pm: pluggy.PluginManager, hook_name: str) -> Iterable[tuple[str, Callable]]:
    """(plugin name, hook caller restricted to that plugin) for each implementer.

    Calling plugins one at a time lets us attribute every record to its plugin, and the
    subset callers still go through pluggy's (traced) hook execution.
    """
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        yield impl.plugin_name, pm.subset_hook_caller(hook_name, remove_plugins=others)


def _add_record(registry: Registry, kind: str, record_type: type, hook_name: str, plugin: str, record: Any) -> None:
    if not isinstance(record, record_type):
        raise PluginError(f"plugin {plugin!r} registered {record!r} with {hook_name}; expected a {record_type.__name__}")
    table = getattr(registry, kind)
    if record.name in table:
        first = registry.owners[(kind, record.name)]
        raise PluginError(
            f"duplicate {kind[:-1].replace('_', ' ')} name {record.name!r}: registered by plugin "
            f"{first!r} and by plugin {plugin!r}"
        )
    table[record.name] = record
    registry.owners[(kind, record.name)] = plugin


def collect_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook and gather the records; duplicates name both plugins."""
    registry = Registry()
    for hook_name, kind, record_type in _HOOKS:
        for plugin_name, caller in per_plugin_callers(pm, hook_name):
            try:
                caller(register=functools.partial(_add_record, registry, kind, record_type, hook_name, plugin_name))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
    return registry


def plugin_version(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """The version of the distribution that provides ``plugin`` (None for loose modules)."""
    name = pm.get_name(plugin)
    if name in _DIST_VERSIONS:
        return _DIST_VERSIONS[name]
    modname = getattr(plugin, "__name__", "")
    top = modname.split(".")[0]
    if top == hookspecs.PROJECT_NAME:
        from . import __version__

        return __version__
    try:
        return importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        return getattr(plugin, "__version__", None)


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, version and implemented hooks of every registered plugin (for ``plugins``)."""
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
        rows.append({"name": name, "version": plugin_version(pm, plugin), "hooks": hooks})
    return sorted(rows, key=lambda r: r["name"])


def plugin_parent_parser() -> argparse.ArgumentParser:
    """The ``--plugin`` / ``--trace_plugins`` flags every subcommand shares (an argparse parent)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("plugins")
    group.add_argument(
        "--plugin", action="append", default=[], metavar="MODULE",
        help="import MODULE as a plugin for this run (repeatable), like `pytest -p`",
    )
    group.add_argument("--trace_plugins", action="store_true",
                       help="log every plugin hook call to stderr, and show the traceback of an error")
    return parent


#: a parser's record of who declared each flag: ``flag -> (plugin, record heading or None, declaration)``, and the
#: flags of each help topic (a method, a dataset, a plugin): ``topic -> [actions]``
_OWNERS_ATTR, _TOPICS_ATTR = "_crp_flag_owners", "_crp_topics"


def flag_owners(parser: argparse.ArgumentParser) -> dict[str, tuple[str, str | None, Any]]:
    """Who declared each plugin flag of ``parser`` (so a second declaration can name both)."""
    if not hasattr(parser, _OWNERS_ATTR):
        setattr(parser, _OWNERS_ATTR, {})
    return getattr(parser, _OWNERS_ATTR)


def help_topics(parser: argparse.ArgumentParser) -> dict[str, tuple[str, list[argparse.Action]]]:
    """The heading and flags of each plugin topic added to ``parser`` (``eval --help dfr``)."""
    if not hasattr(parser, _TOPICS_ATTR):
        setattr(parser, _TOPICS_ATTR, {})
    return getattr(parser, _TOPICS_ATTR)


def _declared_by(parser: argparse.ArgumentParser, flag: str) -> str:
    entry = flag_owners(parser).get(flag)
    if entry is None:
        return f"{parser.prog} itself"
    plugin, heading, _ = entry
    return f"plugin {plugin!r}" + (f" ({heading})" if heading else "")


def _conflict(parser: argparse.ArgumentParser, flag: str, who: str) -> PluginError:
    return PluginError(f"flag {flag} is declared twice: by {_declared_by(parser, flag)} and by {who}")


def add_plugin_flags(parser: argparse.ArgumentParser, pm: pluggy.PluginManager,
                     only: Callable[[str], bool] | None = None) -> None:
    """Every plugin's ``add_arguments`` flags, one argument group per plugin (``only`` filters by
    plugin name).  A flag that exists already is one :class:`PluginError` naming both plugins."""
    import re

    for plugin_name, caller in per_plugin_callers(pm, "add_arguments"):
        if only is not None and not only(plugin_name):
            continue
        group = parser.add_argument_group(f"plugin {plugin_name}")
        before = set(parser._option_string_actions)
        who = f"plugin {plugin_name!r}"
        try:
            caller(parser=group)
        except argparse.ArgumentError as exc:
            found = re.search(r"conflicting option strings?: ([^,\s]+)", str(exc))
            raise _conflict(parser, found.group(1) if found else str(exc), who) from None
        except Exception as exc:
            raise PluginError(f"{who} failed in add_arguments: {type(exc).__name__}: {exc}") from exc
        for flag in set(parser._option_string_actions) - before:
            flag_owners(parser)[flag] = (plugin_name, None, None)
        help_topics(parser)[plugin_name] = (group.title, list(group._group_actions))


def add_command_flags(parser: argparse.ArgumentParser, spec: Any, registry: Registry, pm: pluggy.PluginManager) -> None:
    """A subcommand's flags: its ``options`` dataclass, then the flags of the records its
    ``record_flags`` names (and, with ``"datasets"``, the dataset plugins' legacy flags); a flag
    declared twice is one :class:`PluginError` naming both declarers."""
    from .argtypes import config_flags

    if spec.options is not None:
        for flag in config_flags(spec.options, spec.option_prefix):
            try:
                parser.add_argument(flag.flag, **flag.kwargs)
            except argparse.ArgumentError:
                raise _conflict(parser, flag.flag, f"command {spec.name!r}") from None
            flag_owners(parser)[flag.flag] = (registry.owner("commands", spec.name), f"command {spec.name}",
                                              flag.declaration)
    unknown = set(spec.record_flags) - set(OPTION_KINDS)
    if unknown:
        raise PluginError(f"command {spec.name!r} (plugin {registry.owner('commands', spec.name)!r}): record_flags "
                          f"{sorted(unknown)} are not registry tables with options ({', '.join(OPTION_KINDS)})")
    if "datasets" in spec.record_flags:
        dataset_plugins = {owner for (kind, _), owner in registry.owners.items() if kind == "datasets"}
        add_plugin_flags(parser, pm, only=dataset_plugins.__contains__)
    if spec.record_flags:
        add_spec_flags(parser, registry, kinds=spec.record_flags)


def plugin_option_names(pm: pluggy.PluginManager, plugin: str) -> list[str]:
    """The option names (``dest``) of the flags ``plugin`` adds through the legacy
    ``add_arguments`` hook, by calling it on a scratch parser."""
    names: list[str] = []
    for plugin_name, caller in per_plugin_callers(pm, "add_arguments"):
        if plugin_name == plugin:
            scratch = argparse.ArgumentParser(add_help=False)
            caller(parser=scratch.add_argument_group(plugin_name))
            names += [action.dest for action in scratch._actions]
    return names


def record_flag_values(options: argparse.Namespace, pm: pluggy.PluginManager, registry: Registry, kind: str,
                       name: str) -> dict[str, Any]:
    """A record's settings on this command line by flag name: its typed config (defaults filled
    in) and its plugin's legacy flags; what a command records as provenance."""
    import dataclasses

    from .argtypes import spec_config

    spec = getattr(registry, kind)[name]
    values = {dest: getattr(options, dest, None) for dest in plugin_option_names(pm, registry.owner(kind, name))}
    config = spec_config(spec, options)
    if config is not None:
        values.update({f"{spec.option_prefix}{k}": v for k, v in dataclasses.asdict(config).items()})
    return values


#: registry tables whose records may declare ``options`` (their flags join the commands that use them)
OPTION_KINDS = ("datasets", "mitigations", "metrics", "view_providers", "region_proposers")
#: help headings: each record by the name the CLI takes
_HEADINGS = {"datasets": "dataset robust/{}", "mitigations": "method {}", "metrics": "metric {}",
             "view_providers": "view provider {}", "region_proposers": "region proposer {}"}


def cli_name(kind: str, name: str) -> str:
    """A record's name as the CLI takes it (datasets are ``robust/<name>``)."""
    return f"robust/{name}" if kind == "datasets" else name


#: ``--help TOPIC`` names of records other than methods and datasets (their names may coincide)
_TOPIC_PREFIXES = {"metrics": "metric/", "view_providers": "views/", "region_proposers": "regions/"}


def help_topic(kind: str, name: str) -> str:
    """A record's ``--help TOPIC`` name: ``dfr``, ``robust/waterbirds``, ``views/masks``, ``regions/grid``."""
    return _TOPIC_PREFIXES.get(kind, "") + cli_name(kind, name)


def record_heading(kind: str, name: str) -> str:
    return _HEADINGS.get(kind, f"{kind[:-1].replace('_', ' ')} {{}}").format(name)


def add_spec_flags(parser: argparse.ArgumentParser, registry: Registry, kinds: Iterable[str] = OPTION_KINDS,
                   only: Callable[[str, str], bool] | None = None) -> None:
    """The flags of every registered record that declares an ``options`` dataclass, one group
    (headed ``method dfr``, ``dataset robust/waterbirds``, ...) per record; ``only(kind, name)``
    filters.  Records of one plugin may share a declaration (the same :func:`option` field,
    inherited or nested: RaVL's ``ravl`` and ``clip_ft``); any other flag declared twice is one
    :class:`PluginError` naming both plugins and the flag."""
    from .argtypes import config_flags

    owners = flag_owners(parser)
    for kind in kinds:
        shared: dict[tuple[type, str], list[str]] = {}  # one dataclass under one prefix: one set of flags
        for name, spec in getattr(registry, kind).items():
            if spec.options is None or (only is not None and not only(kind, name)):
                continue
            plugin = registry.owner(kind, name)
            heading = record_heading(kind, name)
            who = f"plugin {plugin!r} ({heading})"
            title = f"{heading} (plugin {plugin})"
            group, actions, shared = None, [], []
            for flag in config_flags(spec.options, spec.option_prefix):
                existing = parser._option_string_actions.get(flag.flag)
                if existing is not None:
                    first = owners.get(flag.flag)
                    if first is None or first[0] != plugin or first[2] is not flag.declaration:
                        raise _conflict(parser, flag.flag, who)
                    actions.append(existing)
                    shared.append(flag.flag)
                    continue
                if group is None:
                    group = parser.add_argument_group(title)
                try:
                    actions.append(group.add_argument(flag.flag, **flag.kwargs))
                except argparse.ArgumentError:
                    raise _conflict(parser, flag.flag, who) from None
                owners[flag.flag] = (plugin, heading, flag.declaration)
            if shared:
                note = f"also reads {', '.join(shared)} (listed under {owners[shared[0]][1]})"
                if group is None:
                    group = parser.add_argument_group(title, note)
                else:
                    group.description = note
            help_topics(parser)[help_topic(kind, name)] = (title, actions)

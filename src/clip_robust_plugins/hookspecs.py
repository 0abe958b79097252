"""Hook specifications: the whole plugin API of clip-robust-plugins.

A plugin is any module (or object) with functions decorated by
``clip_robust_plugins.hookimpl`` whose names match the hooks below.  Registration
hooks receive a ``register`` callback, as in simonw/llm: call it once per record.
Installed packages are found through the entry-point group ``clip_robust_plugins``;
a module can also be loaded for one run with ``--plugin my.module``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pluggy

PROJECT_NAME = "clip_robust_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_datasets(register: Callable) -> None:
    """Register group-robustness datasets: ``register(DatasetSpec(...))``.

    Each becomes ``--dataset robust/<name>``.
    """


@hookspec
def register_metrics(register: Callable) -> None:
    """Register group-aware metrics: ``register(MetricSpec(...))``.

    Every registered metric is computed for every evaluated method.
    """


@hookspec
def register_mitigations(register: Callable) -> None:
    """Register mitigation methods: ``register(MitigationSpec(...))``.

    Selected per run with ``--mitigation NAME``; zero-shot is always evaluated as the baseline.
    """


@hookspec
def register_model_loaders(register: Callable) -> None:
    """Register model types: ``register(ModelLoaderSpec(...))`` (selected with ``--model_type``)."""


@hookspec
def register_checkpoints(register: Callable) -> None:
    """Register local checkpoints: ``register(CheckpointSpec(...))``.

    ``--model M --pretrained TAG`` then resolves to the registered file, offline.
    """


@hookspec
def register_view_providers(register: Callable) -> None:
    """Register foreground/background view providers: ``register(ViewProviderSpec(...))``.

    Used by test-time methods such as SEraser; a segmenter plugin (e.g. Grounded-SAM)
    registers one to replace the dataset's masks or the augmentation fallback.
    """


@hookspec
def register_region_proposers(register: Callable) -> None:
    """Register region proposers: ``register(RegionProposerSpec(...))``.

    Used by region-level methods such as RaVL discovery (quadrants, grids, dataset boxes,
    or a third party's detector).
    """


@hookspec
def register_commands(register: Callable) -> None:
    """Register subcommands of ``clip_benchmark_robust``: ``register(CommandSpec(...))``.

    ``discover`` (RaVL) and ``report`` are built-in commands registered this way.
    """


@hookspec
def add_arguments(parser: argparse._ArgumentGroup) -> None:
    """Legacy: add command-line flags to ``eval`` (and ``demo``), like tox's ``tox_add_option``.

    New plugins declare ``options=``/``option_prefix=`` on their records instead (one config
    dataclass; the record receives its typed config).  ``parser`` is an argument group titled
    after the plugin.  A flag another plugin declares already is one error naming both.
    """

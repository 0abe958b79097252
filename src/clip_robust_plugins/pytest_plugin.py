"""pytest fixtures for clip-robust-plugins and for authors of third-party plugins.

Loaded automatically in every pytest session of an environment where clip-robust-plugins
is installed (entry point ``pytest11``; disable with ``-p no:clip_robust_plugins``).
Importing this module is cheap: torch, open_clip and the package's own modules are only
imported when a fixture is used.

Fixtures:

- ``crp_tiny_model`` (session): ``(model, transform, tokenizer)`` of the shipped tiny
  open_clip model ``crp-tiny`` / ``spurious_shapes``;
- ``crp_tiny_shards`` (session): the root of a tiny ``robust/spurious_shapes`` shard set
  (48/24/24 images at 32 px; select it with :data:`TINY_SHARDS_FLAGS`);
- ``crp_plugin_manager``: a fresh plugin manager (built-ins only) installed as the
  process-wide one, with ``register(plugin)`` to add the plugin under test;
- ``crp_eval``: runs ``clip_benchmark_robust eval`` in-process with small, offline,
  CPU-friendly defaults and returns the results JSON.

Example::

    import my_plugin

    def test_my_mitigation(crp_plugin_manager, crp_eval):
        crp_plugin_manager.register(my_plugin)
        results = crp_eval(mitigation=["my_method"])
        assert results["metrics"]["my_method/worst_group_acc"] >= 0.0
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

TINY_MODEL = "crp-tiny"
TINY_PRETRAINED = "spurious_shapes"
#: the ShapesConfig of ``crp_tiny_shards``
TINY_SHARDS_CONFIG = {"train_size": 48, "val_size": 24, "test_size": 24, "image_size": 32, "seed": 0}
#: eval flags that select ``crp_tiny_shards`` as ``robust/spurious_shapes`` (add ``--dataset_root ROOT``)
TINY_SHARDS_FLAGS = (
    "--shapes_train_size", "48", "--shapes_val_size", "24", "--shapes_test_size", "24",
    "--shapes_image_size", "32", "--shapes_seed", "0",
)
SHAPES_DATASET = "robust/spurious_shapes"


def _packaged_checkpoint_or_skip() -> None:
    """Skip the test when the shipped crp-tiny checkpoint is not in the installed package."""
    from . import models

    specs: list = []
    models.register_checkpoints(register=specs.append)  # the built-in's own registration, no global state
    paths = [s.path for s in specs if (s.model, s.pretrained) == (TINY_MODEL, TINY_PRETRAINED)]
    if not paths or not Path(paths[0]).is_file():
        where = paths[0] if paths else "(no such checkpoint registered)"
        pytest.skip(f"the packaged {TINY_MODEL}/{TINY_PRETRAINED} checkpoint is missing: {where}")


@pytest.fixture(scope="session")
def crp_tiny_model():
    """``(model, transform, tokenizer)`` of the shipped tiny CLIP, on the CPU, in eval mode.

    Loaded once per session through :func:`clip_robust_plugins.models.load_open_clip`
    (``crp-tiny`` / ``spurious_shapes``: 32 px images, 64-d embeddings, trained on
    ``robust/spurious_shapes``).  Skips the test only when the packaged checkpoint file is
    missing.  The model is shared: do not train it in place (``copy.deepcopy`` it).
    """
    _packaged_checkpoint_or_skip()
    from .models import load_open_clip

    model, transform, tokenizer = load_open_clip(TINY_MODEL, TINY_PRETRAINED, device="cpu")
    model.eval()
    return model, transform, tokenizer


@pytest.fixture(scope="session")
def crp_tiny_shards(tmp_path_factory) -> Path:
    """Root (a :class:`pathlib.Path`) of a tiny grouped shard set, generated once per session.

    It is ``robust/spurious_shapes`` with :data:`TINY_SHARDS_CONFIG` (48 train, 24 val,
    24 test images of 32 px; square/diamond x land/water, 95 %-correlated train split,
    group-balanced val/test).  Read it with
    ``clip_robust_plugins.datasets.wds.GroupedShards(root)``, evaluate it with
    ``--dataset robust/spurious_shapes --dataset_root ROOT`` plus :data:`TINY_SHARDS_FLAGS`
    (``crp_eval`` does that by default), or as ``--dataset wds/spurious_shapes``.
    Treat it as read-only: it is shared by the whole session.
    """
    from .datasets.spurious_shapes import ShapesConfig, generate

    root = tmp_path_factory.mktemp("crp_tiny_shards") / "spurious_shapes"
    generate(root, ShapesConfig(**TINY_SHARDS_CONFIG), progress=False)
    return root


class PluginManagerHandle:
    """The ``crp_plugin_manager`` fixture's value.

    - ``pm``: the :class:`pluggy.PluginManager` (built-in plugins only; installed plugins
      are not loaded, so the test sees just what it registers);
    - ``registry``: the :class:`~clip_robust_plugins.plugins.Registry` built from it, kept
      current by :meth:`register` and :meth:`unregister`;
    - ``register(plugin, name=None)``: add a plugin (a module or any object with
      ``hookimpl`` functions) and rebuild the registry.
    """

    def __init__(self, pm) -> None:
        from .plugins import collect_registry

        self.pm = pm
        self.registry = collect_registry(pm)
        self._added: list[object] = []

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register ``plugin`` and rebuild the registry; returns its plugin name.

        When the new registry cannot be built (a duplicate name, a wrong record type) the
        plugin is unregistered again and the :class:`~clip_robust_plugins.plugins.PluginError`
        propagates, so ``pytest.raises`` can check it and the manager stays usable.
        """
        from .plugins import collect_registry

        plugin_name = self.pm.register(plugin, name=name)
        if plugin_name is None:
            raise ValueError(f"plugin {name or plugin!r} is blocked in this plugin manager")
        try:
            self.registry = collect_registry(self.pm)
        except BaseException:
            self.pm.unregister(plugin)
            raise
        self._added.append(plugin)
        return plugin_name

    def unregister(self, plugin: object) -> None:
        """Remove a plugin added with :meth:`register` and rebuild the registry."""
        from .plugins import collect_registry

        self.pm.unregister(plugin)
        self._added.remove(plugin)
        self.registry = collect_registry(self.pm)

    def names(self) -> list[str]:
        """Names of every registered plugin (built-ins included)."""
        return sorted(self.pm.get_name(p) for p in self.pm.get_plugins())

    def _teardown(self) -> None:
        for plugin in reversed(self._added):
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
        self._added.clear()


@pytest.fixture
def crp_plugin_manager() -> Iterator[PluginManagerHandle]:
    """A fresh plugin manager for this test.

    Holds only the built-in plugins (``CLIP_ROBUST_PLUGINS`` is treated as empty while it
    is built), so the test sees exactly what it registers with ``.register(plugin)``.
    ``crp_eval`` in the same test runs with this manager.  Afterwards the test plugins are
    unregistered.
    """
    from .plugins import ENV_ALLOWLIST, build_plugin_manager

    with pytest.MonkeyPatch.context() as m:
        m.setenv(ENV_ALLOWLIST, "")
        pm = build_plugin_manager()
    handle = PluginManagerHandle(pm)
    try:
        yield handle
    finally:
        handle._teardown()


class EvalRunner:
    """The ``crp_eval`` fixture's value: call it to run one in-process eval."""

    def __init__(self, request, tmp_path: Path, cache_dir: Path) -> None:
        self._request = request
        self._tmp_path = tmp_path
        self._cache_dir = cache_dir
        self._runs = 0
        #: the argv of the last run (for messages and debugging)
        self.last_argv: list[str] = []
        #: the results JSON path of the last run
        self.last_output: Path | None = None

    def __call__(
        self,
        *extra_args: str,
        dataset: str = SHAPES_DATASET,
        dataset_root: str | os.PathLike | None = None,
        mitigation: Sequence[str] = (),
        plugins: Sequence[str] = (),
        model: str = TINY_MODEL,
        pretrained: str = TINY_PRETRAINED,
    ) -> dict[str, Any]:
        """Run ``clip_benchmark_robust eval`` in-process; returns the loaded results JSON.

        Defaults: ``--model crp-tiny --pretrained spurious_shapes``, ``dataset`` on
        ``crp_tiny_shards`` (other datasets get a fresh root under the test's tmp dir),
        ``--num_workers 0 --no_amp --batch_size 64``, a session-wide tmp
        ``--feature_cache`` and a tmp ``--output``.  ``plugins`` are passed as
        ``--plugin MODULE``; ``extra_args`` are appended last, so they override.  Fails
        the test when the command exits non-zero (its stderr is in the captured output).
        """
        from . import cli
        from . import plugins as crp_plugins

        if model == TINY_MODEL and pretrained == TINY_PRETRAINED:
            _packaged_checkpoint_or_skip()
        self._runs += 1
        out_dir = self._tmp_path / f"crp_eval_{self._runs}"
        flags: list[str] = []
        if dataset_root is None:
            if dataset == SHAPES_DATASET:
                dataset_root = self._request.getfixturevalue("crp_tiny_shards")
                flags += TINY_SHARDS_FLAGS
            else:
                dataset_root = self._tmp_path / "crp_eval_data" / "{dataset_cleaned}"
        argv = [
            "eval", "--dataset", dataset, "--dataset_root", str(dataset_root),
            "--model", model, "--pretrained", str(pretrained),
            "--output", str(out_dir / "{dataset}.json"), "--feature_cache", str(self._cache_dir),
            "--num_workers", "0", "--no_amp", "--batch_size", "64", *flags,
        ]
        if mitigation:
            argv += ["--mitigation", *mitigation]
        for module in plugins:
            argv += ["--plugin", module]
        argv += [str(a) for a in extra_args]
        self.last_argv = argv

        handle = None
        if "crp_plugin_manager" in self._request.fixturenames:
            handle = self._request.getfixturevalue("crp_plugin_manager")
        with pytest.MonkeyPatch.context() as m:
            if handle is not None:
                m.setattr(cli, "build_plugin_manager", _fixed_manager(handle))
            rc = cli.main(argv)
            if handle is not None:  # --plugin modules may have been added: keep the handle's registry current
                handle.registry = crp_plugins.collect_registry(handle.pm)
        if rc != 0:
            pytest.fail(f"clip_benchmark_robust {' '.join(argv)} exited with {rc}", pytrace=False)
        outputs = sorted(out_dir.glob("*.json"))
        if len(outputs) != 1:
            pytest.fail(f"expected one results JSON in {out_dir}, found {[p.name for p in outputs]}", pytrace=False)
        self.last_output = outputs[0]
        with open(outputs[0]) as fh:
            return json.load(fh)


def _fixed_manager(handle: PluginManagerHandle):
    """A stand-in for ``build_plugin_manager`` that returns the fixture's manager."""

    def build(extra_modules: Sequence[str] = (), trace: bool | None = None):
        for module in extra_modules:
            if not handle.pm.has_plugin(module):
                handle.register(importlib.import_module(module), name=module)
        return handle.pm

    return build


@pytest.fixture(scope="session")
def _crp_feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crp_feature_cache")


@pytest.fixture
def crp_eval(request, tmp_path, _crp_feature_cache) -> EvalRunner:
    """Run ``clip_benchmark_robust eval`` in-process and get the results JSON back.

    ``crp_eval(*extra_args, dataset=..., dataset_root=..., mitigation=[...], plugins=[...],
    model=..., pretrained=...)`` returns the parsed results (``results["metrics"]`` holds
    the flat ``<method>/<metric>`` keys).  By default it evaluates the tiny model on
    ``crp_tiny_shards`` (skipping when the packaged checkpoint is missing, as
    ``crp_tiny_model`` does), on the CPU without AMP, with a session-wide feature cache.
    Used together with ``crp_plugin_manager``, the run uses that manager, so plugins
    registered with ``crp_plugin_manager.register`` take part.
    """
    return EvalRunner(request, tmp_path, _crp_feature_cache)

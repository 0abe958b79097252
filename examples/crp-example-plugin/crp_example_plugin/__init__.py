"""crp-example-plugin: one dataset, one metric and one mitigation for clip-robust-plugins.

This module is the plugin (the entry point ``example`` in the group
``clip_robust_plugins`` names it): the functions below, marked with
``clip_robust_plugins.hookimpl``, are the hooks it implements.

- ``register_datasets``: ``robust/example_stripes`` (see :mod:`.stripes`; its flag
  ``--stripes_size`` comes from ``options=``) and ``robust/example_photos`` (see :mod:`.photos`,
  a CSV reader built with the public reader kit);
- ``register_metrics``: ``example_group_acc_std`` -> ``group_acc_std``;
- ``register_mitigations``: ``example_prior_shift`` (see :mod:`.prior_shift`).
"""

from __future__ import annotations

import math

import numpy as np

from clip_robust_plugins import DatasetSpec, MetricSpec, Predictions, hookimpl

from . import photos, prior_shift, stripes

__version__ = "0.1.0"


def group_acc_std(p: Predictions) -> dict[str, float]:
    """Population standard deviation of the accuracies of the non-empty groups (default grouping).

    0 when every group is equally well classified; NaN when there are no samples.
    """
    groups = p.schema.group_ids(p.fields)
    n_groups = p.schema.n_groups()
    correct = (np.asarray(p.pred) == np.asarray(p.y)).astype(np.float64)
    counts = np.bincount(groups, minlength=n_groups)
    hits = np.bincount(groups, weights=correct, minlength=n_groups)
    present = counts > 0
    if not present.any():
        return {"group_acc_std": math.nan}
    return {"group_acc_std": float(np.std(hits[present] / counts[present]))}


@hookimpl
def register_datasets(register):
    register(
        DatasetSpec(
            name=stripes.NAME,
            load=stripes.load,
            description="example plugin: stripe orientation (3 classes) x warm/cool palette (spurious), "
            "90%-correlated train split, group-balanced val/test, generated on first use",
            options=stripes.StripesConfig,
            option_prefix="stripes_",
        )
    )
    register(photos.SPEC)


@hookimpl
def register_metrics(register):
    register(MetricSpec("example_group_acc_std", group_acc_std, "std of the non-empty groups' accuracies"))


@hookimpl
def register_mitigations(register):
    register(prior_shift.SPEC)


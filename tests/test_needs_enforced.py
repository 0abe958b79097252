"""A method's ``Needs`` is its one declaration of the splits and labels it reads, and it is enforced:
the run context a method is handed refuses anything else, and the results record what was read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_robust_plugins import GroupSchema, Mitigation, MitigationSpec, Needs, hookimpl
from clip_robust_plugins.pytest_plugin import TINY_SHARDS_FLAGS


class ReadsInFit(Mitigation):
    """Zero-shot predictions; ``fit`` runs ``read(ctx)`` (what the test wants to read)."""

    def __init__(self, read):
        self.read = read
        self.info: dict = {}

    def fit(self, ctx):
        self.info = self.read(ctx) or {}

    def predict(self, ctx, split):
        return ctx.zeroshot_logits(ctx.features(split).features)

    def hyperparameters(self):
        return self.info


def group_counts(ctx):
    ids = ctx.labels("val", "group").numpy()
    return {"val_group_counts": np.bincount(ids, minlength=len(ctx.schema.group_names())).tolist()}


def class_of_val(ctx):
    return {"n_val_classes": len(set(ctx.features("val").y.tolist()))}


class ReaderPlugin:
    @hookimpl
    def register_mitigations(self, register):
        def spec(name, read, needs):
            register(MitigationSpec(name, create=lambda config: ReadsInFit(read), needs=needs))

        spec("test_undeclared_split", lambda ctx: ctx.features("val"), Needs())
        spec("test_undeclared_groups", lambda ctx: ctx.features("val").group_ids(),
             Needs(fit_splits=("val",), labels=frozenset({"class"})))
        spec("test_undeclared_classes", lambda ctx: ctx.labels("val"), Needs(fit_splits=("val",)))
        spec("test_eval_labels", lambda ctx: ctx.features(ctx.eval_split).y,
             Needs(fit_splits=("val",), labels=frozenset({"class", "group"})))
        spec("test_samples_of_train", lambda ctx: next(iter(ctx.dataset.samples("train", None))),
             Needs(fit_splits=("val",), labels=frozenset({"class"})))
        spec("test_group_counts", group_counts, Needs(fit_splits=("val",), labels=frozenset({"class", "group"})))
        spec("test_class_of_val", class_of_val, Needs(fit_splits=("val",), labels=frozenset({"class"})))
        spec("test_unlabelled_eval", lambda ctx: {"n": len(ctx.features(ctx.eval_split))}, Needs())


@pytest.fixture
def eval_with(crp_plugin_manager, run_cli, crp_tiny_shards, tmp_path, monkeypatch):
    from clip_robust_plugins import cli

    crp_plugin_manager.register(ReaderPlugin(), name="readers_plugin")
    monkeypatch.setattr(cli, "build_plugin_manager", lambda *a, **k: crp_plugin_manager.pm)

    def run(*methods):
        out = tmp_path / f"{'_'.join(methods)}.json"
        rc, _, err = run_cli("eval", "--dataset", "robust/spurious_shapes", "--dataset_root", crp_tiny_shards,
                             *TINY_SHARDS_FLAGS, "--model", "crp-tiny", "--pretrained", "spurious_shapes", "--no_amp",
                             "--num_workers", "0", "--quiet", "--feature_cache", tmp_path / "cache", "--output", out,
                             "--mitigation", *methods)
        return rc, err, (json.loads(out.read_text()) if rc == 0 else None), out

    return run


@pytest.mark.parametrize("method, message", [
    ("test_undeclared_split", "method 'test_undeclared_split' read split 'val', which it does not declare"),
    ("test_undeclared_groups", "method 'test_undeclared_groups' read group labels (of split 'val') but declares "
                               "Needs.labels=['class']"),
    ("test_undeclared_classes", "method 'test_undeclared_classes' read class labels (of split 'val') but declares "
                                "Needs.labels=[]"),
    ("test_eval_labels", "method 'test_eval_labels' read class labels of split 'test', which is not among its "
                         "Needs.fit_splits=('val',)"),
    ("test_samples_of_train", "method 'test_samples_of_train' read split 'train', which it does not declare"),
])
def test_reading_what_was_not_declared_is_one_line_naming_the_method(eval_with, method, message):
    rc, err, _, out = eval_with(method)
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("clip_benchmark_robust: error:") and message in last, last
    assert not out.exists()


def test_declared_reads_work_and_labels_used_records_them(eval_with, crp_tiny_shards):
    rc, err, dump, _ = eval_with("test_group_counts", "test_class_of_val", "test_unlabelled_eval", "erm_head")
    assert rc == 0, err
    methods = dump["robust"]["methods"]
    # the group ids read through ctx.labels are the dataset's own (counted independently from groups.json)
    schema = GroupSchema.read(crp_tiny_shards / "groups.json")
    assert methods["test_group_counts"]["hyperparameters"]["val_group_counts"] == list(schema.counts("val"))
    assert methods["test_class_of_val"]["hyperparameters"]["n_val_classes"] == 2
    assert methods["test_unlabelled_eval"]["hyperparameters"]["n"] == 24  # the evaluated split, features only
    assert methods["test_group_counts"]["labels_used"] == {"labels": "group", "splits": {"val": "group"}}
    assert methods["test_class_of_val"]["labels_used"] == {"labels": "class", "splits": {"val": "class"}}
    assert methods["test_unlabelled_eval"]["labels_used"] == {"labels": "none", "splits": {}}
    assert methods["zeroshot"]["labels_used"] == {"labels": "none", "splits": {}}
    assert methods["erm_head"]["labels_used"] == {"labels": "class", "splits": {"train": "class"}}

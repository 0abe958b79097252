"""Which engine a run goes to (ours or clip_benchmark's), its data root and its results path."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..datasets.plain_wds import is_class_only_root
from ..datasets.sources import is_remote_root
from ..datasets.wds import has_groups
from ..errors import EvalError

ROBUST_PREFIX = "robust/"
WDS_PREFIX = "wds/"
SEED_FIELD = "{seed}"


def is_group_dataset(dataset: str, root: str) -> bool:
    """True for ``robust/<name>``, for ``wds/<name>`` whose local root has groups.json, and for
    every ``wds/`` root that is a URL or ``pipe:``: those never go to clip_benchmark, whose
    reader runs ``curl`` on them through a shell (our reader fetches groups.json, once)."""
    if dataset.startswith(ROBUST_PREFIX):
        return True
    return dataset.startswith(WDS_PREFIX) and (is_remote_root(root) or has_groups(root))


def is_class_only_wds(dataset: str, root: str) -> bool:
    """``wds/<name>`` whose local root is clip_benchmark's own classification shards (no groups.json)."""
    return dataset.startswith(WDS_PREFIX) and is_class_only_root(root)


def is_ours(args: argparse.Namespace) -> bool:
    """Whether this run goes to our engine: a group dataset, or a zero-shot run on
    clip_benchmark's own local classification shards (class-level metrics)."""
    root = resolve_root(args)
    zeroshot = args.task in ("auto", "zeroshot_classification")
    if is_group_dataset(args.dataset, root) or (zeroshot and is_class_only_wds(args.dataset, root)):
        if not zeroshot:
            raise EvalError(
                f"{args.dataset}: task {args.task!r} is not available on group datasets here; "
                "use zeroshot_classification (with --mitigation)"
            )
        return True
    return False


def check_clip_benchmark_run(args: argparse.Namespace) -> None:
    """A run that goes to clip_benchmark must not carry flags only our engine reads."""
    if args.mitigation:
        raise EvalError(
            f"--mitigation needs a group dataset (robust/<name>, or wds/<name> whose root has groups.json); "
            f"{args.dataset} at {resolve_root(args)!r} has none"
        )
    ours = [flag for flag, on in (("--shard_pattern", args.shard_pattern is not None),
                                  ("--allow_pipe_urls", args.allow_pipe_urls),
                                  ("--skip_bad_samples", args.skip_bad_samples)) if on]
    if ours:
        raise EvalError(f"{ours[0]} applies to datasets our engine reads; {args.dataset} runs through clip_benchmark")


def resolve_root(args: argparse.Namespace) -> str:
    """clip_benchmark's ``--dataset_root`` templating (``{dataset}``, ``{dataset_cleaned}``)."""
    name = args.dataset.split("/", 1)[1] if args.dataset.startswith(WDS_PREFIX) else args.dataset
    return args.dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))


def seeds(value: int | Sequence[int]) -> list[int]:
    """``--seed``'s values in order, each once (one int, as clip_benchmark's parser gives, or a list)."""
    return list(dict.fromkeys([value] if isinstance(value, int) else value))


def check_seed_template(args: argparse.Namespace) -> None:
    """Several seeds write one results file each: ``--output`` must name them with ``{seed}``."""
    if len(seeds(args.seed)) > 1 and SEED_FIELD not in args.output:
        raise EvalError(
            f"--seed {' '.join(map(str, seeds(args.seed)))} writes one results file per seed: "
            f"put {SEED_FIELD} in --output (e.g. --output 'results/{SEED_FIELD}.json'); got {args.output!r}"
        )


def output_path(args: argparse.Namespace, task: str = "zeroshot_classification", seed: int | None = None) -> str:
    """The results path from clip_benchmark's ``--output`` template, filled as it fills it,
    plus ``{seed}`` (this run's seed)."""
    dataset_name = args.dataset.split("/", 1)[1] if args.dataset.startswith(WDS_PREFIX) else args.dataset
    is_file = os.path.isfile(args.pretrained)
    return args.output.format(
        model=args.model,
        pretrained=os.path.basename(args.pretrained) if is_file else args.pretrained,
        pretrained_full_path=args.pretrained.replace("/", "_") if is_file else args.pretrained,
        task=task,
        dataset=dataset_name.replace("/", "_"),
        language=args.language,
        seed=seeds(args.seed)[0] if seed is None else seed,
    )

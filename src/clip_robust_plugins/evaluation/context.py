"""The run context of ``eval``: the dataset, a feature extractor over the cache, a model built on
first use; and clip_benchmark's custom class-name / template files."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..argtypes import spec_config
from ..errors import stage

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.base import RobustDataset
    from ..mitigations.base import RunContext
    from ..plugins import Registry


def custom_names(path: str | None, dataset: str) -> Any:
    """clip_benchmark's --custom_classname_file / --custom_template_file lookup."""
    if not path:
        return None
    import json

    with open(path) as fh:
        table = json.load(fh)
    short = dataset.split("/", 1)[1]
    for key in (dataset, short):
        if key in table:
            return table[key]
    return None


def build_context(args: argparse.Namespace, registry: Registry, dataset: RobustDataset, split: str,
                  classnames: Sequence[str] | None = None, templates: Any = None,
                  config_of: Any = None) -> RunContext:
    """The run context of ``eval`` (and of commands that read a dataset the same way, such as
    ``discover``): the dataset, a feature extractor over the cache, and a model built on first use.
    ``config_of(spec)`` gives a record's typed config (default: from ``args``' flags)."""
    from ..features import FeatureCache, FeatureExtractor, default_cache_dir
    from ..mitigations.base import RunContext

    spec = registry.model_loader(args.model_type)

    owner = registry.owners.get(("model_loaders", args.model_type), "?")

    def load_model():
        with stage(f"model loader {args.model_type!r} (plugin {owner!r})",
                   f"load (--model {args.model} --pretrained {args.pretrained})"):
            model, transform, tokenizer = spec.bind(registry)(
                model_name=args.model, pretrained=args.pretrained, cache_dir=args.model_cache_dir, device=args.device
            )
        model.eval()
        return model, transform, tokenizer

    ctx: RunContext | None = None
    cache_dir = None if args.no_feature_cache else (args.feature_cache or default_cache_dir())
    progress = bool(getattr(args, "verbose", True))
    extractor = FeatureExtractor(
        load_model=lambda: (ctx.model, ctx.transform),
        registry=registry,
        model_type=args.model_type,
        model_name=args.model,
        pretrained=args.pretrained,
        device=args.device,
        amp=args.amp,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cache=FeatureCache(cache_dir),
        progress=progress,
        skip_bad_samples=args.skip_bad_samples,
    )
    ctx = RunContext(
        dataset=dataset,
        dataset_name=args.dataset,
        classnames=classnames or dataset.classnames,
        templates=templates or dataset.templates,
        load_model=load_model,
        extractor=extractor,
        registry=registry,
        device=args.device,
        amp=args.amp,
        seed=args.seed if isinstance(args.seed, int) else list(args.seed)[0],
        eval_split=split,
        progress=progress,
        model_name=args.model, pretrained=args.pretrained, model_type=args.model_type, model_cache_dir=args.model_cache_dir,
        batch_size=args.batch_size, num_workers=args.num_workers,
        config_of=config_of or (lambda spec: spec_config(spec, args)),
    )
    return ctx

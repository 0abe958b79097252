"""The feature extractor: one read and decode per split for every kind a run needs, cached."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..datasets.bad_samples import SKIP_FLAG, SkippedSample, check_declared_counts, collate_samples, dataset_location
from ..datasets.base import DatasetError, RobustDataset
from ..distributed import DistContext
from ..errors import one_line
from .cache import HEAD_KIND, CacheKey, FeatureCache, pretrained_identity, software_versions
from .kinds import WHOLE_IMAGE, FeatureKind, FeatureSet, ImageSetKind, SampleViews, kind_name
from .rows import RowBuffer
from .threads import ThreadBudget, available_cores, fetched_with, thread_budget, torch_threads, worker_init
from .towers import FEATURE_KINDS, _batch_features, autocast, encode_image_normalized


def _resolve_checkpoint(model_type: str, model_name: str, pretrained: str, registry: Any) -> str:
    """A registered checkpoint tag (``crp-tiny``/``spurious_shapes``) as the file it names,
    so the cache notices when a package update replaces the file."""
    if model_type != "open_clip" or registry is None:
        return pretrained
    checkpoint = registry.checkpoint(model_name, pretrained)
    return str(checkpoint.path) if checkpoint is not None and checkpoint.path.is_file() else pretrained


#: the reason text of a sample dropped for non-finite features
NON_FINITE = "non-finite"


class FeatureExtractor:
    """Computes (or loads from the cache) features of a dataset split with one model."""

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        transform: Callable | None = None,
        *,
        load_model: Callable[[], tuple[torch.nn.Module, Callable]] | None = None,
        registry: Any = None,
        model_type: str,
        model_name: str,
        pretrained: str,
        device: str = "cpu",
        amp: bool = True,
        batch_size: int = 64,
        num_workers: int | None = None,
        cache: FeatureCache | None = None,
        progress: bool = True,
        skip_bad_samples: bool = False,
    ):
        if (model is None) == (load_model is None):
            raise ValueError("FeatureExtractor needs either model and transform, or load_model")
        self._model = model
        self._transform = transform
        self._load_model = load_model
        self.model_type = model_type
        self.model_name = model_name
        self.pretrained_id = pretrained_identity(_resolve_checkpoint(model_type, model_name, pretrained, registry))
        self.device = device
        self.amp = amp
        self.batch_size = batch_size
        #: DataLoader workers of a pass (None: the rule in :mod:`.threads` for this machine's cores)
        self.num_workers = thread_budget(available_cores(), device, num_workers).workers
        self.cache = cache or FeatureCache(None)
        self.progress = progress
        self.extracted: list[dict[str, Any]] = []  # what ran (for the report and the benchmarks)
        #: the torchrun job this extractor shares passes with (None: this process alone)
        self.dist: DistContext | None = None
        #: drop samples whose image does not decode (``--skip_bad_samples``) instead of failing
        self.skip_bad_samples = skip_bad_samples
        #: split -> the samples dropped from it (those splits' features are never cached)
        self.skipped_samples: dict[str, list[SkippedSample]] = {}

    @property
    def budget(self) -> ThreadBudget:
        """The cores' split between the decoding workers and the forward's threads (see :mod:`.threads`)."""
        return thread_budget(available_cores(), self.device, self.num_workers)

    @property
    def model(self) -> torch.nn.Module:
        """The model, built on first use (only a cache miss needs it)."""
        if self._model is None:
            self._model, self._transform = self._load_model()
        return self._model

    @property
    def transform(self) -> Callable:
        self.model  # noqa: B018 - builds the model and its transform together
        return self._transform

    def key(self, dataset: RobustDataset, dataset_name: str, split: str, kind: FeatureKind) -> CacheKey:
        return CacheKey(
            model_type=self.model_type,
            model=self.model_name,
            pretrained=self.pretrained_id,
            dataset=dataset_name,
            dataset_fingerprint=dataset.fingerprint(split),
            split=split,
            views=kind.describe() if isinstance(kind, ImageSetKind) else "",
            kind=kind_name(kind),
            amp=self.amp,
            device_type=str(self.device).split(":")[0],
            software=software_versions(),
        )

    def head_key(self, classnames: Sequence[str], templates: Any) -> CacheKey:
        """The cache key of the zero-shot text head (model, checkpoint, class names, templates)."""
        digest = hashlib.sha256(json.dumps([list(classnames), templates], sort_keys=True).encode()).hexdigest()[:32]
        return CacheKey(
            model_type=self.model_type, model=self.model_name, pretrained=self.pretrained_id,
            dataset="", dataset_fingerprint=digest, split="", views="", kind=HEAD_KIND, amp=self.amp,
            device_type=str(self.device).split(":")[0], software=software_versions(),
        )

    def extract(
        self, dataset: RobustDataset, dataset_name: str, split: str, kinds: Sequence[FeatureKind] = ("image",)
    ) -> dict[str, FeatureSet]:
        """Features of ``split`` for each kind, by kind name.

        Every uncached kind, plain or image-set (:class:`ImageSetKind`), comes from one read
        and decode of the split; cached kinds are not read again.
        """
        unknown = [k for k in kinds if not isinstance(k, ImageSetKind) and k not in FEATURE_KINDS]
        if unknown:
            raise KeyError(f"unknown feature kind(s) {unknown}; known: {sorted(FEATURE_KINDS)}")
        out: dict[str, FeatureSet] = {}
        todo: list[FeatureKind] = []
        main = self.dist is None or self.dist.is_main
        for kind in kinds:
            cached = self.cache.load(self.key(dataset, dataset_name, split, kind), dataset.schema) if main else None
            if cached is not None:
                out[kind_name(kind)] = cached
            else:
                todo.append(kind)
        if self.dist is not None:  # rank 0 owns the cache; every rank extracts what it lacks
            todo_names = self.dist.broadcast([kind_name(k) for k in todo])
            todo = [k for k in kinds if kind_name(k) in todo_names]
        if not todo:
            return out
        self.model  # noqa: B018 - build the model before the pass, so the pass time is the pass alone
        started = time.perf_counter()
        fresh = self._run(dataset, split, todo)
        seconds = time.perf_counter() - started
        if fresh is None:  # a worker rank: its share went to rank 0
            return out
        for kind in todo:
            fs = fresh[kind_name(kind)]
            # a split with skipped samples is not cached: a cache entry always holds the whole split
            skipped = bool(self.skipped_samples.get(split))
            path = None if skipped else self.cache.save(self.key(dataset, dataset_name, split, kind), fs)
            out[kind_name(kind)] = FeatureSet(fs.keys, fs.features, fs.fields, fs.schema, fs.kind, path)
        n = len(fresh[kind_name(todo[0])])
        self.extracted.append({"split": split, "kinds": [kind_name(k) for k in todo], "n": n, "seconds": round(seconds, 3),
                               "images_per_second": round(n / seconds, 2) if seconds > 0 else None,
                               "num_workers": self.num_workers, "torch_threads": self.budget.threads})
        return out

    def _run(self, dataset: RobustDataset, split: str, kinds: Sequence[FeatureKind]) -> dict[str, FeatureSet] | None:
        """One pass over this process's share of ``split``; under torchrun the shares are
        gathered on rank 0 (which gets the FeatureSets; other ranks get None)."""
        if self.dist is None:
            return self._finish(dataset, split, kinds, [self._pass(dataset, split, kinds, 0, 1)])
        try:
            share: Any = self._pass(dataset, split, kinds, self.dist.rank, self.dist.world_size)
        except Exception as exc:  # noqa: BLE001 - sent to rank 0 and re-raised on every rank
            share = exc
        shares = self.dist.gather(share if not isinstance(share, Exception) else _RankFailure(one_line(share)))
        if isinstance(share, Exception):
            raise share
        if shares is None:
            return None
        failed = [s for s in shares if isinstance(s, _RankFailure)]
        if failed:
            raise DatasetError(failed[0].message)
        return self._finish(dataset, split, kinds, shares)

    def _finish(self, dataset: RobustDataset, split: str, kinds: Sequence[FeatureKind], shares: list) -> dict[str, FeatureSet]:
        """Merge the shares, restore the dataset's order and check the result."""
        names = [kind_name(k) for k in kinds]
        order = torch.cat([s[0] for s in shares])
        all_keys = [key for s in shares for key in s[1]]
        skipped = sorted((b for s in shares for b in s[4]), key=lambda b: tuple(b.order.tolist()) if b.order is not None else ())
        if not all_keys:
            raise DatasetError(f"{dataset_location(dataset)}: split {split!r} yielded no samples")
        rank_of_row = np.lexsort((order[:, 1].numpy(), order[:, 0].numpy()))
        all_keys = [all_keys[i] for i in rank_of_row]
        index = torch.from_numpy(rank_of_row)
        field_tensor = torch.cat([s[2] for s in shares]).long()[index]
        feats = {k: torch.cat([s[3][k] for s in shares])[index] for k in names}
        if len(set(all_keys)) != len(all_keys):
            seen: set[str] = set()
            dup = next(k for k in all_keys if k in seen or seen.add(k))
            raise DatasetError(f"{dataset_location(dataset)}: split {split!r}: duplicate sample key {dup!r}")
        dataset.schema.validate_values(field_tensor.numpy(), where=f"split {split!r}: ")
        check_declared_counts(dataset, split, field_tensor.numpy(), skipped)
        if skipped and split not in self.skipped_samples:
            what = "undecodable" if all(NON_FINITE not in b.reason for b in skipped) else "bad (undecodable or non-finite)"
            print(
                f"clip_robust_plugins: warning: {SKIP_FLAG}: skipped {len(skipped)} {what} sample(s) of split "
                f"{split!r}, recorded in the results; first: {skipped[0].reason}",
                file=sys.stderr,
            )
        if skipped:
            self.skipped_samples[split] = self.skipped_samples.get(split, []) + skipped
        return {
            kind: FeatureSet(tuple(all_keys), feats[kind], field_tensor, dataset.schema, kind)
            for kind in names
        }

    @torch.no_grad()
    def _pass(self, dataset: RobustDataset, split: str, kinds: Sequence[FeatureKind], rank: int, world_size: int):
        """(order keys, sample keys, fields, {kind: features}, skipped samples) of part ``rank`` of ``split``:
        one read and decode of each sample for every kind; rows whose features are not finite
        are an error (or, with ``--skip_bad_samples``, dropped and recorded)."""
        plain = [k for k in kinds if not isinstance(k, ImageSetKind)]
        image_sets = [k for k in kinds if isinstance(k, ImageSetKind)]
        transform = SampleViews(self.transform, image_sets, whole_image=bool(plain)) if image_sets else self.transform
        names = [kind_name(k) for k in kinds]
        loader = torch.utils.data.DataLoader(
            dataset.ordered_samples(split, transform, rank, world_size),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=False,
            collate_fn=collate_samples,  # sets undecodable samples (SkippedSample) aside
            pin_memory=str(self.device).startswith("cuda"),
            worker_init_fn=worker_init if self.num_workers else None,
        )
        counts = dataset.schema.split_counts.get(split)
        expected = (sum(counts) + world_size - 1 - rank) // world_size if counts else None
        bar = tqdm(
            total=expected,
            desc=f"{split}: {'+'.join(names)} features",
            unit="img",
            disable=not self.progress,
            file=sys.stderr,
        )
        all_keys: list[str] = []
        fields, orders = RowBuffer(expected), RowBuffer(expected)  # one block each, not one per batch
        feats = {k: RowBuffer(expected) for k in names}
        skipped: list[SkippedSample] = []
        with bar, torch_threads(self.budget.threads), _stopping_workers(loader) as batches:
            # without workers this process decodes: one thread for that, the budget's for the forward
            for batch, bad in fetched_with(batches, 1) if self.num_workers == 0 else batches:
                if bad and not self.skip_bad_samples:
                    raise DatasetError(f"{bad[0].reason} (pass {SKIP_FLAG} to skip undecodable images)")
                skipped.extend(bad)
                bar.update(len(bad))
                if batch is None:
                    continue
                batch_order, batch_keys, images, batch_fields = batch
                out = self._forward(images, plain, image_sets)
                keep = self._finite_rows(dataset, split, out, batch_order, batch_keys, batch_fields, skipped)
                if keep is not None:
                    batch_order, batch_fields = batch_order[keep], batch_fields[keep]
                    batch_keys = [k for k, ok in zip(batch_keys, keep.tolist()) if ok]
                    out = {k: v[keep] for k, v in out.items()}
                orders.append(batch_order)
                for kind, values in out.items():
                    feats[kind].append(values)
                all_keys.extend(batch_keys)
                fields.append(batch_fields)
                del batch, out, images  # this batch's tensors go before the next one is decoded
                bar.update(len(batch_keys) + (0 if keep is None else int((~keep).sum())))
        if not all_keys:  # an empty share (more ranks than shards) is fine; an empty split is not
            n_fields = len(dataset.schema.fields)
            empty = {k: torch.zeros(0) for k in names}
            return torch.zeros(0, 2, dtype=torch.int64), [], torch.zeros(0, n_fields, dtype=torch.int64), empty, skipped
        return orders.rows(), all_keys, fields.rows(), {k: v.rows() for k, v in feats.items()}, skipped

    def _forward(self, images: Any, plain: Sequence[str], image_sets: Sequence[ImageSetKind]) -> dict[str, torch.Tensor]:
        """Every kind of one batch: plain kinds from the whole image, image sets (B, V, D) from their views."""
        non_blocking = str(self.device).startswith("cuda")
        out: dict[str, torch.Tensor] = {}
        with autocast(self.device, self.amp):
            whole = images.get(WHOLE_IMAGE) if isinstance(images, dict) else images
            if plain:
                for kind, values in _batch_features(self.model, whole.to(self.device, non_blocking=non_blocking), plain).items():
                    out[kind] = values.float().cpu()
            for kind in image_sets:
                views = images[kind.name].to(self.device, non_blocking=non_blocking)  # (B, V, 3, H, W) -> (B, V, D)
                flat = encode_image_normalized(self.model, views.flatten(0, 1))
                out[kind.name] = flat.float().cpu().unflatten(0, views.shape[:2])
        return out

    def _finite_rows(self, dataset: RobustDataset, split: str, out: dict[str, torch.Tensor], order: torch.Tensor,
                     keys: Sequence[str], fields: torch.Tensor, skipped: list[SkippedSample]) -> torch.Tensor | None:
        """None when every row is finite; else the rows to keep (bad ones recorded) or an error."""
        finite = {kind: torch.isfinite(v.flatten(1)).all(dim=1) for kind, v in out.items()}
        keep = torch.stack(list(finite.values())).all(dim=0)
        if bool(keep.all()):
            return None
        first = int((~keep).nonzero()[0])
        kind = next(k for k, ok in finite.items() if not ok[first])
        where = f"{dataset_location(dataset)}: split {split!r}: sample {keys[first]!r}"
        if not self.skip_bad_samples:
            raise DatasetError(f"{where}: {NON_FINITE} {kind} features (a broken checkpoint or fp16 overflow; "
                               f"pass {SKIP_FLAG} to drop such samples)")
        for i in (~keep).nonzero().flatten().tolist():
            bad_kind = next(k for k, ok in finite.items() if not ok[i])
            reason = f"{dataset_location(dataset)}: split {split!r}: sample {keys[i]!r}: {NON_FINITE} {bad_kind} features"
            skipped.append(SkippedSample(keys[i], tuple(fields[i].tolist()), reason, order[i]))
        return keep


@contextlib.contextmanager
def _stopping_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` whose worker processes stop as soon as the pass ends, also on an error.

    Otherwise a worker's re-raised exception keeps the iterator in a reference cycle until
    the garbage collector runs, whose shutdown then waits out a 5 s join timeout per pass.
    """
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own, idempotent; absent without workers
        if shutdown is not None:
            shutdown()


@dataclass(frozen=True)
class _RankFailure:
    """What a failed rank sends to rank 0 instead of its share."""

    message: str

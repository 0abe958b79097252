"""Feature extraction with an on-disk cache.

Image embeddings are computed once per (model type, model, checkpoint, dataset, split,
feature kind, precision, device type, software versions) and stored as one safetensors
file per key, so several mitigations (and repeated runs) share one pass over the images.

Cache file format (``<cache_dir>/<digest>.safetensors``, a documented format that users
may read for their own analyses, e.g. ``safetensors.torch.load_file(path)``):

- ``features``: (N, D) float32 embeddings (L2-normalised for kind ``image``; (N, V, D)
  for image-set kinds such as views and regions, see :class:`ImageSetKind`);
- ``fields``: (N, n_fields) int64 metadata values (class label, spurious attributes, ...)
  in the order of the ``field_names`` metadata entry;
- ``labels``: (N,) int64 class labels (the class field's column of ``fields``);
- ``group_ids``: (N,) int64 ids of the default grouping (``g = y * n_a + a`` for two
  fields), named by the ``group_names`` metadata entry;
- ``keys_utf8``: uint8, the sample keys in UTF-8 joined by ``\\n``, row-aligned;
- string metadata ``format`` (:data:`CACHE_FORMAT`), ``cache_key`` (JSON of the key
  fields), ``field_names``, ``field_values`` (value names per field), ``group_names``
  (JSON lists), ``n`` (rows) and ``sha256`` (of the tensors' bytes).

Writes are atomic (temporary file + ``os.replace``), so a killed process or a full disk
leaves at most a ``.*.tmp`` file that is never read; a file whose metadata, shapes,
checksum or contents do not check out is reported and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .datasets.bad_samples import SKIP_FLAG, SkippedSample, check_declared_counts, collate_samples, dataset_location
from .datasets.base import DatasetError, RobustDataset, SampleImage
from .distributed import DistContext
from .errors import one_line
from .groups import DEFAULT_GROUPING, GroupSchema

CACHE_FORMAT = "clip_robust_plugins.features/3"
#: the cache-key kind of a cached zero-shot text head
HEAD_KIND = "zeroshot_head"
ENV_CACHE_DIR = "CLIP_ROBUST_FEATURE_CACHE"


def default_cache_dir() -> Path:
    """``$CLIP_ROBUST_FEATURE_CACHE``, else ``$XDG_CACHE_HOME/clip_robust_plugins/features``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "clip_robust_plugins" / "features"


@dataclass(frozen=True)
class FeatureSet:
    """Features of one split, row-aligned with sample keys and metadata field values."""

    keys: tuple[str, ...]
    features: torch.Tensor  # (N, D) float32
    fields: torch.Tensor  # (N, n_fields) int64
    schema: GroupSchema
    kind: str = "image"
    cache_path: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def y(self) -> torch.Tensor:
        return self.fields[:, self.schema.class_index]

    def group_ids(self, grouping: str = DEFAULT_GROUPING) -> torch.Tensor:
        return torch.from_numpy(self.schema.group_ids(self.fields.numpy(), grouping))


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the features; its digest names the cache file."""

    model_type: str
    model: str
    pretrained: str  # tag, or resolved file path with size and mtime
    dataset: str
    dataset_fingerprint: str
    split: str
    #: what an image-set kind derives from each sample (name, config, count); "" for plain
    #: kinds.  The model's own preprocessing is not in the key: it is fixed by model type,
    #: model, checkpoint and software versions, all in the key, so a warm run needs no model.
    views: str
    kind: str
    amp: bool
    #: "cpu" or "cuda": kernels (and autocast's bf16 vs fp16) differ between them
    device_type: str = "cpu"
    #: torch and open_clip versions: an upgrade may change the numbers
    software: str = ""
    format: str = CACHE_FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def software_versions() -> str:
    """The library versions that feature values depend on (part of every cache key); read
    from the installed metadata, so computing a key imports neither library."""
    import importlib.metadata

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    return f"torch={version('torch')};open_clip={version('open_clip_torch')}"


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pretrained_identity(pretrained: str) -> str:
    """A checkpoint tag as is; a local file as its path, size and modification time."""
    if os.path.isfile(pretrained):
        st = os.stat(pretrained)
        return f"{os.path.abspath(pretrained)}:{st.st_size}:{st.st_mtime_ns}"
    return pretrained


class FeatureCache:
    """Safetensors files under ``directory`` (None disables caching)."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory) if directory else None

    def path(self, key: CacheKey) -> Path | None:
        return None if self.directory is None else self.directory / f"{key.digest()}.safetensors"

    def load(self, key: CacheKey, schema: GroupSchema) -> FeatureSet | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        problem = None
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(header_len)).get("__metadata__", {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        else:
            problem = _check_cache_entry(tensors, meta, key, schema)
        if problem is not None:
            warnings.warn(f"feature cache {path}: {problem}; rebuilding it", stacklevel=2)
            return None
        keys = tuple(bytes(tensors["keys_utf8"].numpy()).decode("utf-8").split("\n"))
        return FeatureSet(keys, tensors["features"], tensors["fields"], schema, key.kind, str(path))

    def save(self, key: CacheKey, fs: FeatureSet) -> str | None:
        path = self.path(key)
        if path is None:
            return None
        keys_blob = "\n".join(fs.keys).encode("utf-8")
        fields = fs.fields.contiguous().long()
        tensors = {
            "features": fs.features.contiguous().float(),
            "fields": fields,
            "labels": fields[:, fs.schema.class_index].clone(),  # a copy: with one field it would share fields' storage
            "group_ids": torch.from_numpy(fs.schema.group_ids(fields.numpy())).long(),
            "keys_utf8": torch.frombuffer(bytearray(keys_blob), dtype=torch.uint8) if keys_blob else torch.zeros(0, dtype=torch.uint8),
        }
        meta = {
            "format": CACHE_FORMAT,
            "cache_key": json.dumps(asdict(key), sort_keys=True),
            "field_names": json.dumps(list(fs.schema.field_names)),
            "field_values": json.dumps([list(f.values) for f in fs.schema.fields]),
            "group_names": json.dumps(fs.schema.group_names()),
            "n": str(len(fs)),
            "sha256": _tensor_digest(tensors),
        }
        self._write(path, tensors, meta)
        return str(path)


    def load_head(self, key: CacheKey) -> tuple[torch.Tensor | None, str | None]:
        """A cached zero-shot head and its path, or (None, None)."""
        path = self.path(key)
        if path is None or not path.is_file():
            return None, None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                head = fh.get_tensor("head")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            warnings.warn(f"feature cache {path}: unreadable zero-shot head ({exc}); rebuilding it", stacklevel=2)
            return None, None
        if meta.get("cache_key") != json.dumps(asdict(key), sort_keys=True) or not torch.isfinite(head).all():
            warnings.warn(f"feature cache {path}: zero-shot head does not match its key; rebuilding it", stacklevel=2)
            return None, None
        return head, str(path)

    def save_head(self, key: CacheKey, head: torch.Tensor) -> str | None:
        path = self.path(key)
        if path is None:
            return None
        meta = {"format": CACHE_FORMAT, "cache_key": json.dumps(asdict(key), sort_keys=True)}
        self._write(path, {"head": head.detach().float().cpu().contiguous()}, meta)
        return str(path)

    def _write(self, path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(dict(tensors), tmp, metadata=dict(meta))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _check_cache_entry(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], key: CacheKey, schema: GroupSchema) -> str | None:
    if meta.get("format") != CACHE_FORMAT:
        return f"format {meta.get('format')!r} is not {CACHE_FORMAT!r}"
    if meta.get("cache_key") != json.dumps(asdict(key), sort_keys=True):
        return "stored key does not match"
    if json.loads(meta.get("field_names", "[]")) != list(schema.field_names):
        return "metadata fields differ from the dataset's"
    missing = {"features", "fields", "labels", "group_ids", "keys_utf8"} - set(tensors)
    if missing:
        return f"missing tensors {sorted(missing)}"
    if meta.get("sha256") != _tensor_digest(tensors):
        return "checksum mismatch (partly written or corrupted)"
    n = int(meta.get("n", -1))
    feats, fields = tensors["features"], tensors["fields"]
    if feats.ndim not in (2, 3) or feats.shape[0] != n or fields.shape != (n, len(schema.fields)):
        return f"shapes {tuple(feats.shape)} / {tuple(fields.shape)} do not match n={n}"
    n_keys = len(bytes(tensors["keys_utf8"].numpy()).decode("utf-8").split("\n")) if n else 0
    if n_keys != n:
        return f"{n_keys} keys for {n} rows"
    if not torch.isfinite(feats).all():
        return "non-finite features"
    return None


def encode_image_normalized(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """clip_benchmark's image features: ``F.normalize(model.encode_image(x), dim=-1)``."""
    return F.normalize(model.encode_image(images), dim=-1)


#: the trainable image "heads" :func:`projection_head_type` tells apart
HEAD_VIT_PROJ = "vit_proj"
HEAD_ATTNPOOL = "attnpool"
HEAD_ADAPTER = "adapter"
HEAD_TYPES = (HEAD_VIT_PROJ, HEAD_ATTNPOOL, HEAD_ADAPTER)


def projection_head_type(model: torch.nn.Module) -> str:
    """Which image head ``preproj`` features feed, and so what a method can train on them.

    - ``"vit_proj"``: an open_clip ``VisionTransformer`` (``model.visual.proj`` is a
      Parameter): ``encode_image(x) == preproj(x) @ visual.proj``;
    - ``"attnpool"``: an open_clip ``ModifiedResNet`` (``model.visual.attnpool``):
      ``encode_image(x) == visual.attnpool(preproj(x).view(-1, C, H, W))``, see
      :func:`attnpool_input_shape`;
    - ``"adapter"``: any other tower (timm, HF, a ViT without ``proj``, an already
      adapted model): ``preproj(x) == encode_image(x)``, so a method trains an adapter on
      the (unnormalised) image embedding.
    """
    visual = getattr(model, "visual", None)
    if visual is None:
        return HEAD_ADAPTER
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
        return HEAD_VIT_PROJ
    if isinstance(getattr(visual, "attnpool", None), torch.nn.Module):
        return HEAD_ATTNPOOL
    return HEAD_ADAPTER


def attnpool_input_shape(attnpool: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the feature map an open_clip ``AttentionPool2d`` takes (from its positional embedding)."""
    tokens, channels = attnpool.positional_embedding.shape
    side = int(round((tokens - 1) ** 0.5))
    if side * side != tokens - 1:
        raise ValueError(f"attnpool positional embedding of {tokens} tokens is not a square grid plus one")
    return channels, side, side


def preproj_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Image features *before* the trainable projection head, (N, P) and not normalised.

    What they are depends on :func:`projection_head_type`:

    - ``vit_proj``: the pooled token (after ``ln_post``), i.e. what ``VisionTransformer``
      multiplies by ``proj``.  Computed by running the tower's own ``forward`` with
      ``proj`` set to None for the call (restored in a ``finally``), so pooling, patch
      dropout and norms are exactly the model's own.  Size: the tower width (768 for
      ViT-B, 1024 for ViT-L).
    - ``attnpool``: the ``layer4`` feature map that ``ModifiedResNet`` feeds to
      ``attnpool``, captured with a forward pre-hook and flattened from (C, H, W).  It
      is large: RN50 at 224 px gives 2048 x 7 x 7 = 100,352 floats (392 KiB) per image,
      so Waterbirds' 4,795 training images take about 1.9 GB of cache.
    - ``adapter``: ``model.encode_image(images)`` itself (not normalised).
    """
    head = projection_head_type(model)
    visual = getattr(model, "visual", None)
    if head == HEAD_VIT_PROJ:
        proj = visual.proj
        visual.proj = None
        try:
            out = visual(images)
        finally:
            visual.proj = proj
        pooled = out[0] if isinstance(out, tuple) else out  # output_tokens=True returns (pooled, tokens)
        return pooled
    if head == HEAD_ATTNPOOL:
        captured: list[torch.Tensor] = []

        def grab(module, args):
            captured.append(args[0])

        handle = visual.attnpool.register_forward_pre_hook(grab)
        try:
            visual(images)
        finally:
            handle.remove()
        return captured[-1].reshape(images.shape[0], -1)
    return model.encode_image(images)


#: feature kinds the extractor can compute; later methods add theirs here
FEATURE_KINDS: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "image": encode_image_normalized,
    "preproj": preproj_features,
}


def image_from_preproj(model: torch.nn.Module, preproj: torch.Tensor) -> torch.Tensor | None:
    """``image`` features from ``preproj`` without a second forward, where that is exact.

    For a ViT tower ``encode_image(x)`` is ``preproj(x) @ visual.proj``, the very matmul
    the tower does; other heads return None and are computed by their own forward.
    """
    if projection_head_type(model) != HEAD_VIT_PROJ:
        return None
    return F.normalize(preproj @ model.visual.proj, dim=-1)


#: kind -> (kind it can be derived from, derivation returning None when it cannot);
#: when both are requested for a split, the source is computed first and reused
DERIVED_KINDS: dict[str, tuple[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor | None]]] = {
    "image": ("preproj", image_from_preproj),
}


def _batch_features(model: torch.nn.Module, images: torch.Tensor, kinds: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every requested kind for one batch, sources of derived kinds first."""
    sources = {DERIVED_KINDS[k][0] for k in kinds if k in DERIVED_KINDS}
    computed: dict[str, torch.Tensor] = {}
    for kind in sorted(kinds, key=lambda k: k not in sources):
        derived = None
        if kind in DERIVED_KINDS and DERIVED_KINDS[kind][0] in computed:
            source, derive = DERIVED_KINDS[kind]
            derived = derive(model, computed[source])
        computed[kind] = derived if derived is not None else FEATURE_KINDS[kind](model, images)
    return computed


@dataclass(frozen=True)
class ImageSetKind:
    """A feature kind made of several images derived from each sample (views, regions).

    ``derive(sample)`` gets a :class:`~clip_robust_plugins.datasets.base.SampleImage`
    (image, metadata, mask) and returns exactly ``count`` PIL images; each goes through
    the model's own preprocessing and image tower, and the normalised embeddings are
    stored as (N, count, D).  ``name`` and ``config`` enter the cache key, so change
    ``config`` whenever the derived images change.  ``derive`` must be picklable
    (a module-level function or class instance) for DataLoader workers.
    """

    name: str
    derive: Callable[[SampleImage], Sequence[Any]]
    count: int
    config: str = ""

    def describe(self) -> str:
        """What enters the cache key: name, config and count."""
        return f"{self.name}[{self.config}]x{self.count}"


class _DerivedImages:
    """The sample transform behind an :class:`ImageSetKind`: derive, preprocess, stack."""

    wants_sample = True

    def __init__(self, kind: ImageSetKind, transform: Callable):
        self.kind = kind
        self.transform = transform

    def __call__(self, sample: SampleImage) -> torch.Tensor:
        images = list(self.kind.derive(sample))
        if len(images) != self.kind.count:
            raise DatasetError(
                f"sample {sample.key!r}: {self.kind.name} made {len(images)} images, expected {self.kind.count}"
            )
        return torch.stack([self.transform(image) for image in images])

    def __repr__(self) -> str:
        return f"{self.kind.describe()}({self.transform!r})"


FeatureKind = str | ImageSetKind


def kind_name(kind: FeatureKind) -> str:
    """The name a feature kind is stored and looked up under."""
    return kind.name if isinstance(kind, ImageSetKind) else kind


def autocast(device: str, enabled: bool):
    """``torch.autocast`` on the device's type (bf16 on CPU, fp16 on CUDA), as clip_benchmark."""
    return torch.autocast(torch.device(device).type, enabled=enabled)


def _resolve_checkpoint(model_type: str, model_name: str, pretrained: str, registry: Any) -> str:
    """A registered checkpoint tag (``crp-tiny``/``spurious_shapes``) as the file it names,
    so the cache notices when a package update replaces the file."""
    if model_type != "open_clip" or registry is None:
        return pretrained
    checkpoint = registry.checkpoint(model_name, pretrained)
    return str(checkpoint.path) if checkpoint is not None and checkpoint.path.is_file() else pretrained


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
        num_workers: int = 0,
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
        self.num_workers = num_workers
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

        Uncached plain kinds share one pass over the images; each image-set kind
        (:class:`ImageSetKind`) takes its own pass, since it decodes whole samples.
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
        plain = [k for k in todo if not isinstance(k, ImageSetKind)]
        passes: list[list[FeatureKind]] = ([plain] if plain else []) + [[k] for k in todo if isinstance(k, ImageSetKind)]
        for group in passes:
            fresh = self._run(dataset, split, group)
            if fresh is None:  # a worker rank: its share went to rank 0
                continue
            for kind in group:
                fs = fresh[kind_name(kind)]
                # a split with skipped samples is not cached: a cache entry always holds the whole split
                skipped = bool(self.skipped_samples.get(split))
                path = None if skipped else self.cache.save(self.key(dataset, dataset_name, split, kind), fs)
                out[kind_name(kind)] = FeatureSet(fs.keys, fs.features, fs.fields, fs.schema, fs.kind, path)
            self.extracted.append({"split": split, "kinds": [kind_name(k) for k in group], "n": len(fresh[kind_name(group[0])])})
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
            print(
                f"clip_robust_plugins: warning: {SKIP_FLAG}: skipped {len(skipped)} undecodable sample(s) of split "
                f"{split!r}, recorded in the results; first: {skipped[0].reason}",
                file=sys.stderr,
            )
        if skipped:
            self.skipped_samples[split] = skipped
        return {
            kind: FeatureSet(tuple(all_keys), feats[kind], field_tensor, dataset.schema, kind)
            for kind in names
        }

    @torch.no_grad()
    def _pass(self, dataset: RobustDataset, split: str, kinds: Sequence[FeatureKind], rank: int, world_size: int):
        """(order keys, sample keys, fields, {kind: features}, skipped samples) of part ``rank`` of ``split``."""
        image_set = kinds[0] if isinstance(kinds[0], ImageSetKind) else None
        transform = _DerivedImages(image_set, self.transform) if image_set is not None else self.transform
        names = [kind_name(k) for k in kinds]
        loader = torch.utils.data.DataLoader(
            dataset.ordered_samples(split, transform, rank, world_size),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=False,
            collate_fn=collate_samples,  # sets undecodable samples (SkippedSample) aside
        )
        counts = dataset.schema.split_counts.get(split)
        bar = tqdm(
            total=(sum(counts) + world_size - 1 - rank) // world_size if counts else None,
            desc=f"{split}: {'+'.join(names)} features",
            unit="img",
            disable=not self.progress,
            file=sys.stderr,
        )
        all_keys: list[str] = []
        fields: list[torch.Tensor] = []
        orders: list[torch.Tensor] = [torch.zeros(0, 2, dtype=torch.int64)]
        feats: dict[str, list[torch.Tensor]] = {k: [] for k in names}
        skipped: list[SkippedSample] = []
        with bar, _stopping_workers(loader) as batches:
            for batch, bad in batches:
                if bad and not self.skip_bad_samples:
                    raise DatasetError(f"{bad[0].reason} (pass {SKIP_FLAG} to skip undecodable images)")
                skipped.extend(bad)
                bar.update(len(bad))
                if batch is None:
                    continue
                batch_order, batch_keys, images, batch_fields = batch
                orders.append(batch_order)
                images = images.to(self.device)
                with autocast(self.device, self.amp):
                    if image_set is not None:  # (B, V, 3, H, W) -> (B, V, D)
                        flat = encode_image_normalized(self.model, images.flatten(0, 1))
                        feats[image_set.name].append(flat.float().cpu().unflatten(0, images.shape[:2]))
                    else:
                        for kind, values in _batch_features(self.model, images, names).items():
                            feats[kind].append(values.float().cpu())
                all_keys.extend(batch_keys)
                fields.append(batch_fields)
                bar.update(len(batch_keys))
        if not all_keys:  # an empty share (more ranks than shards) is fine; an empty split is not
            n_fields = len(dataset.schema.fields)
            return orders[0], [], torch.zeros(0, n_fields, dtype=torch.int64), {k: torch.zeros(0) for k in names}, skipped
        return torch.cat(orders), all_keys, torch.cat(fields), {k: torch.cat(v) for k, v in feats.items()}, skipped


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


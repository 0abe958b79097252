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

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..groups import GroupSchema
from .kinds import FeatureSet

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

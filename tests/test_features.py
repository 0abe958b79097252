import dataclasses
import warnings

import numpy as np
import pytest
import torch

from clip_robust_plugins.features import CacheKey, FeatureCache, FeatureSet
from clip_robust_plugins.groups import two_field_schema

SCHEMA = two_field_schema(["a", "b"], ["x", "y"])
KEY = CacheKey("open_clip", "crp-tiny", "ckpt:1:2", "robust/s", "fp", "test", "Compose()", "image", False)


def feature_set(n=5, d=3):
    gen = torch.Generator().manual_seed(0)
    return FeatureSet(
        tuple(f"k{i}" for i in range(n)),
        torch.randn(n, d, generator=gen),
        torch.tensor(np.stack([np.arange(n) % 2, (np.arange(n) // 2) % 2], 1)),
        SCHEMA,
    )


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(CacheKey)])
def test_every_key_field_changes_the_digest(field):
    value = getattr(KEY, field)
    other = (not value) if isinstance(value, bool) else f"{value}-changed"
    assert dataclasses.replace(KEY, **{field: other}).digest() != KEY.digest()


def test_roundtrip_and_no_leftover_temporary_files(tmp_path):
    cache = FeatureCache(tmp_path)
    fs = feature_set()
    path = cache.save(KEY, fs)
    loaded = cache.load(KEY, SCHEMA)
    assert loaded.cache_path == path
    assert loaded.keys == fs.keys
    assert torch.equal(loaded.features, fs.features) and torch.equal(loaded.fields, fs.fields)
    assert [p.name for p in tmp_path.iterdir()] == [f"{KEY.digest()}.safetensors"]


def test_truncated_cache_file_is_reported_and_not_used(tmp_path):
    cache = FeatureCache(tmp_path)
    path = cache.save(KEY, feature_set())
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="rebuilding"):
        assert cache.load(KEY, SCHEMA) is None


def test_entry_written_for_another_key_is_not_used(tmp_path):
    cache = FeatureCache(tmp_path)
    path = cache.save(dataclasses.replace(KEY, split="val"), feature_set())
    target = cache.path(KEY)
    target.write_bytes(open(path, "rb").read())
    with pytest.warns(UserWarning, match="stored key does not match"):
        assert cache.load(KEY, SCHEMA) is None


def test_non_finite_features_are_rejected(tmp_path):
    cache = FeatureCache(tmp_path)
    fs = feature_set()
    fs.features[0, 0] = float("nan")
    cache.save(KEY, fs)
    with pytest.warns(UserWarning, match="non-finite"):
        assert cache.load(KEY, SCHEMA) is None


def test_disabled_cache_writes_nothing(tmp_path):
    cache = FeatureCache(None)
    assert cache.save(KEY, feature_set()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(KEY, SCHEMA) is None


def test_flipped_byte_in_the_data_is_caught_by_the_checksum(tmp_path):
    cache = FeatureCache(tmp_path)
    path = cache.save(KEY, feature_set())
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x01  # inside the last tensor's bytes: the file still parses
    open(path, "wb").write(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert cache.load(KEY, SCHEMA) is None


def test_leftover_temporary_file_of_a_killed_write_is_never_read(tmp_path):
    cache = FeatureCache(tmp_path)
    (tmp_path / f".{KEY.digest()}.safetensors.abc.tmp").write_bytes(b"half a file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(KEY, SCHEMA) is None


def test_cache_file_is_the_documented_format(tmp_path):
    """Users read cache files with plain safetensors: embeddings, labels, attributes, groups, keys."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    fs = feature_set()
    path = FeatureCache(tmp_path).save(KEY, fs)
    tensors = load_file(path)
    assert torch.equal(tensors["features"], fs.features)
    assert torch.equal(tensors["labels"], fs.fields[:, 0])
    assert torch.equal(tensors["fields"], fs.fields)
    assert tensors["group_ids"].tolist() == (fs.fields[:, 0] * 2 + fs.fields[:, 1]).tolist()
    assert bytes(tensors["keys_utf8"].numpy()).decode().split("\n") == list(fs.keys)
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["group_names"]) == SCHEMA.group_names()
    assert json.loads(meta["field_names"]) == ["y", "a"]
    assert json.loads(meta["cache_key"])["split"] == "test"


def test_registered_checkpoint_tag_is_keyed_by_its_file():
    """Replacing the file behind ``--pretrained spurious_shapes`` must change the cache key."""
    from clip_robust_plugins import features, plugins
    from clip_robust_plugins.features.extractor import _resolve_checkpoint

    registry = plugins.collect_registry(plugins.build_plugin_manager())
    ident = _resolve_checkpoint("open_clip", "crp-tiny", "spurious_shapes", registry)
    assert ident.endswith("crp-tiny_spurious_shapes.safetensors")
    assert features.pretrained_identity(ident).count(":") >= 2  # path:size:mtime
    assert _resolve_checkpoint("open_clip", "ViT-B-32", "openai", registry) == "openai"


def test_row_buffer_keeps_rows_in_order_through_growth_and_slack():
    from clip_robust_plugins.features.rows import RowBuffer

    batches = [torch.randn(n, 3, 2) for n in (4, 5, 1)]
    grown = RowBuffer(3)  # smaller than what comes: grows
    slack = RowBuffer(100)  # a declared count larger than what is read
    unknown = RowBuffer()
    for buffer in (grown, slack, unknown):
        for batch in batches:
            buffer.append(batch)
        rows = buffer.rows()
        assert len(buffer) == 10 and rows.shape == (10, 3, 2)
        assert torch.equal(rows, torch.cat(batches))
    assert slack.rows().untyped_storage().nbytes() == 10 * 3 * 2 * 4  # the slack is not kept
    exact = RowBuffer(10)
    for batch in batches:
        exact.append(batch)
    assert exact.rows().untyped_storage().nbytes() == 10 * 3 * 2 * 4


def test_row_buffer_refuses_rows_of_another_shape_and_empty_reads():
    from clip_robust_plugins.features.rows import RowBuffer

    buffer = RowBuffer(4)
    buffer.append(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"rows of shape \(4,\)"):
        buffer.append(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="torch.int64"):
        buffer.append(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no rows"):
        RowBuffer(4).rows()

import json

import numpy as np
import pytest

from clip_robust_plugins.groups import Field, GroupSchema, GroupSchemaError, two_field_schema


def waterbirds_schema():
    return two_field_schema(
        ["landbird", "waterbird"], ["land", "water"], attribute_field="place",
        split_counts={"train": [3498, 184, 56, 1057]},
    )


def test_two_field_ids_follow_y_times_na_plus_a():
    schema = waterbirds_schema()
    values = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert schema.group_ids(values).tolist() == [0, 1, 2, 3]
    assert schema.group_names() == [
        "y:landbird_place:land", "y:landbird_place:water", "y:waterbird_place:land", "y:waterbird_place:water",
    ]
    assert schema.counts("train").tolist() == [3498, 184, 56, 1057]


def test_mixed_radix_with_three_fields_and_named_groupings():
    schema = GroupSchema(
        fields=(Field("y", ("a", "b", "c")), Field("bg", ("x", "y")), Field("size", ("s", "m", "l"))),
        groupings={"default": ("y", "bg"), "by_size": ("size",), "size_then_y": ("size", "y")},
        split_counts={"train": tuple(range(18))},
    )
    values = np.array([[2, 1, 0], [1, 0, 2]])
    assert schema.group_ids(values).tolist() == [2 * 2 + 1, 1 * 2 + 0]
    assert schema.group_ids(values, "size_then_y").tolist() == [0 * 3 + 2, 2 * 3 + 1]
    table = np.arange(18).reshape(3, 2, 3)
    assert schema.counts("train").tolist() == table.sum(axis=2).reshape(-1).tolist()
    assert schema.counts("train", "by_size").tolist() == table.sum(axis=(0, 1)).tolist()
    assert schema.counts("train", "size_then_y").tolist() == table.sum(axis=1).T.reshape(-1).tolist()
    assert schema.counts("val") is None


def test_full_counts_roundtrip_through_json(tmp_path):
    schema = waterbirds_schema()
    values = np.array([[0, 0], [0, 0], [1, 1]])
    assert schema.full_counts(values) == (2, 0, 0, 1)
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(schema.to_json()))
    assert GroupSchema.read(path) == schema


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"fields": [{"name": "y", "values": ["a"]}], "split_counts": {"train": [1, 2]}}, "expected 1"),
        ({"fields": [{"name": "z", "values": ["a"]}]}, "class field 'y'"),
        ({"fields": [{"name": "y"}]}, "malformed"),
        ({"fields": [{"name": "y", "values": ["a"]}], "groupings": {"default": ["q"]}}, "unknown fields"),
        ({"format_version": 99, "fields": []}, "format_version 99"),
    ],
)
def test_bad_groups_json_names_the_file(tmp_path, doc, message):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(GroupSchemaError) as err:
        GroupSchema.read(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_out_of_range_values_are_rejected():
    with pytest.raises(GroupSchemaError, match="'y' value 2 is out of range"):
        waterbirds_schema().validate_values(np.array([[2, 0]]))

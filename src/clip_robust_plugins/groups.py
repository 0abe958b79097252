"""Groups as a mixed-radix product of named metadata fields (WILDS' combinatorial grouper).

A dataset declares its metadata *fields* (the class ``y`` and one or more spurious
attributes such as ``a``), each with readable value names.  A *grouping* picks an
ordered subset of the fields; its group id is the mixed-radix number of the
field values, so for the usual two-field case ``g = y * n_a + a``, the convention of
group_DRO, DFR, WILDS and SubpopBench.  Group names read ``y:waterbird_a:land``.

Counts per split are stored over the *full* product of all fields, so the counts of
any grouping (and the training proportions behind the train-weighted average) are
marginals of one array: a dataset with several groupings stores one table.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GROUPS_FILE = "groups.json"
GROUPS_FORMAT_VERSION = 1
DEFAULT_GROUPING = "default"


class GroupSchemaError(ValueError):
    """A groups.json or a sample's metadata does not fit the declared fields."""


@dataclass(frozen=True)
class Field:
    """One metadata field: its name and the names of its values (index = value)."""

    name: str
    values: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class GroupSchema:
    """The metadata fields of a dataset, its named groupings and its per-split counts.

    ``class_field`` names the field that holds the class label (``y``).
    ``split_counts`` maps a split name to counts over the full product of all fields
    (row-major, in field order); it may be empty when unknown.
    """

    fields: tuple[Field, ...]
    class_field: str = "y"
    groupings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    split_counts: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise GroupSchemaError(f"duplicate field names in {names}")
        if self.class_field not in names:
            raise GroupSchemaError(f"class field {self.class_field!r} is not one of the fields {names}")
        if not self.groupings:
            object.__setattr__(self, "groupings", {DEFAULT_GROUPING: tuple(names)})
        if DEFAULT_GROUPING not in self.groupings:
            raise GroupSchemaError(f"groupings must include {DEFAULT_GROUPING!r}, got {sorted(self.groupings)}")
        for gname, gfields in self.groupings.items():
            unknown = [f for f in gfields if f not in names]
            if unknown or not gfields:
                raise GroupSchemaError(f"grouping {gname!r} names unknown fields {unknown or '(none)'}; fields are {names}")
        full = int(np.prod([f.size for f in self.fields]))
        for split, counts in self.split_counts.items():
            if len(counts) != full:
                raise GroupSchemaError(
                    f"counts for split {split!r} have {len(counts)} entries, expected {full} "
                    f"(the product of the field sizes {[f.size for f in self.fields]})"
                )

    # ----------------------------------------------------------------- lookups
    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def classnames(self) -> tuple[str, ...]:
        return self.field(self.class_field).values

    @property
    def class_index(self) -> int:
        return self.field_names.index(self.class_field)

    def grouping_fields(self, grouping: str = DEFAULT_GROUPING) -> tuple[str, ...]:
        try:
            return self.groupings[grouping]
        except KeyError:
            raise KeyError(f"unknown grouping {grouping!r}; known: {sorted(self.groupings)}") from None

    def n_groups(self, grouping: str = DEFAULT_GROUPING) -> int:
        return int(np.prod([self.field(f).size for f in self.grouping_fields(grouping)]))

    def group_names(self, grouping: str = DEFAULT_GROUPING) -> list[str]:
        """Readable names in group-id order, e.g. ``y:landbird_a:land``."""
        fields = [self.field(f) for f in self.grouping_fields(grouping)]
        return [
            "_".join(f"{f.name}:{v}" for f, v in zip(fields, combo))
            for combo in itertools.product(*(f.values for f in fields))
        ]

    # ------------------------------------------------------------ computation
    def validate_values(self, values: np.ndarray, where: str = "") -> None:
        """Raise if any row of ``values`` (N, n_fields) is outside its field's range."""
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != len(self.fields):
            raise GroupSchemaError(f"{where}metadata has shape {values.shape}, expected (N, {len(self.fields)})")
        for j, f in enumerate(self.fields):
            bad = np.flatnonzero((values[:, j] < 0) | (values[:, j] >= f.size))
            if bad.size:
                raise GroupSchemaError(
                    f"{where}field {f.name!r} value {int(values[bad[0], j])} is out of range 0..{f.size - 1}"
                )

    def group_ids(self, values: np.ndarray, grouping: str = DEFAULT_GROUPING) -> np.ndarray:
        """Mixed-radix group ids of field values (N, n_fields) -> (N,) int64."""
        values = np.asarray(values, dtype=np.int64)
        ids = np.zeros(values.shape[0], dtype=np.int64)
        for fname in self.grouping_fields(grouping):
            j = self.field_names.index(fname)
            ids = ids * self.fields[j].size + values[:, j]
        return ids

    def full_counts(self, values: np.ndarray) -> tuple[int, ...]:
        """Counts over the full product of all fields (the form ``split_counts`` stores)."""
        all_fields = {DEFAULT_GROUPING: self.field_names}
        full_schema = GroupSchema(self.fields, self.class_field, all_fields)
        ids = full_schema.group_ids(values)
        return tuple(int(c) for c in np.bincount(ids, minlength=full_schema.n_groups()))

    def counts(self, split: str, grouping: str = DEFAULT_GROUPING) -> np.ndarray | None:
        """Group counts of a split under a grouping (a marginal of the stored table), or None."""
        if split not in self.split_counts:
            return None
        table = np.asarray(self.split_counts[split], dtype=np.int64).reshape([f.size for f in self.fields])
        keep = [self.field_names.index(f) for f in self.grouping_fields(grouping)]
        drop = tuple(i for i in range(len(self.fields)) if i not in keep)
        marginal = table.sum(axis=drop) if drop else table
        # reorder axes to the grouping's field order
        remaining = [i for i in range(len(self.fields)) if i in keep]
        order = [remaining.index(i) for i in keep]
        return np.transpose(marginal, order).reshape(-1)

    # ----------------------------------------------------------- persistence
    def to_json(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format_version": GROUPS_FORMAT_VERSION,
            "fields": [{"name": f.name, "values": list(f.values)} for f in self.fields],
            "class_field": self.class_field,
            "groupings": {k: list(v) for k, v in self.groupings.items()},
            "split_counts": {k: list(v) for k, v in self.split_counts.items()},
        }
        if extra:
            doc.update(extra)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = GROUPS_FILE) -> GroupSchema:
        try:
            version = doc.get("format_version", GROUPS_FORMAT_VERSION)
            if version != GROUPS_FORMAT_VERSION:
                raise GroupSchemaError(f"{source}: format_version {version} is not supported (expected {GROUPS_FORMAT_VERSION})")
            fields = tuple(Field(str(f["name"]), tuple(str(v) for v in f["values"])) for f in doc["fields"])
            groupings = {str(k): tuple(v) for k, v in doc.get("groupings", {}).items()}
            counts = {str(k): tuple(int(c) for c in v) for k, v in doc.get("split_counts", {}).items()}
            return cls(fields, str(doc.get("class_field", "y")), groupings, counts)
        except GroupSchemaError as exc:
            if str(exc).startswith(source):
                raise
            raise GroupSchemaError(f"{source}: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise GroupSchemaError(f"{source}: malformed groups file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def read(cls, path: str | Path) -> GroupSchema:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise GroupSchemaError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_json(doc, source=str(path))


def two_field_schema(
    classnames: Sequence[str],
    attribute_names: Sequence[str],
    attribute_field: str = "a",
    split_counts: Mapping[str, Sequence[int]] | None = None,
) -> GroupSchema:
    """The common class x spurious-attribute schema (``g = y * n_a + a``)."""
    return GroupSchema(
        fields=(Field("y", tuple(classnames)), Field(attribute_field, tuple(attribute_names))),
        class_field="y",
        split_counts={k: tuple(v) for k, v in (split_counts or {}).items()},
    )

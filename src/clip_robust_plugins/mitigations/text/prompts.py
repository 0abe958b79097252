"""Prompts of the text-side methods: built from the dataset's names and templates, or read
from a user's prompt file (format in docs/methods/prompt_file.md).

A :class:`PromptSet` holds, for the run's class names and one spurious field's values:
group prompts (class x value), spurious prompts (per value), and RoboShot's reject/accept
concept pairs.  Everything here is plain strings: no model, no torch.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...argtypes import option

#: used for group prompts when the dataset's templates are class-specific (a dict)
FALLBACK_TEMPLATES = ("a photo of a {c}.",)


class PromptError(ValueError):
    """A prompt option or prompt file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class PromptConfig:
    """The prompt options every text-side method shares (each method prefixes them)."""

    prompt_file: str = option("", "prompt file ([group: C | V], [spurious: V], [reject], [accept] sections); "
                                  "empty: prompts from the dataset's names and templates", metavar="FILE")
    spurious_field: str = option("", "metadata field holding the spurious attribute (empty: the first non-class field)")
    group_phrase: str = option("{c} on a {a} background", "phrase put in place of {c} in each class template to "
                                                        "make a (class, value) prompt; {c} class, {a} value")
    spurious_templates: tuple[str, ...] = option(
        ("a photo with a {a} background.", "a photo of {a}."), "templates of the spurious prompts ({a}: value)")


@dataclass(frozen=True)
class PromptSet:
    classnames: tuple[str, ...]
    spurious_field: str
    values: tuple[str, ...]
    #: group[c][v]: prompts of class c with spurious value v
    group: tuple[tuple[tuple[str, ...], ...], ...]
    #: spurious[v]: prompts of value v
    spurious: tuple[tuple[str, ...], ...]
    reject: tuple[tuple[str, str], ...]
    accept: tuple[tuple[str, str], ...] = ()
    source: str = "templates"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, parts: tuple[str, ...]) -> dict[str, Any]:
        doc: dict[str, Any] = {"source": self.source, "spurious_field": self.spurious_field}
        if "group" in parts:
            doc["group"] = {c: {v: list(self.group[i][j]) for j, v in enumerate(self.values)}
                            for i, c in enumerate(self.classnames)}
        if "spurious" in parts:
            doc["spurious"] = {v: list(self.spurious[j]) for j, v in enumerate(self.values)}
        if "reject" in parts:
            doc["reject"] = [list(p) for p in self.reject]
        if "accept" in parts:
            doc["accept"] = [list(p) for p in self.accept]
        return doc


def _check_format(text: str, allowed: set[str], what: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise PromptError(f"{what} {text!r}: {exc}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conv:
            raise PromptError(f"{what} {text!r}: only the fields {{{'}, {'.join(sorted(allowed))}}} are allowed")


def _readable(value: str) -> str:
    return value.replace("_", " ")


def spurious_field(schema: Any, name: str) -> str:
    """The spurious field: ``name``, or the first non-class field of the default grouping."""
    if name:
        if name not in schema.field_names or name == schema.class_field:
            others = [f for f in schema.field_names if f != schema.class_field]
            raise PromptError(f"spurious field {name!r} is not a non-class field of the dataset (fields: {others})")
        return name
    for fname in schema.grouping_fields():
        if fname != schema.class_field:
            return fname
    raise PromptError("the dataset has no spurious field (its default grouping is the class alone)")


def build_prompts(config: PromptConfig, classnames: Any, templates: Any, schema: Any) -> PromptSet:
    """The run's prompts from the dataset's names and templates, then the prompt file's sections."""
    classnames = tuple(classnames)
    fname = spurious_field(schema, config.spurious_field)
    values = tuple(schema.field(fname).values)
    _check_format(config.group_phrase, {"c", "a"}, "group phrase")
    for t in config.spurious_templates:
        _check_format(t, {"a"}, "spurious template")
    class_templates = tuple(templates) if isinstance(templates, (list, tuple)) else FALLBACK_TEMPLATES
    group = tuple(
        tuple(tuple(t.format(c=config.group_phrase.format(c=c, a=_readable(v))) for t in class_templates) for v in values)
        for c in classnames
    )
    spurious = tuple(tuple(t.format(a=_readable(v)) for t in config.spurious_templates) for v in values)
    reject = tuple(
        (spurious[i][k], spurious[j][k])
        for i in range(len(values)) for j in range(i + 1, len(values)) for k in range(len(config.spurious_templates))
    )
    prompts = PromptSet(classnames, fname, values, group, spurious, reject)
    if config.prompt_file:
        prompts = read_prompt_file(config.prompt_file, prompts, schema)
    return prompts


#: the largest prompt file read (it is a list of prompts, not data)
MAX_FILE_BYTES = 1 << 20


def read_prompt_file(path: str, base: PromptSet, schema: Any) -> PromptSet:
    """Replace ``base``'s prompts by the sections a prompt file gives.

    Group sections, when any is given, must cover every (class, value); spurious sections
    likewise every value; ``[reject]`` replaces the default reject pairs; ``[accept]`` adds
    accept pairs.  Errors name the file and line.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise PromptError(f"{path}: prompt file larger than {MAX_FILE_BYTES} bytes")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: unreadable prompt file ({exc})") from None
    class_index = {c: i for i, c in enumerate(base.classnames)}
    class_index.update({c: i for i, c in enumerate(schema.classnames) if c not in class_index})
    value_index = {v: j for j, v in enumerate(base.values)}
    group: dict[tuple[int, int], list[str]] = {}
    spurious: dict[int, list[str]] = {}
    pairs: dict[str, list[tuple[str, str]]] = {}
    current: list | None = None
    kind = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}: line {lineno}"
        if line.startswith("["):
            if not line.endswith("]"):
                raise PromptError(f"{where}: a section header must end with ']'")
            kind, _, rest = line[1:-1].partition(":")
            kind, rest = kind.strip(), rest.strip()
            if kind == "group":
                c, sep, v = (s.strip() for s in rest.partition("|"))
                if not sep or c not in class_index or v not in value_index:
                    raise PromptError(f"{where}: expected [group: CLASS | VALUE] with CLASS in {list(base.classnames)} "
                                      f"and VALUE in {list(base.values)}, got {line!r}")
                key = (class_index[c], value_index[v])
                if key in group:
                    raise PromptError(f"{where}: a second [group: {c} | {v}] section")
                current = group[key] = []
            elif kind == "spurious":
                if rest not in value_index:
                    raise PromptError(f"{where}: unknown value {rest!r} of field {base.spurious_field!r} "
                                      f"(values: {list(base.values)})")
                if value_index[rest] in spurious:
                    raise PromptError(f"{where}: a second [spurious: {rest}] section")
                current = spurious[value_index[rest]] = []
            elif kind in ("reject", "accept") and not rest:
                current = pairs.setdefault(kind, [])
            else:
                raise PromptError(f"{where}: unknown section {line!r} (group: C | V, spurious: V, reject, accept)")
            continue
        if current is None:
            raise PromptError(f"{where}: a prompt before any [section] header")
        if kind in ("reject", "accept"):
            a, sep, b = (s.strip() for s in line.partition("|"))
            if not sep or not a or not b or "|" in b:
                raise PromptError(f"{where}: a {kind} line is 'TEXT A | TEXT B', got {line!r}")
            current.append((a, b))
        else:
            current.append(line)
    empty = [k for k, v in [*group.items(), *spurious.items()] if not v]
    if empty:
        raise PromptError(f"{path}: a section without prompts ({empty[0]})")
    changes: dict[str, Any] = {"source": str(path)}
    if group:
        missing = [(c, v) for i, c in enumerate(base.classnames) for j, v in enumerate(base.values) if (i, j) not in group]
        if missing:
            raise PromptError(f"{path}: no [group: {missing[0][0]} | {missing[0][1]}] section "
                              "(group sections must cover every class and value)")
        changes["group"] = tuple(tuple(tuple(group[(i, j)]) for j in range(len(base.values)))
                                 for i in range(len(base.classnames)))
    if spurious:
        missing_v = [v for j, v in enumerate(base.values) if j not in spurious]
        if missing_v:
            raise PromptError(f"{path}: no [spurious: {missing_v[0]}] section (spurious sections must cover every value)")
        changes["spurious"] = tuple(tuple(spurious[j]) for j in range(len(base.values)))
    for kind in ("reject", "accept"):
        if kind in pairs:
            changes[kind] = tuple(pairs[kind])
    import dataclasses

    return dataclasses.replace(base, **changes)

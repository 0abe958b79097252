"""What a person reads: ``eval``'s help in sections and the ``plugins`` table.

``eval --help`` shows the flags most runs set; ``--help-all`` every flag, grouped (clip_benchmark's,
group robustness, data and cache, then one heading per method, dataset and plugin);
``--help TOPIC`` one of those groups (``eval --help dfr``, ``eval --help robust/waterbirds``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from .plugins import help_topics

#: the flags ``eval --help`` shows, in this order
COMMON = (
    "--dataset", "--dataset_root", "--split", "--model", "--pretrained", "--mitigation", "--output",
    "--batch_size", "--num_workers", "--seed", "--no_amp", "--quiet", "--feature_cache",
    "--save_predictions", "--plot", "--plugin",
)
#: clip_benchmark's flags whose help is missing or shared with another flag
HELP_FIXES = {
    "--split": "split to evaluate (default: test)",
    "--test_split": "the same flag as --split, under clip_benchmark's other name",
    "--batch_size": "images per forward pass (default: 64)",
    "--num_workers": "DataLoader processes that read and decode images (default: 4; 0: this process only)",
}
CLIP_BENCHMARK_TITLE = "clip_benchmark (other tasks, datasets and models)"
#: ``--help TOPIC`` names of the groups every ``eval`` has -> their headings
SECTIONS = {
    "clip_benchmark": CLIP_BENCHMARK_TITLE,
    "robust": "group robustness (clip_benchmark_robust)",
    "data": "data and feature cache",
    "plugins": "plugins",
}
EVAL_USAGE = "%(prog)s --dataset NAME --model MODEL --pretrained TAG [--mitigation NAME ...] [flags]"


class _HelpAction(argparse.Action):
    """``-h/--help [TOPIC]``: the common flags, or one topic's."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs="?", metavar="TOPIC",
                         help="show the common flags, or with TOPIC (a method, a robust/ dataset, clip_benchmark, "
                              "robust, data, plugins) that topic's flags, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(format_eval_help(parser, values), sys.stdout)
        parser.exit()


class _HelpAllAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="show every flag, grouped by what it belongs to, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(format_eval_help(parser, None, everything=True), sys.stdout)
        parser.exit()


def organise_eval_help(parser: argparse.ArgumentParser) -> None:
    """Give ``eval`` (its flags all added) a short usage, its help actions and clearer clip_benchmark texts."""
    for action in parser._actions:
        for flag in action.option_strings:
            if flag in HELP_FIXES:
                action.help = HELP_FIXES[flag]
    old = parser._option_string_actions.get("-h")
    if old is not None:
        parser._remove_action(old)
        for group in parser._action_groups:
            if old in group._group_actions:
                group._group_actions.remove(old)
        for flag in old.option_strings:
            parser._option_string_actions.pop(flag, None)
    group = next(g for g in parser._action_groups if g.title == "options")  # argparse's name for it
    group.add_argument("-h", "--help", action=_HelpAction)
    group.add_argument("--help-all", action=_HelpAllAction)
    group.title = CLIP_BENCHMARK_TITLE
    parser.usage = EVAL_USAGE


def _sections(parser: argparse.ArgumentParser) -> list[tuple[str, str | None, list[argparse.Action]]]:
    """common flags; group robustness, data, plugins; one heading per method, dataset, ...; clip_benchmark's."""
    by_flag = {flag: a for a in parser._actions for flag in a.option_strings}
    common = [by_flag[f] for f in ("-h", "--help-all", *COMMON) if f in by_flag]
    sections = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a not in common]
        if actions or group.description:
            sections.append((group.title, group.description, actions))
    sections.sort(key=lambda section: section[0] == CLIP_BENCHMARK_TITLE)  # stable: clip_benchmark's last
    return [("common flags", None, common), *sections]


def topics(parser: argparse.ArgumentParser) -> list[str]:
    return [*SECTIONS, *help_topics(parser)]


def _topics_text(parser: argparse.ArgumentParser) -> str:
    kinds: dict[str, list[str]] = {"sections": list(SECTIONS)}
    for topic, (title, _) in help_topics(parser).items():
        word = title.split(" ", 1)[0]
        kinds.setdefault({"method": "methods", "dataset": "datasets", "plugin": "plugins"}.get(word, "other"),
                         []).append(topic)
    return "; ".join(f"{kind}: {', '.join(names)}" for kind, names in kinds.items())


def format_eval_help(parser: argparse.ArgumentParser, topic: str | None, everything: bool = False) -> str:
    """The text of ``eval --help`` (``topic`` None), ``--help TOPIC`` or ``--help-all``."""
    sections = _sections(parser)
    epilog = None
    if everything:
        chosen = sections
    elif topic is None:
        chosen = sections[:1]
        epilog = f"More: --help-all (every flag), or --help TOPIC for one group of flags. Topics: {_topics_text(parser)}."
    elif topic in SECTIONS:  # the whole group, its common flags included
        chosen = [(g.title, g.description, list(g._group_actions)) for g in parser._action_groups
                  if g.title == SECTIONS[topic]]
    elif topic in help_topics(parser):
        title, actions = help_topics(parser)[topic]
        chosen = [(title, None, actions)]
    else:
        parser.error(f"no help topic {topic!r}; topics: {', '.join(topics(parser))}")
    return _format(parser, chosen, epilog)


def _format(parser: argparse.ArgumentParser, sections, epilog: str | None) -> str:
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    formatter.add_text(parser.description)
    for title, description, actions in sections:
        formatter.start_section(title)
        formatter.add_text(description)
        formatter.add_arguments(actions)
        formatter.end_section()
    formatter.add_text(epilog)
    return formatter.format_help()


# --------------------------------------------------------------------------- plugins

#: how the table names what a plugin registers (singular, plural), by registry table
_KIND_WORDS = {
    "datasets": ("dataset", "datasets"), "metrics": ("metric", "metrics"), "mitigations": ("method", "methods"),
    "model_loaders": ("model type", "model types"), "checkpoints": ("checkpoint", "checkpoints"),
    "view_providers": ("views", "views"), "region_proposers": ("regions", "regions"),
    "commands": ("command", "commands"),
}


def registers_text(registers: dict[str, list[str]]) -> str:
    parts = []
    for kind, names in registers.items():
        if names:
            one, many = _KIND_WORDS.get(kind, (kind, kind))
            parts.append(f"{one if len(names) == 1 else many} {', '.join(names)}")
    return "; ".join(parts) or "flags only"


def plugins_table(rows: list[dict[str, Any]], width: int | None = None) -> str:
    """One line per plugin (wrapped): name, version, what it registers by the names the CLI takes."""
    width = width or max(80, shutil.get_terminal_size((100, 24)).columns)
    name_w = max(len("plugin"), *(len(r["name"]) for r in rows)) if rows else len("plugin")
    ver_w = max(len("version"), *(len(str(r["version"] or "-")) for r in rows)) if rows else len("version")
    lead = name_w + ver_w + 4
    lines = [f"{'plugin':<{name_w}}  {'version':<{ver_w}}  registers"]
    for r in rows:
        wrapped = textwrap.wrap(registers_text(r["registers"]), max(30, width - lead)) or [""]
        lines.append(f"{r['name']:<{name_w}}  {str(r['version'] or '-'):<{ver_w}}  {wrapped[0]}")
        lines += [" " * lead + more for more in wrapped[1:]]
    return "\n".join(lines)

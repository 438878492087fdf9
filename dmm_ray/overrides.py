"""`--set key.path=value` overrides: the one parser for every job (merge, evaluate, fast, mixing).

A leaf module (yaml only). The value is parsed as YAML (numbers, bools, lists, null); a numeric
path part indexes a list (`teachers.0.name=ink`); missing sections are created.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. distill.steps=10")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set tree[path] = value in place."""
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """A copy of `data` with every `key.path=value` of `overrides` applied in order."""
    data = copy.deepcopy(data)
    for text in overrides or []:
        apply_override(data, *parse_override(text))
    return data


def deep_merge(defaults: dict, data: dict) -> dict:
    """Deep-merge into a fresh dict (inputs untouched): `data` (the user's settings) wins over `defaults`."""
    out = copy.deepcopy(defaults)
    for k, v in data.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def add_set_argument(parser, example: str = "distill.steps=10", help: str | None = None) -> None:
    """The jobs' `--set KEY=VALUE` option (repeatable; parsed by `apply_overrides`), into `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help or f"override a config value by dotted key, e.g. --set {example} (repeatable)",
    )

"""`--set key.path=value` overrides: the one parser for every job (merge, evaluate, fast, mixing),
and the one message for a config that does not validate (`config_error`).

A leaf module (yaml only). The value is parsed as YAML (numbers, bools, lists, null); a numeric
path part indexes a list (`teachers.0.name=ink`); missing sections are created.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


def config_error(error, model: type, source: str = "config") -> ConfigError:
    """A ConfigError for pydantic's ValidationError `error` of `model` (or a list of its `errors()`,
    some of them kept back): one line per problem, the
    dotted key first (`distill.lr: Input should be greater than 0 (got -1)`); an unknown key also
    names the nearest known one (`; did you mean distill.steps?`) or else its section's keys."""
    lines = []
    for e in error.errors() if hasattr(error, "errors") else error:
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        shown = e["type"] != "missing" and not isinstance(e["input"], dict) and f"got {e['input']!r}" not in e["msg"]
        got = f" (got {e['input']!r})" if shown else ""  # unless a validator's message already says it
        hint = _unknown_key_hint(model, e["loc"]) if e["type"] == "extra_forbidden" else _yaml_reading_hint(key, e)
        lines.append(f"  {key}: {e['msg']}{got}{hint}")
    return ConfigError(f"invalid {source}:\n" + "\n".join(lines))


def _section_model(annotation) -> type | None:
    """The pydantic model a field holds, looking through Optional / list / dict (`teachers: list[TeacherSpec]`)."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        if (model := _section_model(arg)) is not None:
            return model
    return None


def _unknown_key_hint(model: type, loc: tuple) -> str:
    """'; did you mean distill.steps?' for the unknown key at `loc`, or the keys its section has."""
    section: type | None = model
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: `_section_model` already stepped into the item type
            continue
        field = section.model_fields.get(part) if section is not None else None
        section = _section_model(field.annotation) if field is not None else None
    if section is None:
        return ""
    known = [*section.model_fields, *getattr(section, "shorthand_keys", ())]  # (EvalConfig's `evaluation:` shorthands)
    prefix = "".join(f"{p}." for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; {prefix.rstrip('.') or 'the top level'} has: {', '.join(known)}"


def _yaml_reading_hint(key: str, e: dict) -> str:
    """Why a value YAML 1.1 (PyYAML) read otherwise than it looks failed its type, and how to write it:
    an unquoted no/off/yes/on is a boolean (`--set name=no` was "got False"), and an exponent without a
    '.' stays a string (`--set distill.steps=1e3` was "got '1e3'")."""
    value = e["input"]
    if isinstance(value, bool):
        said = "; YAML reads an unquoted yes/no/on/off/true/false as a boolean"
        if e["type"] != "string_type":
            return said
        word = "yes" if value else "no"
        return f'{said}: quote it to keep the word (--set \'{key}="{word}"\', or "{word}" in a file)'
    if isinstance(value, str) and e["type"] == "int_parsing":
        try:
            number = float(value)
        except ValueError:
            return ""
        if number.is_integer() and abs(number) < 1e18:  # `1e3`: YAML 1.1 reads an exponent without a '.' as a string
            return f"; write it as an integer: {key}={int(number)}"
    return ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last one,
    so a second `distill:` section would silently drop the first one's settings."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: explicit keys may override what it merges
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` that refuses duplicate keys (`_UniqueKeyLoader`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)


def literal_override(key: str, value: str) -> str:
    """`key="value"`: a `--set` whose value reads back as exactly the string `value` (a path from a
    command-line flag), where plain YAML would read `runs #3` as `runs` and `2024` as a number."""
    return f"{key}={json.dumps(str(value), ensure_ascii=False)}"  # a JSON string is a YAML double-quoted scalar


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML parse error: what and where (line, column), without the source dump."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml_file(path, what: str = "config file") -> Any:
    """The YAML document at `path`; a missing file, a folder or malformed YAML is a ConfigError that
    says which (and where in the file), not a parser traceback."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder; give a YAML file in it (e.g. jobs/configs/toy.yaml)")
    try:
        return load_yaml(p.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {p} is not valid YAML: {_yaml_problem(error)}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. distill.steps=10")
    key, value = text.split("=", 1)
    if not key.strip() or "" in [part.strip() for part in key.split(".")]:
        raise ConfigError(f"--set {text!r}: the key is empty or has an empty part; expected key.path=value, e.g. distill.steps=10")
    try:
        parsed = load_yaml(value)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"--set {text!r}: the value is not valid YAML ({_yaml_problem(error)}); quote a string that holds "
            f"brackets, braces, ': ' or '#', e.g. --set 'name=\"a: b\"'"
        ) from None
    if re.search(r"(^|\s)#", value) and "#" not in repr(parsed):  # YAML read ` #...` as a comment and dropped it
        raise ConfigError(
            f"--set {text!r}: YAML reads '#' after a space (or at the start) as a comment, so the value would be {parsed!r}; "
            f"quote it to keep the '#', e.g. --set '{key.strip()}=\"{value.strip()}\"'"
        )
    return key.strip().split("."), parsed


def _list_index(items: list, part: str, path: list[str], i: int) -> int:
    """The list position `part` names in `--set a.b.<part>...`: a number from 0 to len - 1, else a ConfigError."""
    where = ".".join(path[:i]) or "the top level"
    if part.isdigit() and int(part) < len(items):
        return int(part)
    valid = f"0 to {len(items) - 1}" if items else "none: it is empty"
    raise ConfigError(
        f"--set {'.'.join(path)}: {where} is a list of {len(items)} item(s), so {part!r} must be an item number (valid: {valid}); "
        f"to change the list's length set it whole, e.g. --set '{where}=[...]'"
    )


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set tree[path] = value in place. A list item must exist (`teachers.9.name` on two teachers is a
    ConfigError), and a missing section is created as a mapping, never as a list."""
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path, i)]
        else:
            if node.get(part) is None and path[i + 1].isdigit():
                raise ConfigError(
                    f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not set, so it has no item {path[i + 1]} to change; "
                    f"set the whole list (e.g. --set '{'.'.join(path[: i + 1])}=[...]') or write it in the config file"
                )
            if node.get(part) is None:  # missing, or a section whose keys are all commented out (`sampler:`)
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, len(path) - 1)] = value
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

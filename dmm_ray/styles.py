"""One style resolver for the pipeline, regions, export, evaluation and Serve (no torch).

A style selection is a name, an index (or its digit string), a mixture `{name or index: weight}`,
or a list of one weight per style; it resolves to one normalised weight per style. Anything else
is a `StyleError` that names what is wrong and lists the known styles; Serve answers it with 422.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


class StyleError(ValueError):
    """Unknown style name/index or invalid mixture weights (message names the known styles)."""


def known_styles(names: Sequence[str]) -> str:
    return ", ".join(f"{i}:{n}" for i, n in enumerate(names))


def is_per_prompt(style: Any = None, style_weights: Any = None) -> bool:
    """Whether a call's `style=` / `style_weights=` is one selection per prompt (a list of names,
    indices or mixtures) rather than one for every prompt (a name, an index, a dict, N weights)."""
    if style is not None:
        return isinstance(style, (list, tuple)) or _is_id_array(style)
    if getattr(style_weights, "ndim", 0) == 2 and hasattr(style_weights, "tolist"):  # a (B, N) tensor or array: a row per prompt
        return True
    if not isinstance(style_weights, (list, tuple)) or not style_weights:
        return False
    first = style_weights[0]
    return isinstance(first, (Mapping, list, tuple)) or getattr(first, "ndim", 0) > 0  # a row of weights (tensor, array)


def _is_id_array(x: Any) -> bool:
    """A 1-D tensor / array of style indices or names (one per prompt), not a row of mixture weights."""
    if getattr(x, "ndim", None) != 1 or not hasattr(x, "tolist"):
        return False
    if hasattr(x, "is_floating_point"):  # a torch tensor
        return not x.is_floating_point()
    kind = getattr(getattr(x, "dtype", None), "kind", "f")
    if kind == "O":  # an object array or a pandas column: names (or ints) kept as Python objects
        items = x.tolist()
        return all(isinstance(v, str) for v in items) or all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    return kind in "iuUS"  # numpy: ints, strings


def style_weights(names: Sequence[str], selection: Any) -> list[float]:
    """One selection -> N weights >= 0 that sum to 1 (see the module docstring)."""
    names = list(names)
    n, known = len(names), known_styles(names)
    if hasattr(selection, "tolist") and not isinstance(selection, (str, Mapping)):  # a tensor or an array
        selection = selection.tolist()
    if isinstance(selection, (bytes, bytearray)):
        # a name from a numpy bytes array (dtype S, which is_per_prompt reads as one name per prompt): as a
        # sequence it was read as weights, one per byte (b"ink" for 3 styles: a mixture of about 1/3 each)
        try:
            selection = selection.decode()
        except UnicodeDecodeError:
            raise StyleError(f"style name {bytes(selection)[:40]!r} is not UTF-8 text; known styles: {known}") from None
    if isinstance(selection, bool) or selection is None:
        raise StyleError(f"style must be a name, an index or weights, got {selection!r}; known styles: {known}")
    if isinstance(selection, int):
        if not 0 <= selection < n:
            raise StyleError(f"style index {selection} is out of range [0, {n}); known styles: {known}")
        return [1.0 if i == selection else 0.0 for i in range(n)]
    if isinstance(selection, str):
        if selection in names:
            return style_weights(names, names.index(selection))
        if selection.isascii() and selection.isdigit():  # "2"; not "²", which isdigit() but int() refuses
            if len(selection) > 18:  # out of range anyway, and int() refuses strings over 4300 digits
                raise StyleError(f"style index {selection[:18]}... is out of range [0, {n}); known styles: {known}")
            return style_weights(names, int(selection))
        raise StyleError(f"unknown style {selection!r}; known styles: {known}")
    if isinstance(selection, Mapping):
        weights = [0.0] * n
        given: dict[int, Any] = {}  # style index -> the key that gave it
        for key, value in selection.items():
            index = key if isinstance(key, int) and not isinstance(key, bool) else None
            if index is None:
                index = style_weights(names, key).index(1.0)  # a name (raises naming it when unknown)
            elif not 0 <= index < n:
                raise StyleError(f"style index {index} is out of range [0, {n}); known styles: {known}")
            if index in given:  # {"noir": 0.5, 4: 0.5}: the weights were added, silently, whatever the caller meant
                raise StyleError(
                    f"style weights give style {names[index]!r} twice ({given[index]!r} and {key!r}: a name and its index); "
                    f"give each style once, with its whole weight; known styles: {known}"
                )
            given[index] = key
            weights[index] = _number(value, known)
        return _normalise(names, weights)
    if not isinstance(selection, Sequence):
        raise StyleError(f"style must be a name, an index or weights, got {type(selection).__name__}; known styles: {known}")
    if len(selection) != n:
        raise StyleError(f"style weights must have one entry per style ({n} styles), got {len(selection)} entries; known styles: {known}")
    return _normalise(names, [_number(v, known) for v in selection])


def resolve(names: Sequence[str], style: Any = None, weights: Any = None, default: Any = None) -> list[float]:
    """`style` (one style, or any selection) or `weights` (a mixture), not both; neither: `default`."""
    if style is not None and weights is not None:
        raise StyleError("give either `style` (one style) or `weights` (a mixture), not both")
    selection = style if weights is None else weights
    if selection is None:
        if default is None:
            raise StyleError(f"give a style or a mixture; known styles: {known_styles(names)}")
        selection = default
    return style_weights(names, selection)


def _number(value: Any, known: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise StyleError(f"style weights must be numbers, got {value!r}; known styles: {known}")
    return float(value)


def _normalise(names: list[str], weights: list[float]) -> list[float]:
    known = known_styles(names)
    if not all(math.isfinite(w) for w in weights):
        raise StyleError(f"style weights must be finite numbers, got {weights}; known styles: {known}")
    negative = {names[i]: w for i, w in enumerate(weights) if w < 0}
    if negative:
        raise StyleError(f"style weights must be >= 0, got negative {negative}; known styles: {known}")
    total = sum(weights)
    if not math.isfinite(total):  # e.g. [1e308, 1e308, 0]: each finite, the sum is not
        raise StyleError(f"style weights sum to {total}; use smaller numbers (they are normalised to sum 1)")
    if total <= 0:
        raise StyleError(f"style weights are all zero; give at least one positive weight; known styles: {known}")
    out = [w / total for w in weights]
    if not math.isclose(math.fsum(out), 1.0, abs_tol=1e-6):  # e.g. subnormal weights
        raise StyleError(f"style weights {weights} cannot be normalised to sum 1; use numbers between 1e-6 and 1e6")
    return out


def parse_weights(text: str, option: str = "--weights") -> dict[str, float]:
    """`a=0.5,b=0.5` -> {"a": 0.5, "b": 0.5} (names, or indices as names). Each name once, no empty
    entries (`a=0.5,,b=0.5`, a comma at either end): a StyleError says which, naming `option` (where
    the text came from: a CLI option, a column)."""
    if not text.strip():
        raise StyleError(f"{option} is empty; give name=weight pairs (a=0.5,b=0.5)")
    out: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise StyleError(
                f"{option} {text!r} has an empty entry (two commas in a row, or one at either end); give name=weight pairs separated by single commas (a=0.5,b=0.5)"
            )
        if "=" not in part:
            raise StyleError(f"{option} wants name=weight pairs separated by commas (a=0.5,b=0.5), got {part!r}")
        name, value = (x.strip() for x in part.split("=", 1))
        if not name:
            raise StyleError(f"{option}: {part!r} has no style name; give name=weight (a=0.5)")
        if name in out:
            raise StyleError(f"{option} names {name!r} twice (in {text!r}); give each style once, with its whole weight")
        try:
            out[name] = float(value)
        except ValueError:
            raise StyleError(f"{option}: {value!r} is not a number (in {part!r})") from None
    return out

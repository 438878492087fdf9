"""Lazy package attributes: `import dmm_ray.x` stays light (no torch/diffusers/ray until used)."""

import importlib


def lazy_getattr(table: dict[str, str]):
    """A module `__getattr__` that imports `table[name]` on first use and returns its `name`."""

    def __getattr__(name):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(name)

    return __getattr__

"""Lazy package attributes: `import dmm_ray.x` stays light (no torch/diffusers/ray until used)."""

import importlib
import importlib.util


def lazy_getattr(table: dict[str, str], package: str | None = None):
    """A module `__getattr__` that imports `table[name]` on first use and returns its `name`.
    `package`: also a submodule of that package on first use (`import dmm_ray`, then
    `dmm_ray.formats.single_file.sdxl_text_encoder_2(...)`, as jobs/export.py prints an SDXL loader:
    without it a fresh interpreter raised AttributeError: formats)."""

    def __getattr__(name):
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        if package is not None and not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(name)

    return __getattr__

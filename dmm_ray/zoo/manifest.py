"""The one reader of a toy zoo's `zoo.yaml` (no torch): used by the merge config (`zoo:`), the
evaluation job (`--teachers zoo.yaml`), the zoo report and the benchmarks.

    zoo.yaml:  base, dataset, eval_prompts, feature_net (paths relative to its folder),
               teachers: [{name, source, format, base?, description?, group?, own_text_encoder?}]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from dmm_ray import paths
from dmm_ray.teachers import TeacherSpec  # pydantic only (torch loads with the first teacher)

MANIFEST = "zoo.yaml"


class ZooTeacherEntry(TeacherSpec):
    """A zoo.yaml teacher: the TeacherSpec fields plus what the zoo build records about it for the zoo
    report. Any other key is refused (a misspelt `fromat:` would otherwise be dropped without a word,
    and the teacher loaded with its format guessed)."""

    group: str | None = None  # the style's group (grade, distinct, ...): the report's mixing groups
    own_text_encoder: bool = False  # whether the build fine-tuned the teacher's text encoder too


class ZooManifestFile(BaseModel):
    """The top level of a zoo.yaml: what `build_zoo` writes. Any other key is refused (a misspelt
    `feature_nte:` would otherwise be dropped without a word, and the evaluation run with another
    feature net than the zoo's)."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = None  # the paths: relative to the zoo.yaml's folder, or absolute
    dataset: str | None = None
    eval_prompts: str | None = None
    feature_net: str | None = None
    image_size: int | None = None  # what the build was asked for (its config.json has the rest)
    seed: int | None = None
    size: str | None = None
    teachers: list[dict[str, Any]]  # each a ZooTeacherEntry: teacher_entries checks them


def manifest_path(path: str | os.PathLike) -> Path:
    """A zoo folder or its zoo.yaml -> the zoo.yaml."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def read_manifest(path: str | os.PathLike) -> dict:
    """The raw manifest (a folder or its zoo.yaml); FileNotFoundError / ValueError (a ConfigError for
    an unknown or mistyped key) say what is wrong."""
    from pydantic import ValidationError

    from dmm_ray.overrides import config_error

    path = manifest_path(path)
    if not path.is_file():
        folder = path.parent if path.name == MANIFEST or path.suffix in (".yaml", ".yml") else path  # a zoo folder not built yet
        raise FileNotFoundError(
            f"'{path}' not found: {folder} is not a zoo (no {MANIFEST}); build one with `python jobs/build_zoo.py --out {folder}`"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not data.get("teachers"):
        raise ValueError(f"'{path}' has no 'teachers' list")
    if not isinstance(data["teachers"], list):
        raise ValueError(f"'{path}': teachers must be a list of {{name, source, ...}} entries, got {data['teachers']!r}")
    for i, t in enumerate(data["teachers"]):
        if not isinstance(t, dict) or "name" not in t or "source" not in t:
            raise ValueError(f"'{path}': teachers[{i}] needs 'name' and 'source', got {t!r}")
    try:
        ZooManifestFile(**data)
    except ValidationError as error:  # one line per problem; an unknown key names the nearest known one or the keys a zoo.yaml has
        raise config_error(error, ZooManifestFile, f"zoo manifest '{path}'") from None
    return data


def teacher_entries(manifest: dict, root: str | os.PathLike) -> list[dict]:
    """The manifest's teachers as TeacherSpec fields (zoo extras dropped, unknown keys refused), paths
    absolute under `root`; a LoRA or single-file teacher without its own `base` takes the zoo's."""
    from pydantic import ValidationError

    from dmm_ray.overrides import config_error

    out = []
    for i, t in enumerate(manifest["teachers"]):  # a list of mappings: read_manifest checked it
        fields = dict(t)
        file = fields.get("format") in ("lora", "single_file", "ckpt") or (not fields.get("format") and Path(str(fields.get("source", ""))).suffix)
        if not fields.get("base") and manifest.get("base") and file:  # (no format: a file, not a folder, is one of those)
            fields["base"] = manifest["base"]
        try:
            entry = ZooTeacherEntry(**fields)
        except ValidationError as error:  # one line per problem, naming the manifest, the teacher and, for an unknown key, the known ones
            raise config_error(error, ZooTeacherEntry, f"teachers[{i}] ({t.get('name', '?')}) of the zoo manifest in {root}") from None
        out.append(entry.resolve_paths(root).model_dump(include=set(TeacherSpec.model_fields), exclude_unset=True))
    return out


@dataclass
class ZooManifest:
    root: Path
    teachers: list[Any]  # TeacherSpec
    eval_prompts: Path | None
    feature_net: Path | None
    base: Path | None
    dataset: Path | None
    raw: dict


def load_zoo_manifest(path: str | os.PathLike) -> ZooManifest:
    """`zoo.yaml` (or its folder) as TeacherSpecs and absolute paths."""
    data = read_manifest(path)
    root = manifest_path(path).resolve().parent

    def rel(p):  # the config's rule (`~` and `$DMM_HOME` expand), as for the teachers' paths
        return None if p is None else Path(paths.resolve(p, root))

    return ZooManifest(
        root=root,
        teachers=[TeacherSpec(**e) for e in teacher_entries(data, root)],
        eval_prompts=rel(data.get("eval_prompts")),
        feature_net=rel(data.get("feature_net")),
        base=rel(data.get("base")),
        dataset=rel(data.get("dataset")),
        raw=data,
    )

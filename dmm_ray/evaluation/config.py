"""EvalConfig: everything that decides which images are generated and how they are compared."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dmm_ray import paths
from dmm_ray.defaults import PAPER_GUIDANCE, PAPER_NEGATIVE_PROMPT, PAPER_STEPS  # paper A.5 (a leaf: no torch)


class SamplerConfig(BaseModel):
    """Sampler settings shared by student and teachers (part of the teacher-cache key)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_inference_steps: int = Field(PAPER_STEPS, ge=1)
    guidance_scale: float = Field(PAPER_GUIDANCE, ge=0)
    negative_prompt: str = PAPER_NEGATIVE_PROMPT
    height: int | None = Field(None, ge=8, multiple_of=8, description="None: the pipeline's default (unet sample_size * vae factor)")
    width: int | None = Field(None, ge=8, multiple_of=8)


class ExtractorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["zoo", "inception", "import"] = "zoo"
    path: str | None = Field(
        None,
        description="zoo: the zoo feature-net folder (default: zoo.yaml's feature_net); inception: the "
        "pt_inception-2015-12-05 weights file; import: 'package.module:factory' returning an extractor",
    )
    device: str = "auto"


EXTRACTOR_PATHS = {  # what extractor.path names, per kind (the messages of `check_extractor`)
    "zoo": "the zoo feature net folder (build the toy zoo first: its zoo.yaml names it as feature_net)",
    "inception": "the FID InceptionV3 weights file 'pt_inception-2015-12-05-6726825d.pth' (the one pytorch-fid and "
    "torch-fidelity use; copy it to this machine)",
    "import": "'package.module:factory'",
}


def check_extractor(kind: str, path: str | Path | None, section: str | None = None, off: str | None = None) -> None:
    """Whether the feature extractor `kind` at `path` can be built, without building it (no torch):
    a known kind with a path; a zoo feature-net folder or an Inception weights file that is there;
    torch-fidelity installed for Inception (an `import` factory is not imported). The one place of
    these checks and their messages: the extractors' constructors (`dmm_ray.evaluation.extractors`)
    call it, and `EvalConfig.check_ready` before a merge trains, with `section` (the config key the
    messages name, e.g. "evaluation"; they then also offer `<section>.enabled: false`, or `off`: how
    the caller's job skips its evaluation).

    Raises ValueError (an unknown kind, no path), FileNotFoundError (nothing at the path), and for a
    missing torch-fidelity ImportError (ValueError with `section`: a config error)."""
    import importlib.util

    key = f"{section}.extractor" if section else "extractor"
    off = off or (f"set {section}.enabled: false" if section else "")
    what = EXTRACTOR_PATHS.get(kind)
    if what is None:
        raise ValueError(f"unknown extractor.kind '{kind}'; expected 'zoo', 'inception' or 'import'")
    if path is None:
        raise ValueError(f"{key}.path: give {what} for {key}.kind {kind!r}" + (f", or {off}" if off else ""))
    if kind == "import":
        # the module is found, not imported (its import, and the factory, run when the evaluation does)
        module, _, attr = str(path).partition(":")
        if not module or not attr:
            raise ValueError(f"{key}.path for kind='import' must look like 'package.module:factory', got '{path}'" + (f"; or {off}" if off else ""))
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that is missing
            found = False
        if not found:
            raise ValueError(f"{key}.path {path}: no module {module!r} on this Python's path" + (f"; install it, or {off}" if off else ""))
        return
    local = Path(str(path)).expanduser()
    if not (local.is_dir() if kind == "zoo" else local.is_file()):
        raise FileNotFoundError(f"{key}.path {path}: not found; give {what}" + (f", or {off}" if off else ""))
    if kind == "inception" and importlib.util.find_spec("torch_fidelity") is None:
        raise (ValueError if section else ImportError)(
            f"{key}.kind 'inception' needs the torch-fidelity package (and a torchvision matching your torch): "
            f"pip install torch-fidelity; or use {key}.kind 'zoo'" + (f"; or {off}" if off else "")
        )


# Short keys a merge config's `evaluation:` section may use (jobs/configs/*.yaml), -> EvalConfig fields.
SAMPLER_KEYS = ("num_inference_steps", "guidance_scale", "negative_prompt", "height", "width")
# every key `expand_section_shorthands` turns into fields (`prompts: <file>` is a field's own name)
SHORTHAND_KEYS = ("num_prompts", "feature_net", "inception_weights", "resolution", *SAMPLER_KEYS)


class EvalConfig(BaseModel):
    """FID-matrix evaluation (paper 4.1). Seed set A: student and M_ref rows; seed set B: teacher columns.

    Every (prompt, k) image gets its own seed `seed_X + prompt_index * images_per_prompt + k`, so the
    two sets never share initial noise.

    Also the type of a merge config's `evaluation:` section (`MergeConfig.evaluation`): the section's
    shorthands are accepted everywhere (`expand_section_shorthands`), and there `output_dir` and
    `cache_dir`, when left unset, take the merge's defaults (`<output_dir>/evaluation`,
    `$DMM_HOME/cache/fid`; `dmm_ray.config.MergeConfig`) instead of the standalone ones below.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # keys the section accepts besides its fields: an unknown key's hint (dmm_ray.overrides.config_error) offers
    # them too; it knew the fields only, so `negative_promt` was "did you mean evaluation.grid_prompts?"
    shorthand_keys: ClassVar[tuple[str, ...]] = SHORTHAND_KEYS

    enabled: bool = Field(True, description="the merge job evaluates the merged model after saving it")
    prompts: list[str] | None = Field(None, description="evaluation prompts; or prompts_file")
    prompts_file: str | None = Field(
        None, description="text file, one prompt per line (the zoo's eval_prompts), or a COCO captions JSON (paper: COCO val)"
    )
    max_prompts: int | None = Field(None, ge=1)
    images_per_prompt: int = Field(4, ge=1)
    seed_a: int = Field(0, ge=0)
    seed_b: int = Field(1_000_000, ge=0)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    extractor: ExtractorConfig = Field(default_factory=ExtractorConfig)
    batch_size: int = Field(8, ge=1, description="images per pipeline call inside a worker")
    cache_dir: str = Field(
        default_factory=lambda: str(paths.fid_cache_dir()),
        description="teacher statistics cache (default $DMM_HOME/cache/fid, as in a merge config: not the cwd, which a Ray job's is temporary)",
    )
    output_dir: str = Field("outputs/eval", description="matrices, plots, grid (in a merge config: default <output_dir>/evaluation)")
    use_ray: bool = True
    num_student_workers: int = Field(1, ge=1, description="student styles are split over this many actors")
    worker_num_cpus: float = Field(1.0, gt=0)
    worker_num_gpus: float = Field(0.0, ge=0)
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="pipeline weights dtype (float16 on GPUs)")
    grid_prompts: int = Field(4, ge=1, description="prompts (columns) in the style x prompt grid")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        """The merge section's shorthands (`prompts: <file>`, `num_prompts`, `feature_net`, ...)."""
        return expand_section_shorthands(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self):
        if self.prompts is not None and self.prompts_file is not None:
            raise ValueError("give either prompts or prompts_file, not both")
        if self.prompts is not None and not [p for p in self.prompts if p.strip()]:
            raise ValueError("prompts is empty; give at least one evaluation prompt")
        return self

    def load_prompts(self) -> list[str]:
        if self.prompts is not None:
            prompts = [p for p in self.prompts if p.strip()]
        elif self.prompts_file is not None:
            path = Path(self.prompts_file)
            if not path.is_file():
                raise FileNotFoundError(f"prompts_file '{path}' does not exist")
            prompts = _read_prompt_file(path)
            if not prompts:
                raise ValueError(f"prompts_file '{path}' has no prompts")
        else:
            raise ValueError("no evaluation prompts: set prompts or prompts_file (the zoo.yaml eval_prompts)")
        return prompts[: self.max_prompts] if self.max_prompts else prompts

    def seeds(self, which: Literal["a", "b"], num_prompts: int) -> list[list[int]]:
        """Per-prompt seed lists for seed set A or B: (num_prompts, images_per_prompt)."""
        base = self.seed_a if which == "a" else self.seed_b
        k = self.images_per_prompt
        return [[base + p * k + j for j in range(k)] for p in range(num_prompts)]

    def check_ready(self, section: str = "evaluation", off: str | None = None) -> None:
        """Before a merge trains (validate, --dry-run): what the evaluation after it will need, so a
        missing prompt file or feature extractor fails now, not after the training and the save.
        Prompts present and readable; the seed sets apart; the feature extractor (`check_extractor`: a
        zoo feature-net folder or Inception weights file present, and torch-fidelity installed for
        Inception; an `import` extractor's module found, imported only when it runs). A ValueError /
        FileNotFoundError naming `section`, and how to evaluate nothing: `off` (default: set `section`.enabled: false)."""
        off = off or f"set {section}.enabled: false"
        fix = f"give {section}.prompts (a list) or {section}.prompts_file, or {off}"
        try:
            prompts = self.load_prompts()
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{section}: {error}; {fix}") from None
        self.check_seed_sets(len(prompts))
        check_extractor(self.extractor.kind, self.extractor.path, section, off)

    def check_seed_sets(self, num_prompts: int) -> None:
        n = num_prompts * self.images_per_prompt
        if n < 2:  # a covariance needs two feature vectors: fid.py refused it only after every set was sampled
            raise ValueError(f"{num_prompts} prompt(s) x images_per_prompt={self.images_per_prompt} is {n} image per set; FID needs at least 2")
        lo, hi = sorted([self.seed_a, self.seed_b])
        if hi < lo + n:
            raise ValueError(
                f"seed sets overlap: seed_a={self.seed_a}, seed_b={self.seed_b} but each set uses {n} consecutive seeds; set seed_b >= seed_a + {n}"
            )


from dmm_ray.overrides import ConfigError, apply_overrides, config_error, deep_merge, read_yaml_file  # noqa: E402  (the merge job's --set parser: list indexing too)

# Keys of a raw `evaluation:` tree that hold local paths (or URIs): `dmm_ray.paths.resolve` makes
# them absolute (a config file's against its folder); extractor.path too, unless kind is import.
EVAL_PATH_KEYS = ("prompts", "prompts_file", "feature_net", "inception_weights", "cache_dir", "output_dir")


def resolve_eval_paths(section: dict, base: str | Path) -> None:
    """Every relative local path of a raw evaluation tree made absolute against `base`, in place
    (`$DMM_HOME` and `~` expand; URIs, absolute paths and non-strings, e.g. a prompt list, stay)."""
    for key in EVAL_PATH_KEYS:
        if isinstance(section.get(key), str):
            section[key] = paths.resolve(section[key], base)
    ext = section.get("extractor")
    if isinstance(ext, dict) and ext.get("kind") != "import" and isinstance(ext.get("path"), str):  # import: 'package.module:factory'
        ext["path"] = paths.resolve(ext["path"], base)


def load_eval_config(
    path: str | Path | None = None, overrides: list[str] | None = None, section: str | None = None, defaults: dict | None = None
) -> EvalConfig:
    """EvalConfig from `defaults` < a YAML file (optionally its `section`) < `--set` overrides. Relative
    paths in the file resolve against the file's folder, those in overrides against the current one."""

    data: dict = {}
    if path is not None:
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
        if section is not None:
            if section not in data:
                raise ConfigError(f"config file {path} has no section {section!r}; it has: {', '.join(map(str, data)) or 'nothing'}")
            data = data[section] or {}
        elif "evaluation" in data and not set(data) <= set(EvalConfig.model_fields):  # a merge config, read whole
            raise ConfigError(f"config file {path} is a merge config: add --section evaluation to read its evaluation settings")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: {section or 'the top level'} must be a mapping of keys, got {data!r}")
        resolve_eval_paths(data, Path(path).resolve().parent)
    defaults = defaults or {}
    # a merge config's `evaluation:` section uses the shorthands (num_prompts, flat sampler keys, ...).
    # The user's settings (the file's, then the overrides) are expanded before the defaults go under them:
    # expanded after, `--set inception_weights=W` (or feature_net=DIR) met the zoo's default extractor.path,
    # which the shorthand does not replace (a typed extractor.path wins), so W was dropped below (the
    # Inception extractor then had no weights file) and another feature net silently not used.
    data = apply_overrides(expand_section_shorthands(data), overrides)
    resolve_eval_paths(data, Path.cwd())  # the file's are absolute by now: only overrides change
    data = deep_merge(defaults, expand_section_shorthands(data))
    # Drop defaults the user's choices made meaningless (zoo prompt file vs explicit prompts,
    # zoo feature-net folder vs another extractor kind).
    if data.get("prompts") is not None and data.get("prompts_file") == defaults.get("prompts_file"):
        data.pop("prompts_file", None)
    ext, default_ext = data.get("extractor") or {}, defaults.get("extractor") or {}
    if ext.get("kind", "zoo") != "zoo" and ext.get("path") is not None and ext.get("path") == default_ext.get("path"):
        ext.pop("path")
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as error:
        raise config_error(error, EvalConfig, f"evaluation config{f' {path}' if path else ''}") from None


def _read_prompt_file(path: Path) -> list[str]:
    """One prompt per line, or a COCO captions JSON (`{"annotations": [{"caption": ...}]}`), or a JSON list."""
    import json

    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM (Windows editors) is no part of the text
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            captions = [a.get("caption", "") for a in data["annotations"]]
        elif isinstance(data, list):
            captions = [c if isinstance(c, str) else c.get("caption", "") for c in data]
        else:
            raise ValueError(f"prompts_file '{path}': expected COCO captions ('annotations' list) or a JSON list of prompts")
        # COCO has ~5 captions per image: keep the first occurrence of each, in file order.
        return list(dict.fromkeys(" ".join(c.split()) for c in captions if c and c.strip()))
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def expand_section_shorthands(section: dict | None) -> dict:
    """A merge config's `evaluation:` shorthands as EvalConfig fields (idempotent):
    `prompts: <file>` (-> prompts_file), `num_prompts` (-> max_prompts), `feature_net: <dir>`
    (zoo extractor), `inception_weights: <file>` (Inception extractor), `resolution` and flat
    sampler keys (`num_inference_steps`, ... -> sampler.*). Unknown keys still fail by name."""
    import copy

    data = copy.deepcopy(dict(section or {}))
    if isinstance(data.get("prompts"), str):
        data["prompts_file"] = data.pop("prompts")
    if "num_prompts" in data:
        data["max_prompts"] = data.pop("num_prompts")
    if "inception_weights" in data or "feature_net" in data:  # (else a typed `extractor` stays as it is)
        ext = dict(data.get("extractor") or {})
        if "inception_weights" in data:
            ext.setdefault("kind", "inception")
            if ext["kind"] == "inception":
                ext.setdefault("path", data["inception_weights"])
            data.pop("inception_weights")
        if "feature_net" in data:
            if ext.get("kind", "zoo") == "zoo":
                ext.setdefault("path", data["feature_net"])
            data.pop("feature_net")
        if ext:
            data["extractor"] = ext
    if "resolution" in data or any(k in data for k in SAMPLER_KEYS):  # (else a typed `sampler` stays as it is)
        sampler = dict(data.get("sampler") or {})
        if "resolution" in data:
            r = data.pop("resolution")
            sampler.setdefault("height", r)
            sampler.setdefault("width", r)
        for k in SAMPLER_KEYS:
            if k in data:
                sampler[k] = data.pop(k)  # a flat key (also a later --set) wins over sampler.*
        data["sampler"] = sampler
    return data

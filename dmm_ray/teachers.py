"""Teacher checkpoints: specs, format detection, loading (frozen), and architecture validation.

Formats (what community sites ship):
  diffusers    a StableDiffusionPipeline folder (model_index.json)
  single_file  one .safetensors in the original LDM layout; `base:` names a diffusers folder of the
               same architecture for configs/tokenizer (nothing is downloaded)
  lora         a .safetensors LoRA file diffusers' `load_lora_weights` accepts, on top of `base:`; fused at load
  ckpt         a pickled .ckpt/.pt; only with `allow_pickle: true`, read with torch.load(weights_only=True)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

if TYPE_CHECKING:  # torch loads with the first teacher, not with the config (dmm_ray.config imports TeacherSpec)
    import torch

FORMATS = ("diffusers", "single_file", "lora", "ckpt")

# Fields that must agree between every teacher and the student base for score distillation to
# make sense: same UNet shapes, same latent space, same noise schedule / parameterisation.
UNET_FIELDS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
    "attention_head_dim",
    "addition_embed_type",
)
VAE_FIELDS = ("latent_channels", "scaling_factor")
# rescale_betas_zero_snr changes the betas themselves (a zero-terminal-SNR fine-tune's last alpha_bar is 0),
# and DDPMScheduler.from_pretrained applies it to the training noise too
SCHEDULER_FIELDS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "rescale_betas_zero_snr")
# what diffusers' schedulers take for a field their config leaves out or null (PNDM has no rescale_betas_zero_snr)
_SCHEDULER_DEFAULTS = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}


# how a pickled LoRA becomes the one .safetensors file a LoRA teacher is
PICKLED_LORA_HINT = (
    "a pickled .bin/.pt LoRA, which can run code when loaded, converts with "
    "safetensors.torch.save_file(torch.load(PATH, weights_only=True), NEW.safetensors)"
)


class TeacherError(ValueError):
    """A teacher checkpoint is missing, corrupt, or in the wrong format."""


class TeacherArchitectureError(TeacherError):
    """A teacher's architecture differs from the student base (names the teacher and the field)."""


class TeacherSpec(BaseModel):
    """One teacher: `TeacherSpec(name="anime", source="zoo/anime")`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    source: str
    format: Literal["diffusers", "single_file", "lora", "ckpt"] | None = None
    base: str | None = None
    description: str = ""
    lora_scale: float = 1.0
    allow_pickle: bool = False

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        # the name is the merged model's style name, which StyleUNet refuses empty: inside the distill
        # workers, after Ray started and the latents were encoded, where --dry-run said OK
        if not name:
            raise ValueError("a teacher's name is empty; give each teacher a non-empty name (it becomes the style name that `style=` picks)")
        return name

    @model_validator(mode="after")
    def _lora_scale_needs_a_lora(self) -> "TeacherSpec":
        # only a LoRA is scaled (fused at lora_scale); on another format lora_scale did nothing without a word.
        # A format left out is found from the files, so resolved_format checks that case
        if self.format is not None:
            self._check_lora_scale(self.format)
        return self

    def _check_lora_scale(self, fmt: str) -> None:
        # 1.0, the default, changes nothing (and a merge record lists it for every teacher)
        if fmt != "lora" and self.lora_scale != 1.0:
            raise TeacherError(
                f"teacher {self.name!r}: lora_scale {self.lora_scale:g} scales a LoRA teacher (format lora), and this one is "
                f"format {fmt}, which has no LoRA to scale; remove lora_scale, or for a LoRA give its .safetensors file with "
                "format: lora and base:"
            )

    @classmethod
    def from_record(cls, raw: dict) -> "TeacherSpec":
        """A teacher as a merged model's record (dmm_merge.json) lists it. Until lora_scale on a teacher that
        is no LoRA was refused (_check_lora_scale), a config could give it, and it did nothing: the record of
        a model merged so reads with lora_scale 1.0, what that teacher was merged with, and a warning, so the
        model still grows, exports and is evaluated, while a new config with it is still refused."""
        data = dict(raw)
        scale, fmt = data.get("lora_scale", 1.0), data.get("format")
        if scale != 1.0 and fmt != "lora":
            if fmt is None:  # left out in the config: found from the files, as the merge found it
                try:
                    fmt = detect_format(str(data.get("source")), has_base=data.get("base") is not None, name=str(data.get("name")))
                except (OSError, ValueError):
                    fmt = None  # files gone or unreadable: whoever reads them next says so, lora_scale aside
            if fmt is not None and fmt != "lora":
                logging.getLogger(__name__).warning(
                    "teacher %r: the merged model's record gives lora_scale %s on a %s teacher, which has no LoRA to scale "
                    "(the merge ignored it; a config with it is refused now): read as lora_scale 1.0",
                    data.get("name"),
                    scale,
                    fmt,
                )
                data["lora_scale"] = 1.0
        return cls.model_validate(data)

    def resolved_format(self) -> str:
        fmt = self.format or detect_format(self.source, has_base=self.base is not None, name=self.name)
        self._check_lora_scale(fmt)
        source = Path(self.source)
        # a LoRA or single_file teacher is read as a safetensors file: any other file was "truncated, copy or download it again"
        if fmt == "lora" and source.suffix.lower() != ".safetensors":
            raise TeacherError(
                f"teacher {self.name!r}: {source.name} is not a .safetensors file, and a LoRA teacher (format lora) is one "
                f"(a folder that save_lora_weights wrote: its pytorch_lora_weights.safetensors); {PICKLED_LORA_HINT}"
            )
        if fmt == "single_file" and source.suffix.lower() != ".safetensors" and source.is_file():  # (a folder: scan_safetensors says so)
            raise TeacherError(
                f"teacher {self.name!r}: {source.name} is not a .safetensors file, and a single_file teacher is one; "
                "a pickled .ckpt/.pt/.bin checkpoint is format ckpt (with allow_pickle: true), a diffusers folder format diffusers"
            )
        return fmt

    def resolve_paths(self, root: str | os.PathLike) -> "TeacherSpec":
        """Paths relative to `root` (e.g. the folder of zoo.yaml) made absolute, by the config's rule
        (`dmm_ray.paths.resolve`: `~` and `$DMM_HOME` expand, URIs stay)."""
        from dmm_ray.paths import resolve

        return self.model_copy(update={"source": resolve(self.source, root), "base": resolve(self.base, root)})


@dataclass
class Teacher:
    """A loaded, frozen teacher: the UNet and its own text encoder (paper: teachers keep theirs)."""

    name: str
    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler: Any
    spec: TeacherSpec
    text_encoder_2: Any = None  # SDXL teachers: the second text encoder and its tokenizer
    tokenizer_2: Any = None


def detect_format(source: str, has_base: bool = False, name: str = "?") -> str:
    path = Path(source)
    if path.is_dir():
        if (path / "model_index.json").exists():
            return "diffusers"
        raise TeacherError(f"teacher {name!r}: folder {source} is not a diffusers pipeline (no model_index.json)")
    if not path.exists():
        raise TeacherError(f"teacher {name!r}: {source} does not exist")
    suffix = path.suffix.lower()  # NOISE.SAFETENSORS too
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    if suffix != ".safetensors":
        raise TeacherError(f"teacher {name!r}: cannot tell the format of {path.name}; expected a diffusers folder, .safetensors or .ckpt")
    keys = _safetensors_keys(path, name)
    if any("lora" in k for k in keys[:50]):
        if not has_base:
            raise TeacherError(f"teacher {name!r}: {path.name} is a LoRA file; give `base:` (the diffusers folder it was trained on)")
        return "lora"
    return "single_file"


def _safetensors_keys(path: Path, name: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            # Touch the last tensor: a truncated file fails here rather than mid-training.
            if keys:
                handle.get_slice(keys[-1])
            return keys
    except Exception as error:  # safetensors raises several types for bad headers/lengths
        raise TeacherError(f"teacher {name!r}: {path} is truncated or not a valid safetensors file ({error})") from None


def _require_base(spec: TeacherSpec, fmt: str) -> str:
    if not spec.base:
        raise TeacherError(
            f"teacher {spec.name!r}: format {fmt!r} needs `base:` (a diffusers folder with the same architecture, "
            "for configs and tokenizer; nothing is downloaded)"
        )
    if not (Path(spec.base) / "model_index.json").exists():
        raise TeacherError(f"teacher {spec.name!r}: base {spec.base} is not a diffusers pipeline folder")
    return spec.base


def load_teacher_pipeline(spec: TeacherSpec, torch_dtype: torch.dtype | None = None, pipeline_class=None, text_encoders_only: bool = False):
    """A teacher as a diffusers StableDiffusionPipeline, or StableDiffusionXLPipeline when its folder
    (or, for single files and LoRAs, its base) is SDXL-architecture; offline, no safety checker.
    `text_encoders_only`: its UNet and VAE, most of it, are not loaded (None), for what reads only its text
    encoders; a LoRA teacher is loaded whole (diffusers loads a LoRA's text-encoder layers only with its UNet)."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    from dmm_ray.architectures import base_pipeline_class, pipeline_kwargs

    fmt = spec.resolved_format()
    cls = pipeline_class or base_pipeline_class(spec.source if fmt == "diffusers" else (spec.base or spec.source))
    common = dict(**pipeline_kwargs(cls), local_files_only=True)
    if torch_dtype is not None:
        common["torch_dtype"] = torch_dtype
    if text_encoders_only and fmt != "lora":
        common.update(unet=None, vae=None)  # diffusers' from_pretrained / from_single_file skip a component given as None
    try:
        if fmt == "diffusers":
            return cls.from_pretrained(spec.source, **common)
        if fmt == "single_file":
            base = _require_base(spec, fmt)
            _safetensors_keys(Path(spec.source), spec.name)
            return cls.from_single_file(spec.source, config=base, **common, **_single_file_components(spec.source, base, torch_dtype))
        if fmt == "lora":
            base = _require_base(spec, fmt)
            _safetensors_keys(Path(spec.source), spec.name)
            pipe = cls.from_pretrained(base, **common)
            pipe.load_lora_weights(spec.source, adapter_name="teacher")
            pipe.fuse_lora(lora_scale=spec.lora_scale)  # fused: no LoRA overhead per step
            pipe.unload_lora_weights()
            return pipe
        if fmt == "ckpt":
            return _load_pickled(spec, cls, common)
    except TeacherError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError) as error:  # the last: a file without a text encoder
        raise TeacherError(f"teacher {spec.name!r}: could not load {spec.source} as {fmt}: {error}") from error
    raise TeacherError(f"teacher {spec.name!r}: unknown format {fmt!r}; expected one of {FORMATS}")


def _pickle_refused(spec: TeacherSpec) -> TeacherError:
    return TeacherError(
        f"teacher {spec.name!r}: {Path(spec.source).name} is a pickled checkpoint, which can run code when loaded; "
        "convert it to .safetensors or set `allow_pickle: true` (it is then read with torch.load(weights_only=True))"
    )


def _load_pickled(spec: TeacherSpec, cls, common):
    if not spec.allow_pickle:
        raise _pickle_refused(spec)
    # diffusers reads non-safetensors single files with torch.load(weights_only=True) and unwraps "state_dict".
    base = _require_base(spec, "ckpt")
    return cls.from_single_file(spec.source, config=base, **common, **_single_file_components(spec.source, base, common.get("torch_dtype")))


def _single_file_components(source: str, base: str, torch_dtype: torch.dtype | None) -> dict:
    """Components to pass to `from_single_file` instead of letting diffusers convert them: SDXL's second
    text encoder where diffusers would read the first encoder's weights into it (equal widths)."""
    from dmm_ray.formats.single_file import sdxl_text_encoder_2

    text_encoder_2 = sdxl_text_encoder_2(source, base, torch_dtype)
    return {} if text_encoder_2 is None else {"text_encoder_2": text_encoder_2}


def load_teacher(spec: TeacherSpec, device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None) -> Teacher:
    """Load and freeze a teacher (UNet + its own text encoder + tokenizer; VAE and scheduler too)."""
    pipe = load_teacher_pipeline(spec, torch_dtype=torch_dtype)
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae, text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return Teacher(
        spec.name, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, pipe.scheduler, spec, text_encoder_2, getattr(pipe, "tokenizer_2", None)
    )


# ---- file checks (jobs/merge.py --dry-run; run_merge before Ray starts) -----------------------

# bytes per element of the safetensors dtypes
_ST_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # folders that must have config.json + weights


def scan_safetensors(path: str | os.PathLike, who: str, deep: bool = False) -> None:
    """Cheap check of one .safetensors file from its header alone: the header parses, every tensor's
    byte range matches its shape and dtype, and the file holds all the bytes the header promises (a
    truncated download fails here). `deep`: also read every tensor and fail on NaN/Inf values."""
    path = Path(path)
    if not path.is_file():
        what = (
            "is a folder, not a .safetensors file (a diffusers folder: format diffusers, or leave format out)" if path.is_dir() else "does not exist"
        )
        raise TeacherError(f"{who}: {path} {what}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise TeacherError(
                f"{who}: {path} is truncated or not a safetensors file ({size} bytes; its header "
                f"{'is cut off' if length >= 2 else 'is missing'}); copy or download it again"
            )
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise TeacherError(f"{who}: {path} has a corrupt safetensors header ({error}); copy or download it again") from None
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TeacherError(f"{who}: {path}: tensor {key!r} has a malformed header entry {info!r}") from None
        width = _ST_DTYPE_BYTES.get(dtype)
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if width is not None and stop - start != numel * width:
            raise TeacherError(
                f"{who}: {path}: tensor {key!r} of shape {shape} ({dtype}) needs {numel * width} bytes but the "
                f"header gives it {stop - start}; the file is corrupt, copy or download it again"
            )
        end = max(end, stop)
    have = size - 8 - length
    if have < end:
        raise TeacherError(
            f"{who}: {path} is truncated: its header describes {end} bytes of tensors but only {have} follow "
            "(an interrupted download or copy?); copy or download it again"
        )
    if deep:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                _check_finite(handle.get_tensor(key), key, path, who)


def _check_finite(tensor, key: str, path: Path, who: str) -> None:
    import torch

    if torch.is_tensor(tensor) and tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise TeacherError(
                f"{who}: {path}: tensor {key!r} has {bad} NaN/Inf value(s) of {tensor.numel()}; distilling from "
                "it would make the loss NaN. Use an intact copy of this checkpoint (or drop the teacher)"
            )


def _read_pickled(spec: TeacherSpec, who: str) -> dict:
    """An allowed .ckpt's state dict, read as the worker's from_single_file reads it (diffusers'
    load_state_dict: torch.load(weights_only=True), memory-mapped when it is torch.save's zip format,
    so no tensor's bytes are read here; a "state_dict" level unwrapped). Called here rather than through
    diffusers, whose wrapper replaces torch's own error (which says what is wrong) with its own."""
    import zipfile

    import torch

    path = Path(spec.source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch / zipfile / pickle raise many types for a bad file
        raise TeacherError(
            f"{who}: could not read {path} as a torch checkpoint ({type(error).__name__}: {str(error).strip()}); it is truncated, "
            "corrupt or not a torch.save file: copy or download it again, or give the checkpoint as .safetensors"
        ) from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise TeacherError(
            f"{who}: {path} holds no state dict of tensors (found {type(state).__name__}); a .ckpt teacher must be an "
            "LDM-layout Stable Diffusion checkpoint (UNet, VAE and text encoder weights)"
        )
    return state


def _pickled_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    import torch

    return {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}


def _read_pickled_shapes(spec: TeacherSpec, who: str, shapes: dict | None) -> dict[str, tuple[int, ...]]:
    """An allowed .ckpt's tensor shapes (`_read_pickled`), taken from `shapes` (by path) when an earlier
    check of the same pre-flight read the file, and recorded there: unpickling the index is the cost
    of a .ckpt check (the whole file, for a checkpoint in torch's legacy, not memory-mappable format)."""
    key = str(Path(spec.source).resolve())
    if shapes is None or key not in shapes:
        found = _pickled_shapes(_read_pickled(spec, who))
        if shapes is None:
            return found
        shapes[key] = found
    return shapes[key]


def _scan_pickled(spec: TeacherSpec, who: str, shapes: dict | None = None) -> None:
    """--deep on an allowed .ckpt: every tensor of its state dict (its shapes recorded in `shapes`)."""
    path = Path(spec.source)
    state = _read_pickled(spec, who)
    if shapes is not None:
        shapes[str(path.resolve())] = _pickled_shapes(state)
    stack = [("", state)]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{prefix}{k}.", v) for k, v in value.items()]
        else:
            _check_finite(value, prefix.rstrip("."), path, who)


def check_pipeline_folder(folder: str | os.PathLike, who: str, deep: bool = False, require_weights: bool = True) -> None:
    """Every component model_index.json lists is there: each model folder (unet, vae, text encoders)
    has its config.json and its weights (every .safetensors header scanned, see `scan_safetensors`)."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not folder.exists():
        raise TeacherError(f"{who}: {folder} does not exist")
    if not index_file.is_file():
        raise TeacherError(f"{who}: {folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as error:
        raise TeacherError(f"{who}: {index_file} is not valid JSON ({error})") from None
    for component, value in index.items():
        if component.startswith("_") or not isinstance(value, (list, tuple)) or None in value:
            continue
        sub = folder / component
        if not sub.is_dir():
            raise TeacherError(f"{who}: {sub} is missing (model_index.json lists {component}: {list(value)}); the pipeline folder is incomplete")
        if component in _MODEL_COMPONENTS and not (sub / "config.json").is_file():
            raise TeacherError(f"{who}: {sub / 'config.json'} is missing; the pipeline folder is incomplete")
        if component == "scheduler" and not (sub / "scheduler_config.json").is_file():
            raise TeacherError(f"{who}: {sub / 'scheduler_config.json'} is missing; the pipeline folder is incomplete")
        if component.startswith("tokenizer") and not _has_vocabulary(sub):  # it would load as an empty tokenizer, silently
            raise TeacherError(f"{who}: {sub} holds no vocabulary (tokenizer.json, or vocab.json with merges.txt); the pipeline folder is incomplete")
        if not (sub / "config.json").is_file():
            continue  # tokenizer, scheduler, feature extractor: no weights
        for index_json in sub.glob("*.safetensors.index.json"):  # sharded weights: every shard present
            shards = sorted(set(json.loads(index_json.read_text()).get("weight_map", {}).values()))
            missing = [s for s in shards if not (sub / s).is_file()]
            if missing:
                raise TeacherError(f"{who}: {index_json} lists shard(s) {missing} that are missing; the pipeline folder is incomplete")
        weights = sorted(p for p in sub.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        if not weights and require_weights and component in _MODEL_COMPONENTS:
            raise TeacherError(
                f"{who}: {sub} has no weights file (e.g. diffusion_pytorch_model.safetensors / model.safetensors); "
                "the pipeline folder is incomplete, copy it again"
            )
        for weight in weights:
            if weight.suffix == ".safetensors":
                scan_safetensors(weight, who, deep)


def check_teacher_files(specs: Sequence[TeacherSpec], deep: bool = False, shapes: dict | None = None) -> None:
    """What can be checked of the teachers' files without loading them: present, formats allowed
    (`.ckpt` needs allow_pickle), safetensors headers and sizes intact (a truncated file), a `.ckpt`
    readable by torch.load (memory-mapped: its index, not its weights), pipeline folders complete.
    `deep` also reads every tensor and fails on NaN/Inf (slow: all the weights).
    Errors name the teacher and the file; every teacher is checked, and several problems are
    reported together, one line each (a config whose 8 paths are wrong says so once).
    `shapes`: a dict that keeps the .ckpt teachers' tensor shapes read here for `validate_teachers`
    (the same dict passed there reads each .ckpt once)."""
    problems: list[Exception] = []
    for spec in specs:
        try:
            _check_teacher_file(spec, deep, shapes)
        except (ValueError, OSError) as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise TeacherError(f"{len(problems)} of {len(specs)} teachers cannot be used:\n" + "\n".join(f"  {e}" for e in problems))


def _check_teacher_file(spec: TeacherSpec, deep: bool, shapes: dict | None = None) -> None:
    who = f"teacher {spec.name!r}"
    fmt = spec.resolved_format()  # a missing source fails here, naming the teacher
    if fmt == "ckpt" and not spec.allow_pickle:
        raise _pickle_refused(spec)
    if fmt == "diffusers":
        check_pipeline_folder(spec.source, who, deep)
    elif fmt in ("single_file", "lora"):
        scan_safetensors(spec.source, who, deep)
    elif fmt == "ckpt" and deep:
        _scan_pickled(spec, who, shapes)
    elif fmt == "ckpt":
        _read_pickled_shapes(spec, who, shapes)
    if spec.base and fmt != "diffusers":
        # a LoRA uses all of its base; a single file takes configs and tokenizer from it
        check_pipeline_folder(_require_base(spec, fmt), f"{who} (its base)", deep, require_weights=fmt == "lora")


# ---- architecture validation (before anything is trained or Ray is started) ------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def folder_architecture(folder: str | os.PathLike) -> dict[str, Any]:
    """Architecture fields of a diffusers pipeline folder, read from its configs (no weights)."""
    folder = Path(folder)
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    arch = {f"unet.{k}": _norm(unet.get(k)) for k in UNET_FIELDS}
    arch.update({f"vae.{k}": _norm(vae.get(k)) for k in VAE_FIELDS})
    arch.update({f"scheduler.{k}": _norm(_SCHEDULER_DEFAULTS.get(k) if scheduler.get(k) is None else scheduler[k]) for k in SCHEDULER_FIELDS})
    return arch


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _meta_model(base: str, component: str, models: dict) -> Any:
    """The base's `component` (unet, vae, text_encoder, text_encoder_2) built from its config on the
    meta device: every layer and shape, no weights (milliseconds). `models` keeps them for the other
    teachers of the same base."""
    key = (str(base), component)
    if key not in models:
        import torch

        library, class_name = _read_json(Path(base) / "model_index.json")[component]
        model_class = getattr(importlib.import_module(library), class_name)  # diffusers or transformers
        folder = Path(base) / component
        with torch.device("meta"):
            if library == "diffusers":
                models[key] = model_class.from_config(model_class.load_config(folder))
            else:
                models[key] = model_class(model_class.config_class.from_pretrained(folder))
    return models[key]


def _text_encoders(base: str) -> list[str]:
    index = _read_json(Path(base) / "model_index.json")
    return [c for c in ("text_encoder", "text_encoder_2") if isinstance(index.get(c), list) and None not in index[c]]


def _check_single_file(spec: TeacherSpec, base: str, models: dict, shapes: dict | None = None) -> None:
    """A single-file (or allowed .ckpt) teacher against its base, from tensor shapes alone (a
    .safetensors header; a .ckpt memory-mapped): the UNet tensor for tensor, and the VAE and text
    encoder(s) present, which diffusers' from_single_file takes from the file, not from `base`.
    `shapes`: a .ckpt's shapes that `check_teacher_files` read (see `_read_pickled_shapes`)."""
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, is_clip_model_in_single_file
    from safetensors import safe_open

    from dmm_ray.formats.single_file import CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, VAE_PREFIX, to_ldm_state_dict

    who = f"teacher {spec.name!r} ({spec.source})"
    pickled = spec.resolved_format() == "ckpt"  # (with no format: given, a read of the file's header)
    if pickled:
        got = _read_pickled_shapes(spec, f"teacher {spec.name!r}", shapes)
    else:
        with safe_open(spec.source, framework="pt") as handle:
            got = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    encoders = _text_encoders(base)
    parts = [_meta_model(base, c, models) for c in ("unet", "vae", *encoders)]
    # the base exported to the LDM layout (what dmm-ray's own export writes), as shapes
    expected = {k: tuple(v.shape) for k, v in to_ldm_state_dict(*parts).items()}
    lora_key = next((k for k in got if "lora" in k.lower()), None)
    if lora_key is not None:
        # a LoRA read as a whole checkpoint (a pickled .bin LoRA is found to be format ckpt) "holds no VAE weights",
        # which sent the user looking for a complete checkpoint
        raise TeacherError(
            f"{who}: the file holds LoRA weights ({lora_key}, ...), not a whole checkpoint; a LoRA teacher is format: lora "
            "with base: and one .safetensors file" + (f"; {PICKLED_LORA_HINT}" if pickled else "")
        )
    if not any(k.startswith(tuple(LDM_VAE_KEYS)) for k in got):
        raise TeacherError(
            f"{who}: the file holds no VAE weights (no {VAE_PREFIX}* tensors); diffusers takes a single file's VAE from "
            "the file, not from `base:`, so use the complete checkpoint (UNet, VAE and text encoder)"
        )
    for component, model in zip(encoders, parts[2:]):
        if not is_clip_model_in_single_file(type(model), got):
            raise TeacherError(
                f"{who}: the file holds no weights for the base's {component} ({type(model).__name__}); diffusers takes a "
                "single file's text encoder from the file, not from `base:`, so use the complete checkpoint (UNet, VAE "
                "and text encoder)"
            )
    text_prefixes = (CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX)
    for key, shape in expected.items():
        have = got.get(key)
        if key.startswith(VAE_PREFIX):  # LDM's VAE attention is 1x1 convs or linear: the first two dims decide
            problem = (
                have is not None and have[:2] != shape[:2] and f"VAE tensor {key} has shape {have} but the base has {shape} (different latent space)"
            )
        elif key.startswith(text_prefixes):  # other layouts of the same text encoder exist: compared where the names agree
            problem = have is not None and have != shape and f"text encoder tensor {key} has shape {have} but the base has {shape}"
        elif have is None:
            problem = f"UNet tensor {key} is missing (the base has it with shape {shape})"
        else:
            problem = have != shape and f"UNet tensor {key} has shape {have} but the base has {shape}"
        if problem:
            raise TeacherArchitectureError(f"{who}: {problem}; all teachers must share the base's architecture")


def _check_lora(spec: TeacherSpec, base: str, models: dict) -> None:
    """Every tensor of a LoRA file lands on a layer of its base, with that layer's shapes. diffusers'
    load_lora_weights loads keys that name no layer with only a warning: a LoRA made for another model
    would fuse as nothing, and the teacher would silently be its base. The file is read as the worker
    reads it (the pipeline's lora_state_dict: kohya / A1111 names converted), from its header: every
    matrix a meta tensor (shape only), only the scalars (alphas, which the conversion reads) loaded."""
    import math

    import torch
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors import safe_open

    from dmm_ray.architectures import base_pipeline_class, is_sdxl

    who = f"teacher {spec.name!r} ({spec.source})"
    with safe_open(spec.source, framework="pt") as handle:
        raw = {}
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            raw[key] = handle.get_tensor(key) if math.prod(shape) <= 1 else torch.empty(shape, device="meta")
    unet = _meta_model(base, "unet", models)
    try:
        state, _ = base_pipeline_class(base).lora_state_dict(raw, **({"unet_config": unet.config} if is_sdxl(base) else {}))
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as error:
        raise TeacherError(f"{who}: diffusers cannot read it as a LoRA ({type(error).__name__}: {error})") from None
    not_lora = [k for k in state if "lora" not in k]
    if not_lora:  # load_lora_weights refuses the file
        raise TeacherError(
            f"{who}: {len(not_lora)} of its {len(state)} tensors are no LoRA weights (e.g. {not_lora[0]!r}); a LoRA teacher is a "
            "file of LoRA weights only (diffusers' save_lora_weights, kohya); a full model is format single_file or diffusers"
        )
    components = ["unet", *_text_encoders(base)]
    stray = [k for k in state if k.split(".", 1)[0] not in components]
    if stray:
        raise TeacherArchitectureError(
            f"{who}: {len(stray)} of its {len(state)} tensors name no component of the base {base} (e.g. {stray[0]!r}; "
            f"the base has {components}), and diffusers would skip them without a word; use a LoRA made for this base"
        )
    for component in components:
        part = {k.removeprefix(component + "."): v for k, v in state.items() if k.startswith(component + ".")}
        if not part:
            continue
        model = _meta_model(base, component, models)
        if component == "unet":  # the conversions load_lora_adapter / _load_lora_into_text_encoder apply
            part = part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            if not hasattr(model, "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        layers = dict(model.named_modules())
        missing = []
        for key, tensor in part.items():
            if ".lora_" not in key:
                continue  # other adapter kinds (LoKr, ...): left to diffusers' loader
            name, kind = key.split(".lora_", 1)
            layer = layers.get(name)
            if layer is None:
                missing.append(key)
                continue
            size_in = getattr(layer, "in_features", None) or getattr(layer, "in_channels", None)
            size_out = getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)
            if kind.startswith("A.") and size_in is not None and tensor.ndim >= 2 and tensor.shape[1] != size_in:
                want = f"{size_in} inputs"
            elif kind.startswith("B.weight") and size_out is not None and tensor.shape[0] != size_out:
                want = f"{size_out} outputs"
            else:
                continue
            raise TeacherArchitectureError(
                f"{who}: {component} layer {name} has {want} in the base {base} but the LoRA's {key} has shape "
                f"{tuple(tensor.shape)}; the LoRA was trained on another architecture: give the `base:` it was trained on"
            )
        if missing:
            raise TeacherArchitectureError(
                f"{who}: {len(missing)} of its {len(part)} {component} tensors name no layer of the base {base} (e.g. {missing[0]!r}), "
                "and diffusers would skip them without a word (the teacher would be its base); use a LoRA made for this base"
            )


def _has_vocabulary(folder: Path) -> bool:
    """A tokenizer folder's vocabulary: a fast tokenizer's tokenizer.json, a BPE vocab.json with its
    merges.txt (SD's CLIP tokenizers), or a WordPiece / SentencePiece file."""
    has = lambda name: (folder / name).is_file()  # noqa: E731
    return has("tokenizer.json") or (has("vocab.json") and has("merges.txt")) or any(map(has, ("vocab.txt", "spiece.model", "tokenizer.model")))


def validate_teachers(specs: Sequence[TeacherSpec], base: str, shapes: dict | None = None) -> None:
    """Fail early, naming the teacher and the field, if any teacher differs from the student base.
    `shapes`: the dict given to `check_teacher_files` before, whose .ckpt reads are reused."""
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TeacherError(f"duplicate teacher names {duplicates}; each teacher (style) needs a unique name")
    if not (Path(base) / "model_index.json").exists():
        raise TeacherError(f"student base {base} is not a diffusers pipeline folder (no model_index.json)")
    want = folder_architecture(base)
    problems: list[TeacherError] = []  # every teacher's, in one error
    models: dict = {}  # each base's models on the meta device, built once
    for spec in specs:
        try:
            _check_architecture(spec, want, models, shapes, base)
        except TeacherError as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        kind = TeacherArchitectureError if all(isinstance(e, TeacherArchitectureError) for e in problems) else TeacherError
        raise kind(f"{len(problems)} teachers cannot be merged:\n" + "\n".join(f"  {e}" for e in problems))


def _check_architecture(spec: TeacherSpec, want: dict, models: dict, shapes: dict | None = None, student_base: str | None = None) -> None:
    """A TeacherError (TeacherArchitectureError) when `spec` differs from the student base's
    architecture `want`, or a single file, .ckpt or LoRA does not fit its own base (see
    `_check_single_file`, `_check_lora`); `models`: the bases' meta models, shared between teachers;
    `shapes`: .ckpt shapes already read (`check_teacher_files`); `student_base`: the folder whose UNet
    the teacher's (its folder's, or its `base:`'s) must match tensor for tensor."""
    fmt = spec.resolved_format()
    if fmt == "ckpt" and not spec.allow_pickle:
        raise _pickle_refused(spec)
    if fmt == "diffusers":
        folder = spec.source
    else:
        folder = _require_base(spec, fmt)
        if fmt == "lora":
            _check_lora(spec, folder, models)
        else:
            _check_single_file(spec, folder, models, shapes)
    got = folder_architecture(folder)
    for field, value in want.items():
        if got.get(field) != value:
            raise TeacherArchitectureError(
                f"teacher {spec.name!r} ({spec.source}): {field} is {got.get(field)!r} but the student base has {value!r}; "
                "all teachers must share the base's UNet architecture, latent space and noise schedule"
            )
    if student_base is not None:
        _check_unet_shapes(spec, folder, student_base, models)


def _check_unet_shapes(spec: TeacherSpec, folder: str, student_base: str, models: dict) -> None:
    """The UNet of `folder` (a diffusers teacher, or a file teacher's `base:`) has the student base's
    tensors with their shapes, from the configs on the meta device: the fields above leave out e.g.
    use_linear_projection (Linear or 1x1-conv proj_in/proj_out) and transformer_layers_per_block, and
    the style adapters' start (the teacher's weight minus the base's) fails inside the workers on such
    a teacher. (A single file's own tensors were compared with its `base:` in `_check_single_file`.)"""

    def config(root):  # without diffusers' own keys (_diffusers_version, _name_or_path)
        return {k: v for k, v in _read_json(Path(root) / "unet" / "config.json").items() if not k.startswith("_")}

    if config(folder) == config(student_base):  # the same UNet (the usual fine-tune): nothing to build
        return
    got = {k: tuple(v.shape) for k, v in _meta_model(folder, "unet", models).state_dict().items()}
    want = {k: tuple(v.shape) for k, v in _meta_model(student_base, "unet", models).state_dict().items()}
    where = f"teacher {spec.name!r} ({spec.source}{'' if folder == spec.source else f', base {folder}'})"
    for key, shape in want.items():
        have = got.get(key)
        if have != shape:
            problem = "is missing" if have is None else f"has shape {have}"
            raise TeacherArchitectureError(
                f"{where}: UNet tensor {key} {problem} but the student base has it with shape {shape}; "
                "all teachers must share the base's UNet architecture"
            )
    extra = sorted(set(got) - set(want))
    if extra:
        raise TeacherArchitectureError(
            f"{where}: {len(extra)} UNet tensor(s) the student base does not have (e.g. {extra[0]}); "
            "all teachers must share the base's UNet architecture"
        )


# files_checksum's rules, oldest first. State an earlier dmm-ray recorded holds checksums by its rule, which
# fingerprint.recorded_by_an_earlier_rule compares them by too (a teacher's, and every other checksum a record
# holds), so unchanged files still resume:
#   "first-chunk"  a file between one and two chunks long (16-32 MiB: an SD LoRA of rank 16-32) hashed by its
#                  first chunk only (an edit after it kept the checksum); hidden files below a folder hashed
#   "hidden"       the last chunk of every file over one; hidden files below a folder still hashed
#   "content"      hidden files below a folder left out (now)
CHECKSUM_RULES = ("first-chunk", "hidden", "content")


def files_checksum(roots: Sequence[str | os.PathLike], salt: str = "", chunk: int = 1 << 24, pattern: str = "*", rule: str = "content") -> str:
    """sha256 over every file's relative name, size and its first and last `chunk` bytes (folders:
    every file below matching `pattern`, hidden ones aside). Cheap on multi-GB checkpoints, changes when
    weights change. `rule`: one of CHECKSUM_RULES, an earlier one only to compare a checksum recorded by it."""
    if rule not in CHECKSUM_RULES:
        raise ValueError(f"unknown checksum rule {rule!r}; expected one of {', '.join(CHECKSUM_RULES)}")
    digest = hashlib.sha256(salt.encode())
    for root in roots:
        root = Path(root)
        # a hidden file or folder below the root is no model content (diffusers reads none): `hf download
        # --local-dir` keeps .cache/huggingface/**/*.metadata there, with a download timestamp, so the same
        # teacher downloaded again got another checksum (.git, .DS_Store, .ipynb_checkpoints alike)
        files = (
            sorted(
                p
                for p in root.rglob(pattern)
                if p.is_file() and (rule != "content" or not any(part.startswith(".") for part in p.relative_to(root).parts))
            )
            if root.is_dir()
            else [root]
        )
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}|{size}".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(chunk))
                # the last `chunk` bytes, or all after the first chunk in a file under 2 chunks long
                if size > (2 * chunk if rule == "first-chunk" else chunk):
                    handle.seek(max(chunk, size - chunk))
                    digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


def teacher_checksum(spec: TeacherSpec, chunk: int = 1 << 24, rule: str = "content") -> str:
    """Content fingerprint of a teacher (and its LoRA/base): `files_checksum` of its files (by `rule`),
    salted with its name, format and LoRA scale."""
    paths = [spec.source] + ([spec.base] if spec.base else [])
    return files_checksum(paths, f"{spec.name}|{spec.resolved_format()}|{spec.lora_scale}", chunk, rule=rule)

"""Bake a style (or a mixture of styles) into a stock Stable Diffusion checkpoint, exactly.

The style enters a StyleUNet in two places, both constants once the style is fixed:

* `MLP(e~)` is added to the timestep embedding before its activation (diffusers:
  `emb = time_embedding(t) + class_embedding(e~)`, and `time_embedding` ends in `linear_2`), so it
  folds into `time_embedding.linear_2.bias`: `W h + b + c = W h + (b + c)`.
* with `style_adapter_rank`, each adapted layer gets `W + sum_i w_i B_i A_i` and
  `b + sum_i w_i c_i` (models/style_adapters.py).
* with `style_film`, each ResNet block's norm2 output y is mapped to `y (1 + s) + sh`, with
  (s, sh) = FiLM_k(SiLU(MLP(e~))) per channel. norm2 is a GroupNorm with an affine (w, b):
  `y = n w + b`, so `y (1 + s) + sh = n w (1 + s) + b (1 + s) + sh`, i.e. `w' = w (1 + s)`,
  `b' = b (1 + s) + sh`.

What remains is a plain `UNet2DConditionModel` with no class embedding and no hooks: any
diffusers, ComfyUI or A1111 user loads it as an ordinary SD1.5 / SDXL checkpoint. CFG is
unaffected (both halves carry the same style); SDXL's `text_time` add-embedding is kept.

    from dmm_ray.export import bake, export_pipeline
    plain = bake(merged_pipe, style="noir")                          # StableDiffusion(XL)Pipeline
    plain = bake(merged_pipe, style_weights={"noir": 0.5, "neon": 0.5})
    export_pipeline(plain, "noir.safetensors", fmt="single_file", metadata=provenance(...))

`jobs/export.py` is the command-line front end over this module (its checks before any work:
`check_device`, `check_selection`, `export_config_dir`; `verify`, `unet_relative_error`, `weights_relative_error`) and
`dmm_ray.export_tracking` (`resolve_model`, `export_target`, `check_run`, `log_export`: the MLflow side).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from dmm_ray.merged_model import recover_killed, remove, save_siblings, swap_in
from dmm_ray.models.style_adapters import weights_from_embeds
from dmm_ray.models.style_unet import STYLE_CONFIG_KEYS, StyleError, StyleUNet, inner_unet, resolve_style

EXPORT_RECORD = "dmm_export.json"  # provenance beside a diffusers-folder export
CONFIG_RECORD = "dmm_export_config.json"  # marks a config folder an export wrote: a later export may replace it


class ExportError(ValueError):
    """A model that cannot be baked or written as asked (message says what to do)."""


# ---- the fold ---------------------------------------------------------------------------------
def style_vector(unet: StyleUNet, style=None, style_weights=None) -> torch.Tensor:
    """Normalised weights (N,) for one style (name/index) or one mixture (dict / list of N weights)."""
    if (style is None) == (style_weights is None):
        raise StyleError(f"give exactly one of style= or style_weights=; known styles: {', '.join(unet.style_names)}")
    return resolve_style(unet.style_names, style if style is not None else style_weights)


@torch.no_grad()
def bake_unet(unet: StyleUNet, style=None, style_weights=None):
    """A plain `UNet2DConditionModel` whose output equals `unet`'s with that style (float tolerance)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D

    from dmm_ray.formats.single_file import has_ip_adapter, has_lora_layers, is_fused_projection

    unet = inner_unet(unet)  # also a compiled one (`pipe.unet = torch.compile(pipe.unet)`)
    if not isinstance(unet, StyleUNet):
        raise ExportError(f"bake needs a merged model's StyleUNet, got {type(unet).__name__} (already a plain UNet?)")
    if getattr(unet, "peft_config", None) or has_lora_layers(unet):  # layers stay after delete_adapters, with no config
        raise ExportError(
            "the UNet has LoRA adapters loaded; bake the merged model alone "
            "(pipe.unload_lora_weights()) and load the LoRA on the baked export instead"
        )
    if has_ip_adapter(unet):
        raise ExportError("the UNet has an IP-Adapter loaded; bake first, then load_ip_adapter on the baked export")
    if unet.config.get("class_embeddings_concat"):
        raise ExportError("class_embeddings_concat=True concatenates the style instead of adding it; it cannot be folded")
    te = unet.time_embedding
    if getattr(te, "post_act", None) is not None:
        raise ExportError("time_embedding has a post-activation (timestep_post_act); the style cannot be folded into linear_2")

    weights = style_vector(unet, style, style_weights)
    style_module = unet.class_embedding
    compute = torch.float32  # fold in float32 whatever the model's dtype, cast back at the end
    codebook = style_module.codebook.weight.to(compute)
    e = (weights.to(codebook)[:, None] * codebook).sum(dim=0, keepdim=True)  # (1, d), as style_embeds_for
    c = _mlp_float32(style_module.mlp, e)  # (1, d): MLP(e~), the constant added to the timestep embedding

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_") and k not in STYLE_CONFIG_KEYS}
    plain = UNet2DConditionModel(**config)
    # the style module goes; so do diffusers' fused q/k/v copies (`fuse_qkv_projections`): the baked UNet is unfused
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.") and not is_fused_projection(k)}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"the StyleUNet does not map onto a plain UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dtype = unet.dtype
    bias = plain.time_embedding.linear_2.bias
    bias.copy_(unet.time_embedding.linear_2.bias.to(compute) + c[0])

    if unet.config.get("style_film"):
        s = torch.nn.functional.silu(c)
        resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]  # the hooks' order (StyleUNet.__init__)
        plain_resnets = [m for m in plain.modules() if isinstance(m, ResnetBlock2D)]
        if len(resnets) != len(style_module.film) or len(plain_resnets) != len(resnets):
            raise ExportError(f"style FiLM has {len(style_module.film)} layers for {len(resnets)} ResNet blocks")
        for k, (src, dst) in enumerate(zip(resnets, plain_resnets)):
            film = style_module.film[k]
            gamma, beta = torch.nn.functional.linear(s, film.weight.to(compute), film.bias.to(compute)).chunk(2, dim=1)
            gamma, beta = gamma[0], beta[0]
            norm = src.norm2
            if not norm.affine:
                raise ExportError("a ResNet norm2 without affine parameters cannot take the style FiLM")
            dst.norm2.weight.copy_(norm.weight.to(compute) * (1 + gamma))
            dst.norm2.bias.copy_(norm.bias.to(compute) * (1 + gamma) + beta)
    if unet.config.get("style_adapter_rank"):
        # per-style low-rank adapters: W' = W + sum_i w_i B_i A_i, b' = b + sum_i w_i c_i, with the
        # weights the forward derives from e~ (least squares against the codebook)
        w = weights_from_embeds(e, codebook)[0]
        plain_modules = dict(plain.named_modules())
        for name, src, dw, db in unet.adapter_folds(w):
            layer = plain_modules[name]
            layer.weight.copy_(src.weight.to(compute) + dw)
            if db is not None:
                layer.bias.copy_(src.bias.to(compute) + db)
    plain = plain.to(unet.device)
    return (plain if dtype == torch.float32 else plain.to(dtype)).eval()


def _mlp_float32(mlp, e: torch.Tensor) -> torch.Tensor:
    """TimestepEmbedding(linear_1 -> act -> linear_2 [-> post_act]) in float32 without touching the module."""
    h = torch.nn.functional.linear(e, mlp.linear_1.weight.float(), mlp.linear_1.bias.float())
    h = mlp.act(h)
    h = torch.nn.functional.linear(h, mlp.linear_2.weight.float(), mlp.linear_2.bias.float())
    if getattr(mlp, "post_act", None) is not None:
        h = mlp.post_act(h)
    return h


def bake(pipe, style=None, style_weights=None):
    """A merged `DMMPipeline` / `DMMXLPipeline` with one style or mixture -> a plain
    `StableDiffusionPipeline` / `StableDiffusionXLPipeline` with identical outputs.

    The VAE, text encoder(s), tokenizer(s), scheduler and any image encoder are shared with `pipe`
    (not copied); only the UNet is new. Exactly one of `style` (name or index) and
    `style_weights` (dict name -> weight, or N weights; normalised) must be given.

    The pipeline keeps `pipe`'s task: an img2img or inpainting pipeline (`DMMImg2ImgPipeline.from_pipe(pipe)`)
    gives diffusers' StableDiffusion(XL)Img2ImgPipeline / InpaintPipeline, a ControlNet one (`with_controlnet`)
    its stock ControlNet form with the same ControlNet. They used to give the text-to-image pipeline, which took
    `image=`, `strength=` and `mask_image=` without a word and drew from noise, the ControlNet left out."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dmm_ray.plugins import is_xl, plain_pipeline_class

    unet = bake_unet(pipe.unet, style, style_weights)
    cls = plain_pipeline_class(pipe)
    if cls not in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        # over pipe's own modules (its ControlNet, image encoder, config such as requires_aesthetics_score), the UNet baked
        return cls.from_pipe(pipe, unet=unet, **({} if is_xl(pipe) else {"safety_checker": None, "requires_safety_checker": False}))
    common = dict(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet,
        scheduler=pipe.scheduler,
        image_encoder=getattr(pipe, "image_encoder", None),
        feature_extractor=getattr(pipe, "feature_extractor", None),
    )
    if is_xl(pipe):
        force_zeros = pipe.config.get("force_zeros_for_empty_prompt", True) if hasattr(pipe, "config") else True
        return StableDiffusionXLPipeline(
            text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, force_zeros_for_empty_prompt=force_zeros, **common
        )
    return StableDiffusionPipeline(safety_checker=None, requires_safety_checker=False, **common)


# ---- provenance -------------------------------------------------------------------------------
def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 over a file's (or folder's weight files') size and first/last 16 MiB, like teacher_checksum."""
    from dmm_ray.teachers import files_checksum

    return files_checksum([path], chunk=chunk, pattern="*.safetensors")


def merge_record(model_dir: str | os.PathLike | None) -> dict:
    """`dmm_merge.json` of a merged folder (name, styles, teachers, mlflow run), or {}."""
    from dmm_ray.merged_model import read_record

    return {} if model_dir is None else read_record(model_dir)


def teacher_checksums(record: Mapping[str, Any]) -> list[dict]:
    """[{name, source, format, checksum}] for the teachers a merge record lists (checksum
    `unavailable: ...` when a teacher's files are no longer where the merge read them)."""
    from dmm_ray.teachers import TeacherSpec, teacher_checksum

    out = []
    for raw in record.get("teachers", []):
        spec = TeacherSpec.from_record(raw)
        try:
            checksum = teacher_checksum(spec)
        except (OSError, ValueError) as exc:  # moved or deleted (a TeacherError when its format is found from its files)
            checksum = f"unavailable: {type(exc).__name__}"
        try:
            fmt = spec.resolved_format()
        except ValueError:  # found from the files, which are gone
            fmt = spec.format or "unknown"
        out.append({"name": spec.name, "source": str(spec.source), "format": fmt, "checksum": checksum})
    return out


def provenance(
    pipe,
    model: str,
    style=None,
    style_weights=None,
    model_dir: str | os.PathLike | None = None,
    run_id: str | None = None,
    export_run_id: str | None = None,
) -> dict[str, str]:
    """safetensors metadata (str -> str) for a baked export: where it came from and with which style.

    Keys: `dmm.merged_model` (the --model argument), `dmm.merged_name`, `dmm.merged_unet_fingerprint`,
    `dmm.merge_run_id` (`run_id`: the run that made the model, e.g. the one that registered a models:/ URI;
    default the run `model_dir`'s dmm_merge.json records; empty when unknown), `dmm.export_run_id` (the run
    the export is logged to, which --run-id may name apart from the merge's; empty when not logged),
    `dmm.style` (one style) or `dmm.style_weights` (a mixture, however given: JSON, normalised, by name), `dmm.styles`
    (all names, codebook order), `dmm.teachers` (JSON: name, source, format, checksum),
    `dmm.architecture` (sd15 / sdxl), `dmm.sampler` (JSON: the scheduler, steps, guidance and negative prompt the
    model samples with, `pipe.sampler_defaults`: a stock pipeline's own defaults, 50 steps at 7.5, are not the
    model's, and a few-step model's TCD / LCM scheduler refuses 50), `dmm.version`, `dmm.exported_at` (UTC).
    JSON values keep non-ASCII text as written (`café`, not `caf\\u00e9`): the header is UTF-8, and the
    printed mixture and the MLflow tag show the names as the model lists them."""
    import dmm_ray

    names = pipe.unet.style_names
    weights = style_vector(pipe.unet, style, style_weights)
    record = merge_record(model_dir)
    meta = {
        "format": "pt",
        "exported_by": "dmm-ray",
        "dmm.version": dmm_ray.__version__,
        "dmm.merged_model": str(model),
        "dmm.merged_name": str(record.get("name", "")),
        "dmm.merge_run_id": str(run_id or (record.get("mlflow") or {}).get("run_id") or ""),
        "dmm.export_run_id": str(export_run_id or ""),
        "dmm.styles": json.dumps(names, ensure_ascii=False),
        "dmm.architecture": "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15",
        "dmm.teachers": json.dumps(teacher_checksums(record), ensure_ascii=False),
        "dmm.sampler": json.dumps(pipe.sampler_defaults, ensure_ascii=False),
        "dmm.exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if model_dir is not None and (Path(model_dir) / "unet").is_dir():
        meta["dmm.merged_unet_fingerprint"] = file_fingerprint(Path(model_dir) / "unet")
    if style is not None and float(weights.max()) == 1.0:  # one style; style= may also be a mixture (a dict, N weights)
        meta["dmm.style"] = names[int(weights.argmax())]
    else:
        meta["dmm.style_weights"] = json.dumps({n: round(float(w), 6) for n, w in zip(names, weights.tolist()) if w > 0}, ensure_ascii=False)
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of an export (a single file, or a diffusers folder's UNet weights)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = _unet_weights(path)
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _unet_weights(folder: Path) -> Path:
    files = sorted((folder / "unet").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}/unet has no .safetensors weights")
    return files[0]


# ---- writing ----------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_pipeline(pipe, out: str | os.PathLike, fmt: str = "single_file", dtype: str = "fp32", metadata: Mapping[str, str] | None = None) -> Path:
    """Write a plain (baked) pipeline as a diffusers folder or one original-layout .safetensors file
    (SD1.5 or SDXL), carrying `metadata` in the safetensors header. Written beside `out` and
    moved into place, so a failed export never leaves a half-written file under the final name."""
    from dmm_ray.formats.single_file import export_single_file, loaded_plugins

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(inner_unet(pipe.unet), StyleUNet):  # also a compiled one (`torch.compile(pipe.unet)`)
        raise ExportError("this pipeline still holds a StyleUNet; bake(pipe, style=...) first")
    problem = loaded_plugins(pipe)  # their layers' weights would be written under names no loader reads
    if problem:
        raise ExportError(f"cannot export: {problem}")
    out = Path(out)
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    metadata["dmm.dtype"] = dtype
    if _weight_dtypes(pipe) - {DTYPES[dtype]}:  # any module, not only the UNet: a VAE swapped in may differ
        pipe = _cast_copy(pipe, DTYPES[dtype])  # never cast the caller's (shared) modules in place
    if fmt not in ("diffusers", "single_file"):
        raise ExportError(f"format must be 'diffusers' or 'single_file', got {fmt!r}")
    if fmt == "diffusers":
        _recover_killed(out, EXPORT_RECORD)  # the previous export back first, should this one fail too
    check_replaceable(out, fmt)
    if fmt == "single_file":
        return export_single_file(pipe, out, metadata=metadata)  # written to `.<out>.export-<pid>.tmp`, removed if the write fails
    tag = f"export-{os.getpid()}"  # hidden siblings of this run: .<out>.export-<pid>.tmp / .old
    tmp, _ = save_siblings(out, tag)
    remove(tmp)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _rewrite_with_metadata(_unet_weights(tmp), metadata)
        (tmp / EXPORT_RECORD).write_text(json.dumps(metadata, indent=1))
        swap_in(tmp, out, tag)  # the earlier export set aside until the new one is in place, then dropped
    except BaseException:  # an error or Ctrl-C mid-write leaves no partial folder behind
        remove(tmp)
        raise
    return out


class VerifyFailed(Exception):
    """jobs/export.py --verify found the written export differing from the merged model (its names)."""


VERIFY_TAG = "verify"  # an export under check: `.<out>.verify-<pid>/<out's name>` beside --out


@contextlib.contextmanager
def verify_staging(out: Path) -> Iterator[Path]:
    """A new hidden folder beside `out` (`.<name>.verify-<pid>`) to write an export into and check it
    (jobs/export.py --verify) before `move_into_place` puts it at `out`, removed when the block ends; what a
    killed run left there is removed first."""
    from dmm_ray.output_lock import left_by_killed

    pattern = rf"\.{re.escape(out.name)}\.{VERIFY_TAG}-(\d+)"
    for stale in left_by_killed(out.parent, f".{glob.escape(out.name)}.{VERIFY_TAG}-*", pattern):
        remove(stale)
    staging = out.with_name(f".{out.name}.{VERIFY_TAG}-{os.getpid()}")
    remove(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        remove(staging)


def move_into_place(written: Path, out: Path) -> None:
    """A checked export (a .safetensors file or a diffusers folder, `verify_staging`) moved to `out`,
    replacing an earlier export there as `export_pipeline` does: in one rename for a file, set aside
    until the new folder is in place for a folder."""
    check_replaceable(out, "diffusers" if written.is_dir() else "single_file")  # still an earlier export, if anything
    if not written.is_dir():
        os.replace(written, out)
        return
    _recover_killed(out, EXPORT_RECORD)
    swap_in(written, out, f"export-{os.getpid()}")


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an earlier dmm-ray export (a single file or a diffusers folder it wrote). Not
    every file tagged `exported_by: dmm-ray` is one: the toy zoo's single-file teachers are too, and
    so is a diffusers export's own UNet weights file; only `export_pipeline` writes `dmm.dtype`."""
    path = Path(path)
    if path.is_dir():
        return (path / EXPORT_RECORD).is_file()
    if any((folder / EXPORT_RECORD).is_file() for folder in path.absolute().parents[:2]):  # <export>/unet/<weights>
        return False
    try:
        meta = read_metadata(path)
    except Exception:  # not a safetensors file at all
        return False
    return meta.get("exported_by") == "dmm-ray" and "dmm.dtype" in meta


def _recover_killed(dest: Path, marker: str) -> None:
    """An export of `dest` killed between its two renames (`swap_in`) left the previous one only as a
    hidden `.<dest>.export-<pid>.old`: put it back when `dest` is missing, and remove what killed
    exports left beside `dest` (their pid differs from this run's, so nothing else would)."""
    for line in recover_killed(dest, "export", marker):
        logging.getLogger(__name__).warning("%s", line)


def check_replaceable(out: Path, fmt: str) -> None:
    """An export replaces only an earlier export: never a merged model, a weighted merge, a teacher's
    checkpoint or any other file or folder that happens to be at `out`."""
    if not out.exists():
        return
    if fmt == "single_file" and out.is_dir():
        raise ExportError(f"{out} is a folder; a single-file export needs a file path such as {out / 'model.safetensors'}")
    if fmt == "diffusers" and not out.is_dir():
        raise ExportError(f"{out} is a file; a diffusers export needs a folder path")
    if not is_export(out):
        kind = "a diffusers folder" if (out / "model_index.json").is_file() else "a folder" if out.is_dir() else "a file"
        raise ExportError(
            f"{out} exists and is {kind} that is not an earlier dmm-ray export; refusing to replace it (choose a new path, or delete it first)"
        )


def _weight_dtypes(pipe) -> set[torch.dtype]:
    """The dtypes of every floating-point weight of `pipe`'s modules (UNet, VAE, text encoder(s), ...)."""
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    return {t.dtype for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()}


def _cast_copy(pipe, dtype: torch.dtype):
    """The same pipeline class over copies of its modules cast to `dtype`."""
    import copy
    import inspect

    parts = {k: (copy.deepcopy(v).to(dtype) if isinstance(v, torch.nn.Module) else v) for k, v in pipe.components.items()}
    params = inspect.signature(type(pipe).__init__).parameters
    if "requires_safety_checker" in params:
        parts["requires_safety_checker"] = False
    if "force_zeros_for_empty_prompt" in params:
        parts["force_zeros_for_empty_prompt"] = pipe.config.get("force_zeros_for_empty_prompt", True)
    return type(pipe)(**parts)


def _rewrite_with_metadata(file: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(file))
    save_file(state, str(file), metadata={"format": "pt", **metadata})


def write_config_folder(pipe, folder: str | os.PathLike) -> Path:
    """The configs (no weights) of a plain pipeline: what `from_single_file(path, config=folder)` reads.
    `folder` must be new or an earlier export's config folder (`check_config_replaceable`); it is
    written beside and moved into place (`staged_config_folder`)."""
    with staged_config_folder(pipe, folder):
        pass
    return Path(folder)


def is_export_config(path: str | os.PathLike) -> bool:
    """Whether `path` is a config folder an export wrote (it holds CONFIG_RECORD)."""
    try:
        return json.loads((Path(path) / CONFIG_RECORD).read_text()).get("exported_by") == "dmm-ray"
    except (OSError, ValueError, AttributeError):  # no record, unreadable, not JSON, not an object
        return False


def check_config_replaceable(folder: str | os.PathLike, setting: str = "config folder", hint: str = "choose a new path, or delete it first") -> None:
    """A config folder is written only where nothing is, or over an earlier export's config folder:
    never into a folder of the user's (a diffusers model, notes) nor over a file. `setting` names the
    path in the message (e.g. `--config-dir`), `hint` says what to do instead."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        kind = "a symbolic link" if folder.is_symlink() else "a file"
        raise ExportError(f"{setting} {folder} is {kind}, not a config folder an export wrote; refusing to replace it ({hint})")
    if not is_export_config(folder):
        raise ExportError(
            f"{setting} {folder} exists and is not an earlier export's config folder (it has no {CONFIG_RECORD}); refusing to write into it ({hint})"
        )


@contextlib.contextmanager
def staged_config_folder(pipe, folder: str | os.PathLike, export: str | None = None) -> Iterator[Path]:
    """Write a plain pipeline's config folder beside `folder` (`.<folder>.export-<pid>.tmp`, marked with
    CONFIG_RECORD naming `export`) and move it into place when the block ends without error,
    replacing an earlier export's config folder there. An error or Ctrl-C before that removes the
    staged copy (and any parent folder it created): `folder` stays as it was. Refuses, before writing,
    a `folder` that `check_config_replaceable` refuses."""
    import dmm_ray

    folder = Path(folder)
    _recover_killed(folder, CONFIG_RECORD)
    check_config_replaceable(folder)
    tag = f"export-{os.getpid()}"  # hidden siblings of this run: .<folder>.export-<pid>.tmp / .old
    tmp, _ = save_siblings(folder, tag)
    created = [p for p in folder.parents if not p.exists()]  # deepest first
    try:
        remove(tmp)
        tmp.mkdir(parents=True)
        _write_configs(pipe, tmp)
        record = {"exported_by": "dmm-ray", "dmm.version": dmm_ray.__version__, "export": export}
        (tmp / CONFIG_RECORD).write_text(json.dumps(record, indent=1))
        yield tmp
        check_config_replaceable(folder)  # still nothing of the user's there
        swap_in(tmp, folder, tag)  # the earlier export's set aside until the new one is in place, then dropped
    except BaseException:
        remove(tmp)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if empty
        raise


def _write_configs(pipe, folder: Path) -> None:
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        sub = folder / name
        if hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(sub)
        elif hasattr(component, "config") and hasattr(component.config, "save_pretrained"):  # transformers models
            sub.mkdir(parents=True, exist_ok=True)
            component.config.save_pretrained(sub)
        elif hasattr(component, "save_pretrained"):  # tokenizers, image processors
            component.save_pretrained(sub)


def export_command(
    model: str,
    style=None,
    style_weights: Mapping[str, float] | None = None,
    out: str | None = None,
    fmt: str = "single_file",
    names: Sequence[str] | None = None,
) -> str:
    """The exact `jobs/export.py` command line that bakes this style / mixture (the playground shows it).
    `names`: the model's style names, for a mixture of names that hold ',' or '=' or start or end with a
    space: those are given by index, and a shell comment after the command says which style each index is."""
    import shlex

    if (style is None) == (style_weights is None):
        raise StyleError("give exactly one of style= or style_weights=")
    comment = ""
    if style is not None:
        option, value, stem = "--style", str(style), str(style)
    else:
        weights = {k: float(v) for k, v in style_weights.items() if float(v) > 0}
        keys = {k: _weights_key(k, names) for k in weights}
        option, stem = "--weights", "-".join(weights)
        value = ",".join(f"{keys[k]}={_num(v)}" for k, v in weights.items())
        # JSON strings: a name's newline or quote stays inside the comment, never a shell line of its own
        by_index = [f"{key} = {json.dumps(k, ensure_ascii=False)}" for k, key in keys.items() if key != k]
        comment = f"  # by index: {', '.join(by_index)}" if by_index else ""
    selection = [f"{option}={value}"] if value.startswith("-") else [option, value]  # `-dark` is not read as an option
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in stem).lstrip("-") or "style"
    out = out or (f"{stem}.safetensors" if fmt == "single_file" else stem)
    args = ["python", "jobs/export.py", "--model", model, *selection, "--out", out, "--format", fmt]
    return " ".join(shlex.quote(a) for a in args) + comment


def _weights_key(name: str, names: Sequence[str] | None) -> str:
    """How --weights (`dmm_ray.styles.parse_weights`, then `style_weights`) names style `name`: the name
    itself when the pairs can hold it, else its index. ',' and '=' split the pairs and parse_weights strips
    the spaces around a name; and a digit string is read as a name first (a style named "0"), an index only
    when no style has that name, so the index is written with leading zeros ("00") until no style has it."""
    if name and "," not in name and "=" not in name and name == name.strip():
        return name
    if names is None or name not in names:
        raise StyleError(
            f"style {name!r} cannot be given by name in --weights (',' and '=' split the pairs, spaces around a name are dropped); pass names= to give it by index"
        )
    key = str(list(names).index(name))
    while key in names:
        key = "0" + key
    return key


def _num(v: float) -> str:
    return f"{v:.6g}"


# ---- checks before any work (jobs/export.py) --------------------------------------------------
def check_device(name: str) -> None:
    """A device torch knows and this build can use (ExportError naming --device otherwise)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ExportError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"--device {name}: this torch build sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ExportError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    usable = {"cpu": True, "cuda": True, "mps": torch.backends.mps.is_available(), "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}
    if device.type not in usable:
        raise ExportError(f"--device {name}: an export runs on cpu, cuda, mps or xpu, not {device.type}")
    if not usable[device.type]:
        raise ExportError(f"--device {name}: this torch build cannot use {device.type} here; use --device cpu")


def check_selection(names: list[str], style: str | None, weights: dict[str, float] | None) -> None:
    """--style / --weights against the model's style names (StyleError naming the known ones)."""
    from dmm_ray.styles import style_weights

    if style is not None:
        style_weights(names, style)
        return
    seen: dict[int, str] = {}
    for key in weights:
        index = style_weights(names, key).index(1.0)
        if index in seen:
            raise StyleError(f"--weights gives style {names[index]!r} twice ({seen[index]}= and {key}=: a name and its index); give each style once")
        seen[index] = key
    style_weights(names, weights)  # negative, all zero, not finite


def export_config_dir(out: Path, fmt: str, config_dir: str | None = None) -> Path | None:
    """The single-file export's config folder (`config_dir`, i.e. --config-dir; default `out` with the
    suffix .config; 'none': no folder, as for a diffusers export), refused (ExportError) before any
    work when it would overwrite something that is not an earlier export's config folder, or clash with `out`."""
    from dmm_ray.paths import check_writable_folder

    if fmt != "single_file" or (config_dir or "").lower() == "none":
        return None
    if config_dir:
        folder, setting = Path(config_dir).expanduser(), "--config-dir"
        hint = "give a new folder or an earlier export's config folder, --config-dir none to skip it, or delete it first"
    else:
        folder, setting = out.with_suffix(".config"), "the config folder"
        hint = "it is --config-dir's default, --out with the suffix .config: choose another with --config-dir DIR, skip it with --config-dir none, or delete it first"
    a, b = folder.absolute(), out.absolute()
    if a == b or a in b.parents or b in a.parents:
        raise ExportError(f"{setting} {folder} and --out {out} overlap; give the config folder a path of its own, beside --out")
    check_config_replaceable(folder, setting, hint)
    check_writable_folder(folder.parent, f"{setting}'s parent")
    return folder


# ---- verification -----------------------------------------------------------------------------
def verify(export: Path, fmt: str, config_dir: Path | None, merged, style, style_weights) -> dict[str, float]:
    """The export loaded back against the merged model, component by component: max relative difference
    of the UNet's output with the style (`unet_relative_error`), of the weights of the VAE and text
    encoder(s) (`weights_relative_error`: the single-file layout converts every one of them, and a
    conversion can go wrong as the UNet's can), and 0 / inf for the scheduler's class and config and the
    tokenizer(s)' ids of a test prompt (read from the config folder or the diffusers folder: the same, or not)."""
    from dmm_ray.architectures import base_pipeline_class

    if fmt == "diffusers":
        plain = base_pipeline_class(export).from_pretrained(str(export), local_files_only=True)
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from dmm_ray.formats.single_file import sdxl_text_encoder_2

        cls = StableDiffusionXLPipeline if getattr(merged, "text_encoder_2", None) is not None else StableDiffusionPipeline
        # loaded as jobs/export.py tells the user to: equally wide SDXL text encoders need the second one read apart
        second = sdxl_text_encoder_2(export, config_dir)
        extra = {} if second is None else {"text_encoder_2": second}
        plain = cls.from_single_file(str(export), config=str(config_dir), local_files_only=True, **extra)
    errors = {"unet": unet_relative_error(merged.unet, plain.unet, style, style_weights)}
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(merged, name, None) is not None:
            errors[name] = weights_relative_error(getattr(merged, name), getattr(plain, name, None))
    same = type(merged.scheduler) is type(plain.scheduler) and _public(merged.scheduler.config) == _public(plain.scheduler.config)
    errors["scheduler"] = 0.0 if same else math.inf
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(merged, name, None) is not None:
            theirs = getattr(plain, name, None)
            same = theirs is not None and all(merged_ids == theirs(text).input_ids for text, merged_ids in _token_ids(getattr(merged, name)))
            errors[name] = 0.0 if same else math.inf
    return errors


def _public(config: Mapping) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _token_ids(tokenizer) -> list[tuple[str, list[int]]]:
    texts = ["a red circle on a blue background", "", "A PHOTO, of 2 cats; ünïcödé"]
    return [(text, tokenizer(text).input_ids) for text in texts]


def weights_relative_error(reference: torch.nn.Module, other: torch.nn.Module | None) -> float:
    """max over `reference`'s tensors of max |a - b| / max |a| against the tensor of that name in `other`
    (float32); inf when `other` is missing, lacks one of them or holds it in another shape."""
    if other is None:
        return math.inf
    theirs = other.state_dict()
    worst = 0.0
    for key, a in reference.state_dict().items():
        b = theirs.get(key)
        if b is None or b.shape != a.shape:
            return math.inf
        a, b = a.float(), b.float().to(a.device)
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff / scale if scale else (math.inf if diff else 0.0))
    return worst


def unet_relative_error(style_unet, plain_unet, style=None, style_weights=None, batch: int = 2, seed: int = 0) -> float:
    """max |eps_style - eps_plain| / max |eps_style| on random latents, timesteps and text states (float32)."""
    g = torch.Generator().manual_seed(seed)
    cfg = style_unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    h = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": torch.rand(batch, 6, generator=g) * size * 8}
    w = style_vector(style_unet, style, style_weights)[None].repeat(batch, 1)
    with torch.no_grad():
        su, pu = style_unet.float(), plain_unet.float()
        a = su(x, t, h, style_weights=w, added_cond_kwargs=added).sample
        b = pu(x, t, h, added_cond_kwargs=added).sample
    return float((a - b).abs().max() / a.abs().max())

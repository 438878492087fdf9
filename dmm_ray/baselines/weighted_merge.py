"""Weighted-merge baseline (paper Fig. 8 / Table 3 "WM"): the parameter-space weighted sum of N
teacher checkpoints, what supermerger and diffusers' CheckpointMerger do.

theta_merged = sum_k w_k theta_k, w_k >= 0, sum_k w_k = 1, for every floating-point tensor of
the UNet (and by default the text encoder); the VAE, tokenizer and scheduler come from the first
teacher (teachers share the latent space — validate_teachers checks that).

On disk: the diffusers folder plus RECORD (weighted_merge.json: teachers, weights, the teachers'
checksums). `weighted_merge_teachers` saves it with two renames, like the merged model's save
(dmm_ray/merged_model.py): the new merge is written and checked in a hidden sibling folder
(`.<name>.weighted-merge.tmp`), the previous one parked as `.<name>.weighted-merge.old` while the
new one takes its name, then removed; a save that fails or leaves a component out raises and leaves
the previous folder as it was. `merge_mismatch` says whether a folder is the merge of given
teachers and weights (what jobs/style_mixing.py reuses).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

WEIGHT_TOLERANCE = 1e-6


RECORD = "weighted_merge.json"  # provenance beside the merged folder: what makes --out an earlier weighted merge


class MergeWeightsError(ValueError):
    pass


class MergeMismatchError(ValueError):
    """A weighted merge given for some teachers and weights holds another mix (see `merge_mismatch`)."""


class MergeSaveError(OSError):
    """The merged pipeline was not saved completely; the previous folder (if any) is untouched."""


def validate_weights(weights: Sequence[float] | None, names: Sequence[str]) -> list[float]:
    """Weights for `names` (None: equal). Non-negative, finite, one per model, summing to 1."""
    n = len(names)
    if n == 0:
        raise MergeWeightsError("nothing to merge: no models given")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeWeightsError(f"got {len(w)} weights for {n} models ({', '.join(names)}); give one weight per model")
    bad = {name: x for name, x in zip(names, w) if not math.isfinite(x) or x < 0}
    if bad:
        raise MergeWeightsError(f"merge weights must be finite and >= 0; bad: {bad}")
    total = sum(w)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise MergeWeightsError(
            f"merge weights must sum to 1, got {total:.6g} for {dict(zip(names, w))}; e.g. normalise them: {[round(x / total, 6) for x in w] if total > 0 else 'use equal weights'}"
        )
    return w


def _fuse_adapters(module: nn.Module, name: str) -> nn.Module:
    """LoRA teachers: fold the adapter into the base weights so keys match a plain checkpoint."""
    if any("lora_" in k for k in module.state_dict()):
        if hasattr(module, "fuse_lora") and hasattr(module, "unload_lora"):
            module.fuse_lora()
            module.unload_lora()
        else:
            try:
                module = module.merge_and_unload()  # peft-wrapped text encoder
            except AttributeError as e:
                raise ValueError(f"teacher '{name}': has LoRA adapter weights that cannot be fused for merging") from e
    return module


def weighted_merge_state_dicts(state_dicts: Sequence[dict], weights: Sequence[float], names: Sequence[str]) -> dict:
    """Weighted sum of matching state dicts; float tensors accumulate in float64, then cast back."""
    keys = list(state_dicts[0])
    for name, sd in zip(names[1:], state_dicts[1:]):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise ValueError(f"'{name}' has different parameters from '{names[0]}' (e.g. {diff}); weighted merge needs one architecture")
    merged = {}
    for k in tqdm(keys, desc="weighted merge", leave=False, disable=len(keys) < 200):
        ref = state_dicts[0][k]
        for name, sd in zip(names[1:], state_dicts[1:]):
            if sd[k].shape != ref.shape:
                raise ValueError(f"'{k}' has shape {tuple(sd[k].shape)} in '{name}' but {tuple(ref.shape)} in '{names[0]}'")
        if not torch.is_floating_point(ref):
            merged[k] = ref.clone()  # integer buffers (e.g. position ids) are not averaged
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for w, sd in zip(weights, state_dicts):
            acc += w * sd[k].detach().to("cpu", torch.float64)
        merged[k] = acc.to(ref.dtype)
    return merged


def weighted_merge_modules(modules: Sequence[nn.Module], weights: Sequence[float] | None, names: Sequence[str] | None = None) -> nn.Module:
    """A copy of modules[0] holding the weighted sum of all modules' parameters."""
    names = list(names) if names is not None else [f"model_{k}" for k in range(len(modules))]
    w = validate_weights(weights, names)
    modules = [_fuse_adapters(m, n) for m, n in zip(modules, names)]
    merged = weighted_merge_state_dicts([m.state_dict() for m in modules], w, names)
    out = copy.deepcopy(modules[0])
    out.load_state_dict(merged)
    return out.eval()


def weighted_merge_pipelines(pipes: Sequence[Any], weights: Sequence[float] | None, names: Sequence[str], merge_text_encoder: bool = True):
    """StableDiffusion(XL)Pipeline whose UNet (and text encoder(s)) is the weighted sum of `pipes`'."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    def merged(part: str):
        modules = [getattr(p, part) for p in pipes]
        return weighted_merge_modules(modules, weights, names) if merge_text_encoder else modules[0]

    first = pipes[0]
    unet = weighted_merge_modules([p.unet for p in pipes], weights, names)
    if getattr(first, "text_encoder_2", None) is not None:  # SDXL: both text encoders, both tokenizers
        return StableDiffusionXLPipeline(
            vae=first.vae,
            text_encoder=merged("text_encoder"),
            text_encoder_2=merged("text_encoder_2"),
            tokenizer=first.tokenizer,
            tokenizer_2=first.tokenizer_2,
            unet=unet,
            scheduler=first.scheduler,
        )
    return StableDiffusionPipeline(
        vae=first.vae,
        text_encoder=merged("text_encoder"),
        tokenizer=first.tokenizer,
        unet=unet,
        scheduler=first.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def check_output(output_dir: str | Path, setting: str = "output_dir") -> None:
    """Where a weighted merge may be saved: a new or empty folder, or an earlier weighted merge (it is
    replaced); never a merged model or anything else (save_pretrained would write into it)."""
    from dmm_ray.data.fs import require_local
    from dmm_ray.paths import OutputPathError, check_writable_folder

    require_local(setting, output_dir)  # check_writable_folder leaves a URI to its store: Path(uri) was a local folder `s3:`
    check_writable_folder(output_dir, setting)
    folder = Path(output_dir).expanduser()
    if folder.is_dir() and any(folder.iterdir()) and not (folder / RECORD).is_file():
        raise OutputPathError(f"{setting} {folder} holds other files and is not an earlier weighted merge (no {RECORD}); give a new or empty folder")


def read_record(folder: str | Path) -> dict | None:
    """A weighted merge's RECORD (None: the folder has none; {}: it is not a JSON object)."""
    path = Path(folder).expanduser() / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _mix(names: Sequence[str], weights: Sequence[float]) -> str:
    return "{" + ", ".join(f"{n}: {w:.6g}" for n, w in zip(names, weights)) + "}"


def merge_mismatch(folder: str | Path, specs: Sequence[Any], weights: Sequence[float] | None = None, merge_text_encoder: bool = True) -> str | None:
    """Why `folder` is not a complete weighted merge of the TeacherSpecs `specs` at `weights` (None:
    equal), as a phrase for an error message; None when it is one. Compared: its RECORD's teachers
    and weights (as a mix, in any order), the teachers' checksums (their files changed since), and
    that every component of the pipeline is there (`teachers.check_pipeline_folder`)."""
    from dmm_ray.teachers import TeacherError, check_pipeline_folder, teacher_checksum

    folder = Path(folder).expanduser()
    names = [s.name for s in specs]
    want = dict(zip(names, validate_weights(weights, names)))
    record = read_record(folder)
    if record is None:
        return f"it has no {RECORD}, so which teachers it merges is unknown (jobs/weighted_merge.py writes one)"
    held_names, held_weights = record.get("teachers"), record.get("weights")
    try:
        held = dict(zip(held_names, (float(w) for w in held_weights), strict=True))
    except (TypeError, ValueError):
        return f"its {RECORD} does not list teachers and weights"
    if set(held) != set(want) or any(abs(held[n] - want[n]) > WEIGHT_TOLERANCE for n in want):
        return f"it merges {_mix(list(held), list(held.values()))}, not {_mix(names, list(want.values()))}"
    if record.get("merge_text_encoder", True) != merge_text_encoder:  # (records from before the flag: text encoders merged)
        return "it merges the UNets only (--no-text-encoder)" if merge_text_encoder else "it merges the text encoders too"
    sums = record.get("checksums")
    if isinstance(sums, list) and len(sums) == len(held_names):
        from dmm_ray.fingerprint import recorded_by_an_earlier_rule

        recorded = dict(zip(held_names, sums))

        def changed_since(spec) -> bool:  # a record an earlier dmm-ray wrote holds its checksum rule's
            return recorded[spec.name] != teacher_checksum(spec) and not recorded_by_an_earlier_rule(
                recorded[spec.name], lambda rule: teacher_checksum(spec, rule=rule)
            )

        changed = [s.name for s in specs if changed_since(s)]
        if changed:
            return f"teacher(s) {changed} changed since it was built (their files' checksums differ from its {RECORD})"
    try:
        check_pipeline_folder(folder, "weighted merge")
    except TeacherError as error:
        return f"it is incomplete ({error})"
    return None


def plan_group_merge(group_specs: Sequence[Any], out: str, explicit: str | None = None) -> tuple[Path, str | None]:
    """jobs/style_mixing.py's Table 3 baseline: (folder, why it is built) of the weighted merge of
    `group_specs` at equal weights, decided before any model is loaded; why is None when the folder
    already holds that merge (reused). `explicit` (--weighted-merge) of another mix, or one without a
    record, is refused (it is not ours to replace); the default `out`/weighted_merge is rebuilt when
    it holds another mix or is incomplete."""
    from dmm_ray.paths import OutputPathError, expand

    group = ",".join(s.name for s in group_specs)
    if explicit:
        folder = Path(expand(explicit))
        if folder.exists() and not folder.is_dir():
            raise OutputPathError(
                f"--weighted-merge {folder} is a file, not a folder; give the folder of the group's weighted merge "
                "(jobs/weighted_merge.py --out) or a new folder to build it in"
            )
        if (folder / "model_index.json").is_file():
            why = merge_mismatch(folder, group_specs)
            if why:
                raise MergeMismatchError(
                    f"--weighted-merge {folder} is not the weighted merge of --group {group} at equal weights: {why}; "
                    f"give that group's weighted merge (jobs/weighted_merge.py --names {group} --out DIR), or a new folder to build it in"
                )
            return folder, None
        check_output(folder, "--weighted-merge")
        return folder, "--weighted-merge has no model yet"
    folder = Path(expand(out)) / "weighted_merge"
    why = merge_mismatch(folder, group_specs) if (folder / "model_index.json").is_file() else "none there yet"
    if why and folder.is_dir() and any(folder.iterdir()) and read_record(folder) is None:
        raise OutputPathError(
            f"--out {out}: {folder} holds files but no {RECORD}, so it is not a weighted merge this job may reuse or replace; "
            "move it away, or give another --out (or --weighted-merge DIR)"
        )
    if why:
        check_output(folder, "--out's weighted_merge folder")  # an earlier weighted merge is replaced
    return folder, why


SAVE_TAG = "weighted-merge"  # the save's hidden siblings: .<name>.weighted-merge.tmp / .old (dmm_ray.merged_model)


def save_atomically(pipe: Any, dest: str | Path, record: dict) -> Path:
    """`pipe.save_pretrained` into a hidden sibling of `dest`, checked complete (every component
    model_index.json lists, with its weights: diffusers only logs some save failures), RECORD written
    last; then swapped in with two renames. On any failure the sibling is removed and `dest` is left
    as it was (MergeSaveError when a component is missing)."""
    from dmm_ray.merged_model import recover, remove, save_siblings, swap_in
    from dmm_ray.teachers import TeacherError, check_pipeline_folder

    dest = Path(dest).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest, SAVE_TAG, marker=RECORD)  # a save killed between its renames: the previous merge back first
    tmp, _ = save_siblings(dest, SAVE_TAG)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            check_pipeline_folder(tmp, "the new weighted merge")
        except TeacherError as error:
            raise MergeSaveError(f"saving the weighted merge failed: {error}; {dest} was left as it was") from None
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
    except BaseException:
        remove(tmp)
        raise
    swap_in(tmp, dest, SAVE_TAG)
    return dest


def weighted_merge_teachers(
    specs: Sequence[Any], weights: Sequence[float] | None, output_dir: str | Path, merge_text_encoder: bool = True, setting: str = "output_dir"
) -> Path:
    """Load TeacherSpecs, merge them, save a diffusers folder (+ weighted_merge.json provenance) with
    `save_atomically`: the folder holds the previous merge until the new one is complete. One weighted
    merge per folder at a time: a hidden lock beside it (dmm_ray/output_lock.py), taken before any
    teacher is loaded; a second one refuses (the two would share the save's hidden siblings)."""
    from dmm_ray import output_lock
    from dmm_ray.teachers import load_teacher_pipeline, teacher_checksum

    names = [s.name for s in specs]
    w = validate_weights(weights, names)  # fail before loading anything
    check_output(output_dir, setting)
    dest = Path(output_dir).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = f".{dest.name}.{SAVE_TAG}.lock"
    with output_lock.hold(dest.parent, name=lock, job="weighted merge", what=f"{setting} {dest}", fix=f"another {setting}"):
        pipes = [load_teacher_pipeline(s) for s in tqdm(specs, desc="loading teachers")]
        merged = weighted_merge_pipelines(pipes, w, names, merge_text_encoder)
        record = {"teachers": names, "weights": w, "checksums": [teacher_checksum(s) for s in specs], "merge_text_encoder": merge_text_encoder}
        return save_atomically(merged, dest, record)

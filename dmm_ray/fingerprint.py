"""What determines each merge stage's result, recorded beside the stage's state in `output_dir`.

A re-run with the same `output_dir` resumes a stage (Ray Train restores its last checkpoint, finished
synthesized sets are kept) only when the stage's inputs are what they were when that state was made.
Otherwise the merge stops before Ray starts, naming what changed and the two ways out.

Inputs per stage (flat dotted keys -> JSON values; `stage_inputs`):
  synthesize  teachers (order, sources, content checksums), synthesis settings, prompts (file and content), seed, an
              incremental merge's previous model (path, UNet checksum)
  distill     teachers, student base (checksums: UNet, text encoder(s) and tokenizer(s)) and options,
              distill settings, data stream (+ its noise schedule and tokenizer: data.base, data.tokenizer), latent shards,
              worker layout, incremental settings (the previous model's UNet checksum too), seed (+ the
              synthesized set's inputs when it is mixed in)
  finetune    the distill inputs + the fine-tune settings + the synthesized set's inputs
  fast        (the few-step stage, in its own output folder) the merged model (path, UNet checksum), the
              fast training settings, the data stream (+ its tokenizer: data.tokenizer) and shards, the
              synthesized rows' source, seed
Settings that change how, not what, is computed (checkpoint/log cadence, actors, CPUs, MLflow, the
few-step model's saved sampler and evaluation) are left out.

`out` is the merge's state location: a local folder (Path) or, for an `output_dir` URI, that URI
(a string; read and written through pyarrow, dmm_ray/data/fs.py).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

RECORD = "fingerprints.json"
STAGES = ("synthesize", "distill", "finetune")
# beside the stages' records: an id drawn when a stage first records its inputs in a folder without one, kept
# while their state resumes and discarded with it (--restart): which training the state there belongs to. The
# merged model saved from it records it (dmm_ray.merged_model.TRAINED_BY); the same config alone cannot tell a model
# of this training from one of before a --restart (teachers re-made in place, or a draw that differs)
TRAINING_RUN = "training_run"
# the few-step stage's own (dmm_ray.fast.job: its model records it too): its folder may be the merge's output_dir,
# whose TRAINING_RUN is the merge's, and each --restart discards only its own
FAST_TRAINING_RUN = "fast_training_run"
# how, not what: never part of a fingerprint
_DISTILL_IGNORED = {"checkpoint_every", "log_every", "fail_at_step", "bf16", "gradient_checkpointing"}
# what-settings added later: left out at their default, so a run recorded before them still resumes
_DISTILL_OMITTED_AT = {"teacher_dtype": "float32", "optimizer": "adamw"}
_SYNTHESIS_KEYS = ("images_per_teacher", "prompts", "num_inference_steps", "guidance_scale", "negative_prompt", "resolution", "batch_size")
_FINETUNE_KEYS = ("finetune_steps", "finetune_batch_size", "finetune_lr", "finetune_continue")
# the few-step stage: how, or what the save and the evaluation do with the trained weights
_FAST_IGNORED = {"enabled", "checkpoint_every", "log_every", "output_dir", "sampler", "num_inference_steps", "guidance_scale", "eval_steps"}
FAST_STAGE = "fast"
# the previous merged model's weights as the stages record them (and as their synthesized.* copies)
PREVIOUS_MODEL_CHECKSUM = "incremental.base_merged.checksum"
# inputs recorded since a later version: a record made before them lacks the key and still resumes
# (compared from the next record on); the merge's stages record theirs in every run (None when there
# is nothing to read), the few-step stage its own when they apply
_ADDED_LATER = {
    PREVIOUS_MODEL_CHECKSUM,
    "student.base.conditioning.checksum",
    "data.scheduler.checksum",
    "data.tokenizer.checksum",  # the merge's stages', and since later still the few-step stage's
    "merged_images_per_style",  # the few-step stage's resolved inputs (fast_inputs)
    "fast.rollout_step_counts",
    "synthesis.prompts.checksum",
}


class StaleStateError(ValueError):
    """`output_dir` holds state made with other settings."""


# (what, files_checksum rule) -> checksum: the files hashed so far by check_resume, or within `hashing_once` by the
# whole run of a merge. A run compares its completion record up to ~9 times (dmm_ray.merge._merge_request: every
# teacher's checksum) and each stage's record with state, and hashed every teacher each time
_HASHED: ContextVar[dict | None] = ContextVar("dmm_ray_fingerprint_hashed", default=None)


@contextmanager
def hashing_once():
    """Within it (run_merge, a merge's --dry-run), each teacher (and an incremental merge's previous model, as the
    completion record takes it) is hashed once per files_checksum rule, by every record compared or written: its
    checksum as the run first read it. The merge writes neither, so nothing it hashed changes under it; the next
    run hashes them again (a teacher re-made in place between two runs is seen). Nested: the outer one's memo."""
    token = _HASHED.set(_run_hashed())
    try:
        yield
    finally:
        _HASHED.reset(token)


def _run_hashed() -> dict:
    """The memo of the `hashing_once` around this call; a new, empty one outside any."""
    hashed = _HASHED.get()
    return {} if hashed is None else hashed


def _teacher_key(spec) -> tuple:
    """A teacher's key in a memo of checksums: what teacher_checksum hashes and salts (not its name alone: a run may
    compare two configs, as read and as given)."""
    return ("teacher", spec.name, str(spec.source), spec.base and str(spec.base), spec.format, spec.lora_scale)


def _memo(hashed: dict, key, rule: str, checksum_by):
    if (key, rule) not in hashed:
        hashed[key, rule] = checksum_by(rule)
    return hashed[key, rule]


def teacher_checksums(cfg, hashed: dict | None = None) -> dict[str, str]:
    """{teacher name: teacher_checksum} of the config's teachers, by the current rule, each hashed once in `hashed`
    (default: the run's, hashing_once): as the stages' records hold them and the merge's completion record does.
    None for a teacher whose files are not there (nothing to read, as _checksum): a merge refuses it before it
    compares a record (validate_before_ray), a reader of a finished merge's record (benchmarks/fidelity_curve.py)
    need not have it."""
    from dmm_ray.teachers import teacher_checksum

    hashed = _run_hashed() if hashed is None else hashed
    return {
        t.name: _memo(hashed, _teacher_key(t), "content", lambda rule, t=t: teacher_checksum(t, rule=rule))
        if _present(t.source) and (not t.base or _present(t.base))
        else None
        for t in cfg.teachers
    }


def _teachers(cfg, hashed: dict | None = None) -> list[dict]:
    checksums = teacher_checksums(cfg, hashed)
    return [
        {
            "name": t.name,
            "format": t.resolved_format(),
            "source": str(t.source),
            "base": t.base and str(t.base),
            "lora_scale": t.lora_scale,
            "checksum": checksums[t.name],
        }
        for t in cfg.teachers
    ]


def _shards(cfg) -> dict:
    """Where the latent shards are and [shard index, rows] of each (what the stream will read)."""
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.shards import read_marker, set_shard_indices

    try:
        fs, root = fsu.resolve(cfg.data.shards)
        rows = [[i, (read_marker(fs, root, i) or {}).get("rows")] for i in set_shard_indices(fs, root)[0]]
    except (FileNotFoundError, OSError):
        rows = []
    return {"path": str(cfg.data.shards), "rows": rows}


def _prompts_checksum(path: str | None) -> str | None:
    """sha256 of the prompts synthesis reads from `path` (synthesis.prompts): its path alone would resume
    a set sampled from a prompt file edited since. None when unset or gone (nothing left to sample)."""
    if not path:
        return None
    import hashlib

    from dmm_ray.data.readers import read_prompts

    try:
        prompts = read_prompts(path)
    except FileNotFoundError:
        return None
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def prompts_inputs(cfg) -> dict:
    """What synthesis reads its prompts from (dmm_ray.distill.synthesis.synthesis_prompts): the prompt
    file, by path and content, else the latent shards' captions, by path and rows per shard."""
    if cfg.synthesis.prompts:
        return {"path": str(cfg.synthesis.prompts), "checksum": _prompts_checksum(cfg.synthesis.prompts)}
    return {"data.shards": _shards(cfg)}


def _unet_of(base: str) -> list[Path]:
    """A model folder's UNet (the folder itself when it has no unet/)."""
    unet = Path(base) / "unet"
    return [unet if unet.exists() else Path(base)]


def _present(*folders) -> list[Path]:
    """The local folders among `folders` that exist."""
    return [Path(f) for f in folders if f and Path(f).exists()]


_CONDITIONING = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_BASE_PARTS = (*_CONDITIONING, "vae", "scheduler")
# the files each checksum of a record other than the teachers' hashes (files_checksum of them; None when there
# are none), from the config and the few-step stage's merged model: one home for what stage_inputs / fast_inputs
# record and for comparing a checksum that an earlier files_checksum rule recorded (_by_the_recorded_rule)
_CHECKSUMMED = {
    "student.base.checksum": lambda cfg, model: _unet_of(cfg.student.base),
    # the student's conditioning: the base's text encoder(s) and tokenizer(s) (distill/conditioning.py)
    "student.base.conditioning.checksum": lambda cfg, model: _present(*(Path(cfg.student.base) / n for n in _CONDITIONING)),
    # what the workers read from data.base: the noise schedule (None: SD1.5's) and the stream's tokenizer
    "data.scheduler.checksum": lambda cfg, model: _present(cfg.data.scheduler_path()),
    "data.tokenizer.checksum": lambda cfg, model: _present(cfg.data.tokenizer_path()),
    # the previous merged model's weights (re-made in place, its path alone would resume stale state)
    PREVIOUS_MODEL_CHECKSUM: lambda cfg, model: _unet_of(cfg.incremental.base_merged) if _present(cfg.incremental.base_merged) else [],
    "model.unet.checksum": lambda cfg, model: [Path(model) / "unet"],  # the few-step stage's merged model
}


def _checksum(key: str, cfg, model=None, rule: str = "content") -> str | None:
    """The checksum `key` (_CHECKSUMMED) records, by files_checksum's `rule`."""
    from dmm_ray.teachers import files_checksum

    files = _CHECKSUMMED[key](cfg, model)
    return files_checksum(files, rule=rule) if files else None


def previous_model_checksum(cfg) -> str | None:
    """The checksum of an incremental merge's previous model (incremental.base_merged: its UNet) as the stages
    record it (PREVIOUS_MODEL_CHECKSUM), and the merge's completion record (dmm_ray.merge._merge_request); None
    without one, or when its folder is not there (nothing to read). Hashed once within hashing_once: the record
    takes it only where the merge does not replace that model (not into its own output_dir)."""
    key = (PREVIOUS_MODEL_CHECKSUM, cfg.incremental.base_merged)
    return _memo(_run_hashed(), key, "content", lambda rule: _checksum(PREVIOUS_MODEL_CHECKSUM, cfg, rule=rule))


def merged_unet_checksum(cfg, model_dir) -> str | None:
    """The few-step stage's merged model's UNet checksum as fast_inputs records it (model.unet.checksum): its save compares
    it with the one its training read (dmm_ray.fast.job.check_trained_from)."""
    return _checksum("model.unet.checksum", cfg, model_dir)


def base_parts_checksum(base: str, rule: str = "content") -> str | None:
    """`files_checksum` of the parts of a student base that a merged model is saved with around its
    student UNet (text encoder(s), tokenizer(s), VAE, scheduler): recorded in the model's dmm_merge.json,
    so an incremental merge on another base is refused (dmm_ray.merge.check_student_base). `rule`: an
    earlier files_checksum rule, to compare a checksum recorded by it (recorded_by_an_earlier_rule)."""
    from dmm_ray.teachers import files_checksum

    parts = _present(*(Path(base) / n for n in _BASE_PARTS))
    return files_checksum(parts, rule=rule) if parts else None


def stage_inputs(cfg, stage: str, hashed: dict | None = None) -> dict[str, Any]:
    """Everything that determines `stage`'s result, as flat dotted keys. `hashed`: the memo of the teachers'
    checksums (teacher_checksums)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages with state: {STAGES}")
    s = cfg.synthesis
    synthesize = {
        "teachers": _teachers(cfg, hashed),
        "seed": cfg.seed,
        **{f"synthesis.{k}": getattr(s, k) for k in _SYNTHESIS_KEYS},
        "synthesis.prompts.checksum": _prompts_checksum(s.prompts),
        "data.encode.resolution": cfg.data.encode.resolution,
        "incremental.base_merged": cfg.incremental.base_merged,
        # the previous merged model's weights (re-made in place, its path alone would resume stale state)
        PREVIOUS_MODEL_CHECKSUM: _checksum(PREVIOUS_MODEL_CHECKSUM, cfg),
    }
    if cfg.old_style_samples:  # the previous model samples its old styles too (added later: left out when off)
        synthesize["incremental.old_style_samples"] = True
    if not s.prompts:  # prompts come from the latent shards' captions
        synthesize["data.shards"] = _shards(cfg)
    if stage == "synthesize":
        return synthesize
    distill = {
        "teachers": synthesize["teachers"],
        "seed": cfg.seed,
        "student.base.checksum": _checksum("student.base.checksum", cfg),
        "student.base.conditioning.checksum": _checksum("student.base.conditioning.checksum", cfg),
        **{f"student.{k}": v for k, v in cfg.student.model_dump(mode="json").items() if k != "base"},
        **{
            f"distill.{k}": v
            for k, v in cfg.distill.model_dump(mode="json").items()
            if k not in _DISTILL_IGNORED and _DISTILL_OMITTED_AT.get(k, object()) != v
        },
        **{f"data.stream.{k}": v for k, v in cfg.data.stream.model_dump(mode="json").items() if k != "prefetch_batches"},
        "data.scheduler.checksum": _checksum("data.scheduler.checksum", cfg),
        "data.tokenizer.checksum": _checksum("data.tokenizer.checksum", cfg),
        "data.synthetic_fraction": cfg.data.synthetic_fraction,
        "data.shards": _shards(cfg),
        "scaling.teachers_per_worker": cfg.scaling.teachers_per_worker,
        "scaling.workers_per_teacher": cfg.workers_per_teacher,
        "workers": cfg.num_workers,
        **{f"incremental.{k}": v for k, v in cfg.incremental.model_dump(mode="json").items() if k != "old_style_samples"},
        PREVIOUS_MODEL_CHECKSUM: synthesize[PREVIOUS_MODEL_CHECKSUM],
        **({"incremental.old_style_samples": True} if cfg.old_style_samples else {}),  # resolved; left out when off
    }
    if cfg.data.synthetic_fraction > 0:
        distill.update({f"synthesized.{k}": v for k, v in synthesize.items() if k != "teachers"})
    if stage == "distill":
        return distill
    return {
        **distill,
        **{f"synthesized.{k}": v for k, v in synthesize.items() if k != "teachers"},
        **{f"synthesis.{k}": getattr(s, k) for k in _FINETUNE_KEYS},
    }


def fast_inputs(cfg, model_dir, model_checksum: bool = True) -> dict[str, Any]:
    """Everything that determines the few-step stage's training state (`fast`), as flat dotted keys.
    `model_checksum=False`: the merged model's UNet is not read (a merge's model not saved yet), None."""
    f = cfg.fast
    inputs = {
        "model": str(model_dir),
        "model.unet.checksum": merged_unet_checksum(cfg, model_dir) if model_checksum else None,
        "seed": cfg.seed,
        **{f"fast.{k}": v for k, v in f.model_dump(mode="json").items() if k not in _FAST_IGNORED},
        **{f"data.stream.{k}": v for k, v in cfg.data.stream.model_dump(mode="json").items() if k != "prefetch_batches"},
        # the stream's token ids (build_latent_dataset tokenizes the captions with data.tokenizer), as the
        # merge's stages record it; in _ADDED_LATER, so a record made before it still resumes
        "data.tokenizer.checksum": _checksum("data.tokenizer.checksum", cfg),
        "data.shards": _shards(cfg),
    }
    if f.samples_merged_model:  # the merged model's own samples: how they are drawn, and how many per style
        inputs.update({f"synthesis.{k}": getattr(cfg.synthesis, k) for k in _SYNTHESIS_KEYS if k != "images_per_teacher"})
        inputs["synthesis.prompts.checksum"] = _prompts_checksum(cfg.synthesis.prompts)
        inputs["merged_images_per_style"] = cfg.merged_images_per_style
    if f.rollout_steps:  # the sampler step counts the rollout steps train (by default fast.num_inference_steps)
        inputs["fast.rollout_step_counts"] = f.rollout_step_counts
    return inputs


def same_request(recorded: dict, asked: dict, cfg=None) -> bool:
    """A finished few-step stage's completion record (dmm_ray/completion.py, its request with its
    `fast_inputs` under "inputs") against this request: equal, but for inputs that an older dmm-ray
    did not record yet (_ADDED_LATER), as a resume compares them; otherwise each key added to
    fast_inputs would make every few-step model finished before it save, evaluate and register again.
    `cfg` (the request's config): a checksum an earlier files_checksum rule recorded is compared by it too
    (_by_the_recorded_rule), as a resume compares it."""
    rest = lambda request: {k: v for k, v in request.items() if k != "inputs"}  # noqa: E731
    was, now = recorded.get("inputs") or {}, asked.get("inputs") or {}
    if cfg is not None:
        now = _by_the_recorded_rule(cfg, was, now, model=now.get("model"))
    return in_its_folder(_as_asked_before_the_plan(rest(recorded), asked)) == in_its_folder(rest(asked)) and not _differences(was, now)


def in_its_folder(request: dict) -> dict:
    """The request without fast.output_dir and fast.enabled. The completion record is read from fast.output_dir, so
    that is the same folder by construction, however it was given; fast.enabled only says whether a merge runs the
    stage (jobs/fast.py runs it either way). A merge's few-step stage recorded both (fast_folder filled in, enabled),
    while jobs/fast.py run on that merge's model with its config left them unset: the job trained, saved and
    registered the stage's few-step model again. The few-step model's SAVED_BY is hashed without them too
    (dmm_ray.fast.job.saved_model_request)."""
    config = request.get("config")
    fast = config.get("fast") if isinstance(config, dict) else None
    if not isinstance(fast, dict):
        return request
    return {**request, "config": {**config, "fast": {k: v for k, v in fast.items() if k not in ("output_dir", "enabled")}}}


def _as_asked_before_the_plan(recorded: dict, asked: dict) -> dict:
    """A merge's few-step stage recorded its config with the cluster plan's scaling.cpus_per_worker (`auto` resolved to
    a number) until its records took the config as given: such a record reads as `auto` where this request asks
    `auto`, so a stage finished before does not train, save and register again once."""
    was = (recorded.get("config") or {}).get("scaling") or {}
    if (asked.get("config") or {}).get("scaling", {}).get("cpus_per_worker") != "auto" or was.get("cpus_per_worker") in (None, "auto"):
        return recorded
    return {**recorded, "config": {**recorded["config"], "scaling": {**was, "cpus_per_worker": "auto"}}}


def fast_state_path(cfg, out: Path) -> Path:
    """The few-step stage's Ray Train state in its output folder (dmm_ray.fast.job.build_fast_trainer)."""
    return Path(out) / "ray_results" / f"{cfg.name}-fast"


def check_fast_resume(cfg, model_dir, out: Path, inputs: dict | None = None, before_merge: bool = False) -> None:
    """Refuse (StaleStateError) when the few-step stage's folder holds training state made from
    another model or with other settings; the same inputs resume it. `inputs`: fast_inputs(cfg,
    model_dir) when the caller has them already. `before_merge`: a merge's check before it starts, whose
    merged model (`model_dir`) is not saved yet: every input but those the merge decides (`_before_merge`),
    which the stage compares when it starts; state refused then would have cost the whole merge first."""
    state = fast_state_path(cfg, out)
    if not _has_state(state):
        return
    recorded = _read(Path(out)).get(FAST_STAGE)
    if recorded is None:
        problem = f"{state} exists but records no settings (made by an older run?)"
    else:
        now = json.loads(json.dumps(inputs or fast_inputs(cfg, model_dir, model_checksum=not before_merge)))
        now = _by_the_recorded_rule(cfg, recorded, now, model=model_dir)
        if before_merge:
            recorded, now = _before_merge(recorded), _before_merge(now)
        diff = _differences(recorded, now)
        if not diff:
            return
        problem = "; ".join(diff[:8]) + (f"; ... {len(diff) - 8} more" if len(diff) > 8 else "")
    raise StaleStateError(
        f"{out} holds the training state of a few-step run from another model or with other settings, which a re-run "
        f"would resume:\n  fast ({state}): {problem}\nEither write this run elsewhere (jobs/fast.py --output-dir NEW_DIR, "
        "or fast.output_dir), or discard the old state (jobs/fast.py --restart, jobs/merge.py --restart in a merge; "
        "the last few-step model stays until the new one replaces it)."
    )


def _before_merge(inputs: dict) -> dict:
    """The few-step inputs a merge knows before it runs: not its merged model's UNet checksum (its save makes
    the model) nor the latent shards' rows (its encode may write them), only their folder."""
    kept = {k: v for k, v in inputs.items() if k not in ("model.unet.checksum", "data.shards")}
    return {**kept, "data.shards.path": (inputs.get("data.shards") or {}).get("path")}


def fast_state_of_a_replaced_model(cfg, out: Path, inputs: dict) -> str | None:
    """The merged model's UNet checksum recorded with the few-step training state in `out`, when that state
    differs from `inputs` (fast_inputs) only in what a merge decides (`_before_merge`: the model's checksum, the
    shards' rows): state made from an earlier model at the same path, which a merge that saved its model there
    has replaced. None when there is no such state (none, the same inputs, or other settings)."""
    if not _has_state(fast_state_path(cfg, out)):
        return None
    recorded = _read(Path(out)).get(FAST_STAGE)
    now = json.loads(json.dumps(inputs))
    if recorded is None or not _differences(recorded, now) or _differences(_before_merge(recorded), _before_merge(now)):
        return None
    return recorded.get("model.unet.checksum") or "(not recorded)"


def record_fast(cfg, model_dir, out: Path, inputs: dict | None = None) -> None:
    """Record the few-step stage's inputs when its training starts, and the folder's FAST_TRAINING_RUN when it
    has none yet."""
    recorded = _read(Path(out))
    recorded[FAST_STAGE] = json.loads(json.dumps(inputs or fast_inputs(cfg, model_dir)))
    _draw_training_run(recorded, FAST_TRAINING_RUN)
    _write_local(Path(out), recorded)


def discard_fast_state(cfg, out: Path) -> list[Path]:
    """--restart: the few-step stage's training state and record (FAST_TRAINING_RUN too: the next training
    is another); its saved model is kept. The folder may be the merge's output_dir: its stages' records
    stay (`_forget`)."""
    return _remove([fast_state_path(cfg, out)]) + _forget(Path(out), [FAST_STAGE, FAST_TRAINING_RUN])


def _remote(out) -> bool:
    from dmm_ray.data import fs as fsu

    return fsu.is_uri(out)


def state_paths(cfg, out: Path | str, stage: str) -> list:
    """The folders holding `stage`'s resumable state (existing or not): Paths, or URIs for a URI `out`."""
    from dmm_ray.data import fs as fsu

    if stage == "synthesize":
        return [fsu.location_join(out, "synthesized")]
    return [fsu.location_join(out, "ray_results", f"{cfg.name}-{stage}")]


def _has_state(path) -> bool:
    if _remote(path):
        from dmm_ray.data import fs as fsu

        return fsu.has_entries(*fsu.resolve(path))
    return path.is_dir() and any(path.iterdir())


def _read(out) -> dict:
    if _remote(out):
        from dmm_ray.data import fs as fsu

        fs, root = fsu.resolve(out)
        try:
            return json.loads(fsu.read_bytes(fs, fsu.join(root, RECORD)))
        except FileNotFoundError:
            return {}
    path = out / RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _differences(old: dict, new: dict) -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in old and key.removeprefix("synthesized.") in _ADDED_LATER:
            continue  # recorded by an older dmm-ray, before this input was
        if old.get(key) != new.get(key):
            if key == "teachers" and old.get(key) and new.get(key):
                was, now = [t["name"] for t in old[key]], [t["name"] for t in new[key]]
                if was != now:
                    lines.append(f"teachers (order): {was} -> {now}")
                for t_old, t_new in zip(old[key], new[key]):
                    changed = [f for f in t_new if t_old.get(f) != t_new.get(f)]
                    if t_old["name"] == t_new["name"] and changed:
                        lines.append(f"teacher {t_new['name']!r}: {', '.join(changed)} changed")
                if was == now and not lines:
                    lines.append("teachers changed")
            else:
                lines.append(f"{key}: {json.dumps(old.get(key, '(not set)'))} -> {json.dumps(new.get(key, '(not set)'))}")
    return lines


def check_resume(cfg, out: Path | str, stages: list[str], ignore: tuple[str, ...] = ()) -> None:
    """Refuse (StaleStateError) when a stage's existing state was made with other inputs, or its
    inputs were never recorded (state from an older dmm-ray, or foreign files). `ignore`: inputs (and
    their synthesized.* copies) left out of the comparison."""
    recorded = _read(out)
    problems = []
    hashed = _run_hashed()  # (teacher or checksum key, rule) -> its checksum: hashed once for every stage's comparison
    for stage in stages:
        existing = [p for p in state_paths(cfg, out, stage) if _has_state(p)]
        if not existing:
            continue
        if stage not in recorded:
            problems.append(f"{stage}: {existing[0]} exists but records no settings (made by an older run?)")
            continue
        was, now = (
            {k: v for k, v in d.items() if k.removeprefix("synthesized.") not in ignore} for d in (recorded[stage], stage_inputs(cfg, stage, hashed))
        )
        diff = _differences(was, _same_layout(was, _by_the_recorded_rule(cfg, was, json.loads(json.dumps(now)), hashed)))
        if diff:
            problems.append(f"{stage} ({existing[0]}): " + "; ".join(diff[:8]) + (f"; ... {len(diff) - 8} more" if len(diff) > 8 else ""))
    if problems:
        raise StaleStateError(
            f"output_dir {out} holds the state of a merge with other settings, which a re-run would resume:\n  "
            + "\n  ".join(problems)
            + "\nEither write this merge elsewhere (--set output_dir=NEW_DIR, or another name), or discard the old state "
            "(jobs/merge.py --restart; the last merged model stays until the new one replaces it)."
        )


def recorded_by_an_earlier_rule(recorded: str | None, checksum_by, hashed: dict | None = None, key=None) -> bool:
    """`recorded` (a checksum a record holds) is what the same files give by an earlier files_checksum rule
    (teachers.CHECKSUM_RULES), `checksum_by(rule)`: a record an earlier dmm-ray made, of the same files. Each
    change of the rule made such files "changed" and their run refused until --restart (a file of 16-32 MiB,
    whose tail the first rule skipped: an SD LoRA of rank 16-32, a small VAE or UNet; a folder from `hf download
    --local-dir`, whose .cache/ the rules before "content" hashed). What that earlier rule could not see (such a
    file's tail) it still cannot; a record by the current rule is compared by it alone. `hashed`: (key, rule) ->
    checksum, kept by the caller, so the files of `key` are hashed once per rule."""
    from dmm_ray.teachers import CHECKSUM_RULES

    if not recorded:
        return False
    hashed = {} if hashed is None else hashed
    for rule in reversed(CHECKSUM_RULES[:-1]):
        if (key, rule) not in hashed:
            hashed[key, rule] = checksum_by(rule)
        if hashed[key, rule] == recorded:
            return True
    return False


def _by_the_recorded_rule(cfg, was: dict, now: dict, hashed: dict | None = None, model=None) -> dict:
    """`now` with a recorded checksum (a teacher's, or one of _CHECKSUMMED's and its synthesized.* copy) where the
    files, hashed now by an earlier rule, give it (recorded_by_an_earlier_rule). `model`: the few-step stage's
    merged model. `hashed`: kept by the caller across stages (recorded_by_an_earlier_rule)."""
    from dmm_ray.teachers import teacher_checksum

    hashed = {} if hashed is None else hashed
    now = dict(now)
    for key, value in now.items():
        name, recorded = key.removeprefix("synthesized."), was.get(key)
        if name in _CHECKSUMMED and value and recorded and recorded != value:
            if recorded_by_an_earlier_rule(recorded, lambda rule: _checksum(name, cfg, model, rule), hashed, name):
                now[key] = recorded
    old, new = was.get("teachers"), now.get("teachers")
    if not isinstance(old, list) or not isinstance(new, list):
        return now
    specs = {t.name: t for t in cfg.teachers}
    teachers = list(new)
    for i, (t_old, t_new) in enumerate(zip(old, new)):
        recorded, spec = t_old.get("checksum"), specs.get(t_new["name"])
        if spec is None or t_old.get("name") != t_new["name"] or recorded == t_new["checksum"]:
            continue
        if recorded_by_an_earlier_rule(recorded, lambda rule: teacher_checksum(spec, rule=rule), hashed, _teacher_key(spec)):
            teachers[i] = {**t_new, "checksum": recorded}
    return {**now, "teachers": teachers}


def _same_layout(was: dict, now: dict) -> dict:
    """`now` with the recorded scaling.teachers_per_worker when both values give one worker layout: what k
    decides is the teachers a worker hosts at most, min(k, N) (consecutive groups of that many,
    dmm_ray/distill/layout.py), so of 3 teachers k = 4 and k = 8 are the same layout and the same training."""
    key = "scaling.teachers_per_worker"
    k_was, k_now, n_was, n_now = was.get(key), now.get(key), len(was.get("teachers") or []), len(now.get("teachers") or [])
    if isinstance(k_was, int) and isinstance(k_now, int) and n_was and n_now and min(k_was, n_was) == min(k_now, n_now):
        return {**now, key: k_was}
    return now


def record(cfg, out: Path | str, stage: str) -> None:
    """Record `stage`'s inputs (call when the stage starts: a crash mid-stage leaves matching state), and
    the folder's TRAINING_RUN when it has none yet."""
    recorded = _read(out)
    recorded[stage] = json.loads(json.dumps(stage_inputs(cfg, stage)))
    _draw_training_run(recorded, TRAINING_RUN)
    _write(out, recorded)


def _draw_training_run(recorded: dict, key: str) -> None:
    """A new id under `key` (TRAINING_RUN, FAST_TRAINING_RUN) in a folder's record that has none."""
    import uuid

    recorded.setdefault(key, uuid.uuid4().hex)


def training_run(out: Path | str, key: str = TRAINING_RUN) -> str | None:
    """The TRAINING_RUN of the merge state in `out` (FAST_TRAINING_RUN: of the few-step stage's state), None
    when no stage has recorded its inputs there since the state was made, or last discarded."""
    return _read(out).get(key)


def _write(out: Path | str, recorded: dict) -> None:
    if _remote(out):
        from dmm_ray.data import fs as fsu

        fs, root = fsu.resolve(out)
        fs.create_dir(root, recursive=True)
        fsu.write_bytes_atomic(fs, fsu.join(root, RECORD), json.dumps(recorded, indent=1).encode())
        return
    _write_local(out, recorded)


def _write_local(out: Path, recorded: dict) -> None:
    import pyarrow.fs as pafs

    from dmm_ray.data import fs as fsu

    out.mkdir(parents=True, exist_ok=True)
    fsu.write_bytes_atomic(pafs.LocalFileSystem(), str(out / RECORD), json.dumps(recorded, indent=1).encode())


def discard_state(cfg, out: Path | str) -> list[Path]:
    """--restart: remove every stage's resumable state and their records (TRAINING_RUN too: the next training
    is another); the merged model is kept, and so is the record of a few-step stage whose folder
    (fast.output_dir) is this one (`_forget`)."""
    from dmm_ray.data import fs as fsu

    removed = _remove([p for stage in STAGES for p in state_paths(cfg, out, stage)] + [fsu.location_join(out, "stages")])
    return removed + _forget(out, (*STAGES, TRAINING_RUN))


def _forget(out: Path | str, stages) -> list:
    """Drop `stages`' records from the folder's record, the file itself once no other is left (a merge and
    its few-step stage may share one folder, each with its own --restart); [the file] when it was removed."""
    from dmm_ray.data import fs as fsu

    recorded = _read(out)
    kept = {k: v for k, v in recorded.items() if k not in stages}
    if not kept:
        return _remove([fsu.location_join(out, RECORD)])
    if kept != recorded:
        _write(out, kept)
    return []


def _remove(targets: list) -> list:
    """Delete each folder or file (a Path, or a URI) that exists; return those removed."""
    from dmm_ray.data import fs as fsu

    removed = []
    for path in targets:
        if _remote(path):
            if fsu.delete(*fsu.resolve(path)):
                removed.append(path)
        elif path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
        elif path.exists():
            path.unlink()
            removed.append(path)
    return removed

"""The merge job's driver: validate -> encode latents (if needed) -> distill -> synthesize ->
fine-tune -> save the merged DMMPipeline -> evaluate -> track. Runs on the Ray driver only."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dmm_ray.completion import forget
from dmm_ray.config import MergeConfig
from dmm_ray.console import say
from dmm_ray.data.latents import ensure_latents
from dmm_ray.merged_model import (
    MERGE_RECORD,
    SAVED_BY,
    STYLES_RECORD,
    TRAINED_BY,
    all_teachers,
    recorded_teachers,
    recover,
    request_sha256,
    request_without,
    save_siblings,
    saved_from,
    staged,
    style_descriptions,
)
from dmm_ray.output_folders import fast_folder, fast_synthesized, output_location  # (re-exported: their home is dmm_ray.output_folders)
from dmm_ray.ray_session import init_for_training


@dataclass
class MergeResult:
    merged_path: Path  # a local folder (for a URI output_dir: the staged copy that was uploaded)
    stage_metrics: dict = field(default_factory=dict)
    evaluation: object | None = None
    run_id: str | None = None
    seconds: float = 0.0
    location: str = ""  # where the merged model is: merged_path, or <output_dir URI>/merged
    fast: object | None = None  # dmm_ray.fast.job.FastResult when fast.enabled
    already_complete: bool = False  # a re-run of a finished merge with the same config: nothing was run
    tracking_failed: str | None = None  # track_stage's warning when the store failed: the model is saved, not logged (jobs/merge.py exits 3)


COMPLETE_RECORD = "merge_complete.json"  # in the local work folder (dmm_ray/completion.py)
# beside the config in an incremental merge's completion record: its previous model's checksum
# (fingerprint.previous_model_checksum). The config names that model by its path only, so one re-merged in place
# since (other settings, --restart) left the re-run "already complete" with a model grown from the old one
PREVIOUS_MODEL = "previous_model"
# beside the config in a merge's completion record: {teacher name: checksum} (fingerprint.teacher_checksums), as the
# stages' records hold them. The config names each teacher by its path only, so a teacher re-made in place since
# (its stages' checkpoints deleted) left the re-run "already complete" with the model of the old teacher
TEACHERS = "teachers"
# recorded since a later version: a record made before one lacks it and is compared without it (_same_request)
_ADDED_LATER = (PREVIOUS_MODEL, TEACHERS)


def completed_merge(cfg: MergeConfig, out: Path) -> dict | None:
    """The record of a merge that finished every stage in `out` with exactly this config (the absolute
    one), when its merged model (and few-step model, with fast.enabled) is still there; else None."""
    from dmm_ray.completion import finished

    models = [out / "merged" / "model_index.json"]
    if cfg.fast.enabled:
        models.append(fast_folder(cfg, out) / "model" / "model_index.json")
    done = finished(out, COMPLETE_RECORD, _merge_request(cfg), models, same=_same_request)
    return None if done is None or done.get("fast_pending") or done.get("evaluate_pending") else done


def merged_before_fast(cfg: MergeConfig, out: Path) -> dict | None:
    """The record of a merge in `out` that finished every stage before `fast` (its merged model saved,
    evaluated, registered) with this config, its fast: section aside (the few-step stage runs on the
    saved model and changes nothing before it), when that merged model is still there; else None. Such
    a merge whose few-step stage failed, or whose fast: settings changed, runs only that stage again:
    running the others again would save and register the same merged model as a second MLflow version."""
    from dmm_ray.completion import finished

    def same_merged_model(recorded: dict, asked: dict) -> bool:
        return _same_request(recorded, asked, ("fast",))

    done = finished(out, COMPLETE_RECORD, _merge_request(cfg), [out / "merged" / "model_index.json"], same=same_merged_model)
    return None if done is None or done.get("evaluate_pending") else done


def saved_before_evaluate(cfg: MergeConfig, out: Path, restart: bool = False) -> dict | None:
    """The record of a merge in `out` that saved its merged model with this config, its evaluation: and
    fast: sections aside (neither changes the model), but did not finish evaluate and track (the record
    says `evaluate_pending`), when that model is still there; else None. A re-run of such a merge skips
    the training and the save and runs evaluate, track and fast on the saved model: an incremental merge
    into its own output_dir cannot train again (its save replaced the previous model), and any other
    merge would only make and save the same model again. A failure that only the evaluation settings
    cause can be fixed in them, and the re-run still resumes. Such a merge killed between its save's
    swap and the record (none in `out`) is found by its saved model's record (`saved_by_this_training`),
    unless `restart` (a merge that trains again; for an incremental merge into its own output_dir, from
    the saved model as the previous one)."""
    from dmm_ray.completion import finished

    def same_saved_model(recorded: dict, asked: dict) -> bool:
        return _same_request(recorded, asked, ("fast", "evaluation"))

    done = finished(out, COMPLETE_RECORD, _merge_request(cfg), [out / "merged" / "model_index.json"], same=same_saved_model)
    if done is None and not restart and not (out / COMPLETE_RECORD).exists() and saved_by_this_training(cfg, out / "merged"):
        # killed between the save's swap and its record: the model there is this merge's, saved from its training
        # state, and training again (resumed at its last step) would only save it again
        return {"location": str(out / "merged"), "evaluate_pending": True, "from_model_record": True}
    return done if done is not None and done.get("evaluate_pending") else None


def saved_by_this_training(cfg: MergeConfig, model: Path) -> bool:
    """The merged model `model` (<local work folder>/merged) was saved by this merge (its record's `SAVED_BY`)
    from the training state in output_dir now (its `TRAINED_BY`: that state's fingerprint.TRAINING_RUN). The
    config alone does not say so: a --restart that was killed before its save left the model of the training
    before it, of the same config, and a re-run must train again, not take that model for its result. An
    incremental merge into its own output_dir needs only the config: its save replaced the previous model, so
    it cannot train again (and refuses --restart). A URI output_dir: False (a save killed before its upload
    left the model only in the local staging folder; training again, resumed at its last step, uploads it)."""
    from dmm_ray import fingerprint

    if _into_its_own_output(cfg):
        return saved_from(model, saved_model_request(cfg), None, any_training=True)
    local, remote = output_location(cfg)
    return remote is None and saved_from(model, saved_model_request(cfg), trained_by=fingerprint.training_run(local))


def saved_model_request(cfg: MergeConfig) -> str:
    """sha256 of the merge's request (`_merge_request`: the absolute config, before the cluster plan fills in
    resources), its fast: and evaluation: sections aside, as saved_before_evaluate compares them: recorded in
    the merged model it saves, so the model says which merge saved it when merge_complete.json does not."""
    return request_sha256(request_without(_config_request(cfg), ("fast", "evaluation")))


def saved_into_its_base(cfg: MergeConfig, restart: bool = False) -> bool:
    """An incremental merge whose incremental.base_merged is its own <output_dir>/merged, and which saved
    its merged model there with this config (merged_before_fast: every stage before `fast` finished; or
    saved_before_evaluate: the save did, evaluate or track failed). Its save replaced the previous model,
    so no stage that reads that model (synthesize, distill, finetune, save) can run again, and none has
    to: a re-run runs the stages after the save that did not finish, on the saved model, or nothing.
    `restart` (or another config) would merge from the saved model as the previous one: False."""
    if restart or not _into_its_own_output(cfg):
        return False
    cfg = cfg.with_absolute_paths()  # as run_merge records the merge it completes
    local = output_location(cfg)[0]
    return merged_before_fast(cfg, local) is not None or saved_before_evaluate(cfg, local) is not None


def _into_its_own_output(cfg: MergeConfig) -> bool:
    """An incremental merge whose incremental.base_merged is its own local <output_dir>/merged."""
    if not cfg.incremental.base_merged:
        return False
    local, remote = output_location(cfg.with_absolute_paths())
    return remote is None and Path(cfg.incremental.base_merged).resolve() == (local / "merged").resolve()


def fast_stage_config(cfg: MergeConfig, local: Path) -> MergeConfig:
    """The config the merge's few-step stage runs with (run_fast): fast.output_dir its fast_folder, and
    fast.synthesized output_folders.fast_synthesized's (for an output_dir URI whose synthesized sets it reads, the
    URI's <output_dir>/synthesized, where the merge writes them: by default the stage looked for them beside the
    merged model, in the local staging folder, and stopped after the whole merge)."""
    update = {"output_dir": str(fast_folder(cfg, local)), "synthesized": fast_synthesized(cfg)}
    return cfg.model_copy(update={"fast": cfg.fast.model_copy(update=update)})


def record_complete(
    cfg: MergeConfig, out: Path, result: MergeResult, fast_pending: bool = False, evaluate_pending: bool = False, request: dict | None = None
) -> None:
    """`fast_pending`: every stage but `fast` finished (merged_before_fast), not the whole merge (completed_merge);
    `evaluate_pending`: the merged model is saved, evaluate and track are to come (saved_before_evaluate),
    with what the training stages measured, for the track of a re-run that skips them. `request`: `_merge_request(cfg)`
    as the merge computed it at its start (its previous model's checksum as it read that model), default now."""
    from dmm_ray.completion import record_finished

    info: dict = {"fast_pending": True} if fast_pending else {}
    if evaluate_pending:
        # the numbers track_stage logs (finish_stage: int and float values)
        measured = {stage: {k: v for k, v in m.items() if isinstance(v, (int, float))} for stage, m in result.stage_metrics.items()}
        info.update(evaluate_pending=True, stage_metrics=measured, seconds=result.seconds)
    record_finished(out, COMPLETE_RECORD, request or _merge_request(cfg), location=result.location, run_id=result.run_id, **info)


def _config_request(cfg: MergeConfig) -> dict:
    return {"config": cfg.model_dump(mode="json")}


def _merge_request(cfg: MergeConfig) -> dict:
    """What decides a merge's result, as its completion record compares it: the whole (absolute) config, its
    teachers' checksums (TEACHERS) and, for an incremental merge, its previous model's (PREVIOUS_MODEL), but not for
    one into its own output_dir: its save replaced that model (the record names the model it saved). Each is hashed
    once in a run (fingerprint.hashing_once), however often the record is compared."""
    from dmm_ray.fingerprint import teacher_checksums

    request = {**_config_request(cfg), TEACHERS: teacher_checksums(cfg)}
    if cfg.incremental.base_merged and not _into_its_own_output(cfg):
        from dmm_ray.fingerprint import previous_model_checksum

        request[PREVIOUS_MODEL] = previous_model_checksum(cfg)
    return request


def _same_request(recorded: dict, asked: dict, sections: tuple[str, ...] = ()) -> bool:
    """A completion record's request against this merge's (`_merge_request`), the config's `sections` aside. A
    record written before one of _ADDED_LATER was lacks it and is compared without it (as fingerprint's
    _ADDED_LATER): else every merge finished before would merge again."""
    asked = {k: v for k, v in asked.items() if k not in _ADDED_LATER or k in recorded}
    return request_without(recorded, sections) == request_without(asked, sections)


def _inputs_changed(cfg: MergeConfig, out: Path) -> str | None:
    """The line saying that this merge (the config, `fast:` and `evaluation:` aside) finished or saved its model in
    `out` from teachers (TEACHERS) or a previous model (PREVIOUS_MODEL) that have changed since (re-made in place),
    so it merges again; None otherwise."""
    changed = _changed_inputs(cfg, out)
    return (
        f"this merge, with this config, saved its merged model in {out} from other inputs: {changed}; so it merges again from the files there now"
        if changed
        else None
    )


def _changed_inputs(cfg: MergeConfig, out: Path) -> str | None:
    """What _inputs_changed says changed ('teacher 'x' (source) has changed since (checksum a -> b)'; ...), or None."""
    from dmm_ray.completion import finished

    def other_inputs(recorded: dict, asked: dict) -> bool:
        unset = dict.fromkeys(_ADDED_LATER)
        return any(k in recorded and recorded[k] != asked.get(k) for k in _ADDED_LATER) and _same_request(
            {**recorded, **unset}, {**asked, **unset}, ("fast", "evaluation")
        )

    asked = _merge_request(cfg)
    done = finished(out, COMPLETE_RECORD, asked, [out / "merged" / "model_index.json"], same=other_inputs)
    if done is None:
        return None
    recorded, changed = done["asked"], []
    sources = {t.name: t.source for t in cfg.teachers}
    for name, checksum in asked[TEACHERS].items():
        if TEACHERS in recorded and recorded[TEACHERS].get(name) != checksum:
            changed.append(f"teacher {name!r} ({sources[name]}) has changed since (checksum {recorded[TEACHERS].get(name)} -> {checksum})")
    if PREVIOUS_MODEL in recorded and recorded[PREVIOUS_MODEL] != asked.get(PREVIOUS_MODEL):
        changed.append(
            f"incremental.base_merged {cfg.incremental.base_merged} has changed since "
            f"(UNet checksum {recorded[PREVIOUS_MODEL]} -> {asked.get(PREVIOUS_MODEL)})"
        )
    return "; ".join(changed)


def check_writable_outputs(cfg: MergeConfig) -> None:
    """Before the tracker or Ray start: the merge's local output folder (a URI output_dir's staging
    folder) and the few-step stage's folder can be written (dmm_ray.paths), and MLflow can open the
    tracking store (dmm_ray.tracking.check_tracking)."""
    from dmm_ray import paths

    local, remote = output_location(cfg)
    paths.check_writable_folder(local, "output_dir" if remote is None else f"the local staging folder of output_dir {remote}")
    if cfg.fast.enabled and cfg.fast.output_dir:
        paths.check_writable_folder(cfg.fast.output_dir, "fast.output_dir")
    if cfg.evaluation.enabled:  # written after minutes of training: say it now
        paths.check_writable_folder(cfg.evaluation.output_dir, "evaluation.output_dir")
        paths.check_writable_folder(cfg.evaluation.cache_dir, "evaluation.cache_dir")
    from dmm_ray.tracking import check_tracking

    check_tracking(cfg.tracking)  # a store MLflow cannot open, or an sqlite folder that cannot be written


def _format(spec) -> str | None:
    """A teacher's format, found from its files when the config leaves it out (None when they cannot tell)."""
    from dmm_ray.teachers import TeacherError

    try:
        return spec.resolved_format()
    except TeacherError:
        return spec.format


def log(msg: str) -> None:
    say("merge", msg)


def check_synthesized_rows(cfg: MergeConfig) -> None:
    """Each style's synthesized set (synthesis.images_per_teacher rows, shared out among the style's
    scaling.workers_per_teacher replicas) must fill, in each replica's share, the rows of it that one batch
    takes (dmm_ray.distill.streams.cached_stream), its mixture rows too (a stream of their own); else
    distill or the fine-tune stop after synthesis."""
    from dmm_ray.distill.streams import mixture_rows, split_batch

    needs = []
    batch = cfg.data.stream.batch_size
    if cfg.data.synthetic_fraction > 0:
        stream = f"data.synthetic_fraction={cfg.data.synthetic_fraction} of data.stream.batch_size={batch}"
        needs.append((split_batch(batch, cfg.data.synthetic_fraction)[1], stream))
    fraction = cfg.distill.mixture_fraction
    if fraction > 0 and min(cfg.scaling.teachers_per_worker, len(cfg.teachers)) >= 2:  # a worker hosting 2+ styles mixes them
        needs.append((mixture_rows(batch, fraction), f"distill.mixture_fraction={fraction} of data.stream.batch_size={batch}"))
    if cfg.finetunes:
        needs.append((cfg.synthesis.finetune_batch_size, "synthesis.finetune_batch_size"))
    k = cfg.workers_per_teacher
    for rows, what in needs:
        if cfg.synthesis.images_per_teacher // k < rows:
            share = f" for each of its {k} workers (scaling.workers_per_teacher)" if k > 1 else ""
            raise ValueError(
                f"synthesis.images_per_teacher={cfg.synthesis.images_per_teacher} is fewer than the {rows} synthesized rows "
                f"of each style that one batch takes ({what}){share}; synthesize at least {rows * k} or take fewer rows"
            )


def check_prompts_the_merge_reads(cfg: MergeConfig) -> None:
    """A synthesis.prompts file that a stage of the merge will read is there and holds prompts: synthesis
    runs after distill when only the fine-tune reads its samples, and the few-step stage (fast.enabled)
    samples the merged model with them (fast.synthetic_source merged, the rollout pairs) after the whole
    merge; a missing or empty file used to stop the merge there, after the training."""
    synthesizes = cfg.data.synthetic_fraction > 0 or cfg.finetunes  # the stages that synthesize (STAGES)
    if synthesizes or (cfg.fast.enabled and cfg.fast.samples_merged_model):
        from dmm_ray.data.readers import check_synthesis_prompts

        check_synthesis_prompts(cfg)


def check_regulariser_rows(cfg: MergeConfig, old_styles: int) -> None:
    """incremental.old_style_samples: the regulariser's batch takes the synthesized rows of every read a
    teacher worker makes per step (one per hosted teacher: dmm_ray.distill.streams.StageBatches) from
    the pool of the `old_styles` styles' samples; a pool smaller than that stops distill after synthesis."""
    from dmm_ray.distill.streams import split_batch

    if not cfg.old_style_samples:
        return
    reads = min(cfg.scaling.teachers_per_worker, len(cfg.teachers))
    n_synth = split_batch(cfg.data.stream.batch_size, cfg.data.synthetic_fraction)[1]
    pool, rows = old_styles * cfg.synthesis.images_per_teacher, n_synth * reads
    if pool < rows:
        raise ValueError(
            f"incremental.old_style_samples: the regularisation worker's batch takes {rows} of the previous model's samples "
            f"({n_synth} synthesized rows x {reads} teachers per worker), but its {old_styles} old style(s) x "
            f"synthesis.images_per_teacher={cfg.synthesis.images_per_teacher} give {pool}; synthesize at least "
            f"{-(-rows // old_styles)} per style, lower scaling.teachers_per_worker or data.synthetic_fraction, "
            "or set incremental.old_style_samples: false"
        )


def validate_before_ray(cfg: MergeConfig, deep: bool = False, restart: bool = False):
    """Everything that can be checked without Ray: teachers' files (present, not truncated, `.ckpt`
    only with allow_pickle; `deep`: every tensor finite), formats and architectures, style names, what
    the evaluation needs when it runs (prompts, feature extractor, the record of an incremental merge's
    previous model that lists its old styles' teachers), and local latent shards that are there or can
    be encoded (dmm_ray.data.latents.check_latents). `restart`: the merge runs with --restart. Returns the
    encode's plan when the shards are still to be encoded (for ensure_latents: the source's index read once), else None."""
    from dmm_ray.memory_plan import check_fits
    from dmm_ray.teachers import TeacherError, check_teacher_files, validate_teachers

    check_fits(cfg)  # scaling.gpu_memory_gb: refuse a layout that will not fit, naming the numbers
    # Here, not at config load: the memory plan of an adamw8bit layout (--dry-run, dmm_ray.memory_plan)
    # needs no bitsandbytes, as it needs no weights; a run is still refused before Ray starts
    if cfg.distill.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "distill.optimizer: adamw8bit needs bitsandbytes, which is not installed here "
            "(pip install bitsandbytes; GPU workers); use adamw or adamw_fused"
        )
    check_synthesized_rows(cfg)
    check_prompts_the_merge_reads(cfg)
    shapes: dict = {}  # each allowed .ckpt's index, unpickled once for both checks
    check_teacher_files(cfg.teachers, deep=deep, shapes=shapes)
    validate_teachers(cfg.teachers, cfg.student.base, shapes=shapes)
    if cfg.evaluation.enabled:  # (the fast stage of a merge evaluates only when the merge does)
        cfg.evaluation.check_ready()  # prompts and feature extractor: not only after training and the save
    if cfg.incremental.base_merged:
        from dmm_ray.models.style_unet import merged_style_names
        from dmm_ray.teachers import folder_architecture

        merged = Path(cfg.incremental.base_merged)
        if not _into_its_own_output(cfg):  # (its own: this merge takes that merge.lock itself, and its dry run reads it)
            from dmm_ray.output_lock import check_not_being_replaced

            # another output_dir's merged/ while a merge runs there: its save would swap the model this merge reads
            check_not_being_replaced(merged, flag="incremental.base_merged")
        try:
            old = merged_style_names(merged)
        except (FileNotFoundError, ValueError) as error:
            parked = save_siblings(merged)[1]
            hint = ""
            if not merged.exists() and parked.is_dir() and _into_its_own_output(cfg):  # run_merge: parked_base_put_back
                hint = f"; a save killed between its two renames left the model as {parked}, which the merge puts back before it starts"
            raise TeacherError(f"incremental.base_merged: {error}{hint}") from None
        if cfg.evaluation.enabled:  # the evaluation after training needs the old styles' teachers from its record
            try:
                all_teachers(cfg)
            except FileNotFoundError as error:
                raise TeacherError(f"incremental.base_merged: {error}; set evaluation.enabled: false to merge without evaluating") from None
        clash = sorted(set(old) & {t.name for t in cfg.teachers})
        if clash and not saved_into_its_base(cfg, restart):  # (saved: its new styles are those the save added)
            own = merged.resolve() == (Path(cfg.output_dir) / "merged").resolve()  # a save of this very merge replaced it
            # finished there with this config from teachers re-made in place since: why it is not complete (saved_into_its_base)
            changed = _changed_inputs(cfg.with_absolute_paths(), output_location(cfg.with_absolute_paths())[0]) if own else None
            raise TeacherError(
                f"teachers {clash} are already styles of {merged} (styles: {old}); give new teachers unique names"
                + (
                    f". {merged} is this merge's own output: a run of it already saved the merged model there in place of "
                    "the previous one"
                    + (f", from other inputs: {changed}" if changed else "")
                    + "; to merge again, point incremental.base_merged at a copy of the previous model"
                    if own
                    else ""
                )
            )
        want, got = folder_architecture(cfg.student.base), folder_architecture(merged)
        for key, value in want.items():
            if key != "unet.addition_embed_type" and got.get(key) != value:
                raise TeacherError(f"incremental.base_merged: {key} is {got.get(key)!r} but the student base has {value!r}")
        check_student_base(cfg, merged)
        check_student_extensions(cfg, merged)
        check_regulariser_rows(cfg, len(old))
    if cfg.fast.enabled:  # what run_fast refuses before its Ray, but only after the merge: said before the merge
        from dmm_ray.fast.job import check_merge_stage

        # the merged model's styles: the teachers', and an incremental merge's previous ones (read above)
        new = {t.name for t in cfg.teachers}
        previous = [s for s in old if s not in new] if cfg.incremental.base_merged else []
        local, remote = output_location(cfg)
        check_merge_stage(cfg, fast_stage_config(cfg, local), local, remote, len(new) + len(previous))
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.latents import check_latents

    if fsu.is_uri(cfg.data.shards):  # a URI's state is read by the encode stage: no network before Ray starts
        return None
    state, plan = check_latents(cfg)  # (a complete set: enough rows for the merge's workers)
    if cfg.fast.enabled and state.status == "complete":  # and for its few-step stage's: not said only after the merge
        from dmm_ray.data.latents import check_enough_rows

        check_enough_rows(cfg, job="fast")
    return plan


def check_student_base(cfg: MergeConfig, merged: Path) -> None:
    """An incremental merge saves the grown student with student.base's text encoder(s), tokenizer(s),
    VAE and scheduler, and its student and regulariser condition on that text encoder: a base other than
    the one the previous model was merged on (same architecture, other weights) silently swapped those
    parts under the old styles. Refused when the previous model's record names its base's checksum (a
    model merged before the record held it, or made elsewhere, is not checked), and neither the current
    files_checksum rule nor an earlier one (a model saved by an earlier dmm-ray) gives it."""
    from dmm_ray.fingerprint import base_parts_checksum, recorded_by_an_earlier_rule
    from dmm_ray.merged_model import read_record
    from dmm_ray.teachers import TeacherError

    try:
        record = read_record(merged)
    except (OSError, ValueError):
        return
    recorded = record.get("student_base") if isinstance(record, dict) else None
    if not isinstance(recorded, dict) or not recorded.get("checksum") or recorded["checksum"] == base_parts_checksum(cfg.student.base):
        return
    if recorded_by_an_earlier_rule(recorded["checksum"], lambda rule: base_parts_checksum(cfg.student.base, rule)):
        return
    raise TeacherError(
        f"incremental.base_merged: {merged} was merged on the student base {recorded.get('path')}, and student.base "
        f"{cfg.student.base} has other text encoder, tokenizer, VAE or scheduler files; an incremental merge saves the grown model "
        "with student.base's and trains the new styles and the regulariser on its text encoder, so the old styles would run "
        f"on parts they were not merged with. Set student.base: {recorded.get('path')} (or a copy of it)"
    )


def check_student_extensions(cfg: MergeConfig, merged: Path) -> None:
    """An incremental merge grows the previous model's student, its style FiLM and adapters included
    (dmm_ray.distill.loop._load_student), so student.style_film, student.style_adapters.rank and the
    layers student.style_adapters.targets resolve to must be what that model has; other values were
    silently not trained (and the memory plan counted them)."""
    from dmm_ray.teachers import TeacherError

    unet = json.loads((merged / "unet" / "config.json").read_text())
    has = {"student.style_film": bool(unet.get("style_film", False)), "student.style_adapters.rank": int(unet.get("style_adapter_rank") or 0)}
    asked = {"student.style_film": cfg.student.style_film, "student.style_adapters.rank": cfg.student.style_adapters.rank}
    wrong = [key for key in has if asked[key] != has[key]]
    # values as YAML writes them (true, 8)
    problems = [f"{key} is {json.dumps(asked[key])} but the previous model has {json.dumps(has[key])}" for key in wrong]
    fixes = [f"{key}: {json.dumps(has[key])}" for key in wrong]
    if has["student.style_adapters.rank"] and "student.style_adapters.rank" not in wrong:
        problem, fix = _adapter_targets_problem(cfg.student.style_adapters.targets, unet)
        if problem:
            problems.append(problem)
            fixes.append(fix)
    if problems:
        raise TeacherError(
            "incremental.base_merged: " + "; ".join(problems) + f". An incremental merge grows {merged}'s student as it is; set " + ", ".join(fixes)
        )


def _adapter_targets_problem(targets: list[str], unet_config: dict) -> tuple[str | None, str | None]:
    """(what differs, the targets to set) when `targets` resolve to other layers than the previous model
    adapts (its unet/config.json records them resolved, style_adapter_modules), or (None, None). The
    targets are resolved as the student resolves them (`style_adapters.target_modules`), on the previous
    model's architecture built on the meta device (no weights read), so the same layers spelled otherwise
    (other suffixes, another order) pass."""
    import torch
    from diffusers import UNet2DConditionModel

    from dmm_ray.defaults import SD_ADAPTER_TARGETS, adapter_target_matches
    from dmm_ray.models.style_adapters import target_modules
    from dmm_ray.models.style_unet import STYLE_CONFIG_KEYS

    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_") and k not in STYLE_CONFIG_KEYS})
    adapted = list(unet_config.get("style_adapter_modules") or [])
    key = "student.style_adapters.targets"
    try:
        resolved = target_modules(plain, targets)
    except ValueError as error:  # matches no layer of that architecture
        resolved, note = [], f" ({error})"
    else:
        note = ""
    if set(resolved) == set(adapted):
        return None, None
    lacks, extra = [n for n in adapted if n not in resolved], [n for n in resolved if n not in adapted]

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    parts = [f"they leave out {len(lacks)} layers it adapts ({some(lacks)})"] if lacks else []
    parts += [f"they add {len(extra)} layers it does not adapt ({some(extra)})"] if extra else []
    problem = f"{key} {json.dumps(targets)} resolve to {len(resolved)} layers{note}, not the previous model's {len(adapted)}: " + ", ".join(parts)
    # the fix: the config's own and the default targets that match adapted layers only, then for each layer they
    # leave out its shortest dotted suffix that does (not a bare index like "0"; else the whole name): together
    # these resolve to exactly the previous model's layers, spelled as configs spell them
    names = [n for n, m in plain.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    def only_adapted(target: str) -> bool:
        return all(n in adapted for n in names if adapter_target_matches(n, target))

    suffixes = [t for t in dict.fromkeys([*targets, *SD_ADAPTER_TARGETS]) if only_adapted(t) and any(adapter_target_matches(n, t) for n in adapted)]
    for layer in adapted:
        if any(adapter_target_matches(layer, t) for t in suffixes):
            continue
        pieces = layer.split(".")
        candidates = (".".join(pieces[i:]) for i in range(len(pieces) - 1, -1, -1) if not pieces[i].isdigit())
        suffixes.append(next((s for s in candidates if only_adapted(s)), layer))
    return problem, f"{key}: {json.dumps(suffixes)}"


def describe_layout(cfg: MergeConfig) -> str:
    """Which worker hosts which teachers, in words (printed by --dry-run)."""
    from dmm_ray.distill.layout import worker_layout

    n, k, m = len(cfg.teachers), cfg.scaling.teachers_per_worker, cfg.workers_per_teacher
    groups = cfg.teacher_groups
    head = f"layout: W = {cfg.num_workers} worker(s) = {groups} teacher group(s) (ceil({n} teachers / {k} per worker)) x {m} worker(s) each" + (
        " + 1 regularisation worker" if cfg.regularization_workers else ""
    )
    lines = [head]
    old_styles = 0
    if cfg.incremental.base_merged:  # the regulariser's old styles (validate_before_ray has read them already)
        from dmm_ray.models.style_unet import merged_style_names

        old_styles = len(merged_style_names(cfg.incremental.base_merged))
    roles = worker_layout(n, m, old_styles, cfg.regularization_workers > 0, teachers_per_worker=k)
    for role in roles[:groups] + roles[len(roles) - cfg.regularization_workers :] if cfg.regularization_workers else roles[:groups]:
        if role.kind == "regularizer":
            lines.append(f"  worker {role.rank}: the previous merged model (regularisation of the old styles)")
            continue
        names = [cfg.teachers[i].name for i in role.teacher_indices]
        # as distill.teacher_bank loads them: LoRAs that name one base share it when two or more do; a lone
        # LoRA of its base is fused into its own copy, a full teacher (offloaded with the others)
        bases: dict[str, int] = {}
        for i in role.teacher_indices:
            if cfg.scaling.share_lora_base and cfg.teachers[i].base and _format(cfg.teachers[i]) == "lora":
                bases[str(cfg.teachers[i].base)] = bases.get(str(cfg.teachers[i].base), 0) + 1
        shared = [n for n in bases.values() if n > 1]
        held = ""
        if shared:
            on = "one shared base" if len(shared) == 1 else f"{len(shared)} shared bases"
            held = f"; {sum(shared)} LoRA(s) as adapters on {on}"
        if cfg.scaling.teacher_offload and len(names) - sum(shared) > 0:
            held += "; full teachers offloaded to CPU RAM"
        ranks = [r.rank for r in roles if r.teacher_indices == role.teacher_indices]
        lines.append(f"  worker(s) {ranks}: {', '.join(names)}{held}")
    return "\n".join(lines)


def plan_cluster(cfg: MergeConfig):
    """`dmm_ray.resources.check_cluster` on the connected cluster (encode counted if shards are missing)."""
    from dmm_ray.data.shards import shard_set_state
    from dmm_ray.resources import check_cluster

    return check_cluster(cfg, needs_encode=shard_set_state(cfg.data.shards).status != "complete")


def with_plan(cfg: MergeConfig, plan) -> MergeConfig:
    from dmm_ray.resources import with_plan as apply

    return apply(cfg, plan)


def locations(cfg: MergeConfig) -> dict[str, str]:
    """Where this merge reads and writes (absolute; printed by jobs/merge.py at start and end)."""
    from dmm_ray import paths

    out = Path(cfg.output_dir) if "://" not in cfg.output_dir else None
    tracking = cfg.tracking
    where = {
        "DMM_HOME": str(paths.dmm_home()),
        "zoo": cfg.zoo or "-",
        "output_dir": cfg.output_dir,
        "latent shards": cfg.data.shards,
        "merged model": str(out / "merged") if out else cfg.output_dir.rstrip("/") + "/merged",
        "MLflow store": tracking.tracking_uri if tracking.enabled else "(tracking.enabled: false)",
    }
    if out is None:
        where["local staging"] = str(paths.staging_dir(cfg.output_dir))
    if cfg.fast.enabled:
        where["fast model"] = str(fast_folder(cfg, output_location(cfg)[0]) / "model")
    return where


def format_locations(cfg: MergeConfig, title: str) -> str:
    from dmm_ray import paths

    where = locations(cfg)
    lines = [f"{title}:"] + [f"  {k + ':':<15}{v}" for k, v in where.items()]
    store = where["MLflow store"]
    if store.startswith("sqlite:///") or "://" in store:
        lines.append(f"  {'browse:':<15}mlflow ui --backend-store-uri {store}")
    lines.append(f"  {'serve:':<15}DMM_MODEL={where['merged model']} serve run serve.app")
    db = paths.sqlite_path(store)
    # (the few-step model was left out: a relative fast.output_dir under `ray job submit` went unflagged)
    named = {k: where.get(k) for k in ("output_dir", "latent shards", "fast model")}
    warning = paths.temporary_dir_warning({**named, "MLflow store": str(db) if db is not None else None})
    return "\n".join(lines + ([warning] if warning else []))


def _copy_from_result(result, dest: Path, part: str = "") -> Path:
    """Copy the stage's final checkpoint (`part=""`: the whole training state: student, discriminator
    head, optimizers, EMA) or one part of it (`"student"`) to `dest`."""
    if result.checkpoint is None:
        raise RuntimeError("training produced no checkpoint")
    with result.checkpoint.as_directory() as folder:
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(Path(folder) / part, dest)
    return dest


def _student_from_result(result, dest: Path) -> Path:
    return _copy_from_result(result, dest, "student")


def save_merged(
    cfg: MergeConfig,
    student_dir: Path,
    dest: Path,
    tracking: dict | None = None,
    teachers: list | None = None,
    saved_by: str | None = None,
    trained_by: str | None = None,
) -> Path:
    """Write the merged DMMPipeline next to `dest`, then swap it in: a failed save never replaces
    the last good model. `tracking` ({"uri", "run_id"} of the MLflow stage run) is recorded in
    dmm_merge.json, so an export (jobs/export.py) is logged to the run the model came from, and
    `teachers` (default: all_teachers, read now; a previous model without a record: the new ones alone)
    with the styles, `saved_by` (`saved_model_request` of the merge that saves it) as `SAVED_BY`, and
    `trained_by` (fingerprint.TRAINING_RUN of the training state `student_dir` comes from) as `TRAINED_BY`."""
    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.pipeline import SAMPLER_RECORD, dmm_pipeline_class, load_dmm_pipeline, sampler_record

    # The base's VAE, text encoder(s), tokenizer(s) and schedule around the student; SD1.5 or SDXL.
    pipe = dmm_pipeline_class(cfg.student.base).from_base(cfg.student.base, StyleUNet.from_pretrained(student_dir))
    if teachers is None:
        teachers = all_teachers(cfg, missing_ok=True)
    # an old style keeps the description the previous model showed (its styles.json), else its teacher's
    described = {
        **{t.name: t.description for t in teachers},
        **(style_descriptions(cfg.incremental.base_merged) if cfg.incremental.base_merged else {}),
    }
    from dmm_ray.fingerprint import base_parts_checksum

    record = {"name": cfg.name, "styles": pipe.styles, "teachers": [t.model_dump() for t in teachers]}
    # the base whose text encoder(s), VAE and scheduler the model holds: an increment must grow it on the same
    record["student_base"] = {"path": str(cfg.student.base), "checksum": base_parts_checksum(cfg.student.base)}
    if tracking and tracking.get("run_id"):
        record["mlflow"] = {"tracking_uri": tracking.get("uri"), "run_id": tracking["run_id"]}
    if saved_by:
        record[SAVED_BY] = saved_by
    if trained_by:
        record[TRAINED_BY] = trained_by
    with staged(dest) as tmp:  # swapped in once written and verified; removed if anything fails first
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=1))
        (tmp / STYLES_RECORD).write_text(json.dumps([{"name": n, "description": described.get(n, "")} for n in pipe.styles], indent=1))
        # The sampler its teachers were sampled with (synthesis): DMMPipeline, Serve and the playground default to it.
        syn = cfg.synthesis
        (tmp / SAMPLER_RECORD).write_text(json.dumps(sampler_record(syn.num_inference_steps, syn.guidance_scale, syn.negative_prompt), indent=1))
        load_dmm_pipeline(tmp)  # verify it loads before it replaces anything
    return dest


def recover_merged(dest: Path) -> list[str]:
    """`merged_model.recover` (an interrupted save of the merged model undone), said in the log."""
    done = recover(dest)
    for line in done:
        log(line)
    return done


def stages_with_state(cfg: MergeConfig) -> list[str]:
    """The stages of this merge that leave resumable state in output_dir."""
    stages = ["distill"]
    if cfg.data.synthetic_fraction > 0 or cfg.finetunes:
        stages.insert(0, "synthesize")
    if cfg.finetunes:
        stages.append("finetune")
    return stages


def check_output_dir(cfg: MergeConfig, restart: bool = False) -> None:
    """Before Ray starts: `restart` discards the old stage state; otherwise state made with other
    settings stops the merge (dmm_ray.fingerprint.StaleStateError) instead of being resumed, and so
    does the few-step stage's (fast.enabled), in every input the merge does not decide."""
    from dmm_ray import fingerprint

    local, remote = output_location(cfg)
    out = remote or local  # where the resumable state is
    if restart:
        forget(local, COMPLETE_RECORD)
        removed = fingerprint.discard_state(cfg, out)
        if removed:
            log(f"--restart: removed {', '.join(str(p)[len(str(out)) :].lstrip('/') for p in removed)} from {out}")
        if cfg.fast.enabled:  # the few-step stage's training state (in its own, local folder: fast_stage)
            for p in fingerprint.discard_fast_state(cfg, fast_folder(cfg, local)):
                log(f"--restart: removed {p}")
    # saved into its own base: the stages recorded the previous model's checksum, which that save changed
    # (they do not run again); any other input that changed is still stale state
    ignore = (fingerprint.PREVIOUS_MODEL_CHECKSUM,) if saved_into_its_base(cfg, restart) else ()
    fingerprint.check_resume(cfg, out, stages_with_state(cfg), ignore=ignore)
    if cfg.fast.enabled and completed_merge(cfg, local) is None:  # its few-step stage will run (run_fast: on <local>/merged)
        # its leftover state of other settings: said now, not after the merge (the merged model is compared when the stage starts)
        fingerprint.check_fast_resume(fast_stage_config(cfg, local), (local / "merged").resolve(), fast_folder(cfg, local), before_merge=True)


def stage_run_name(cfg: MergeConfig) -> str:
    """The name of the merge's MLflow stage run: `merge`, or for an incremental merge what it adds and
    how many styles the model then holds (`incremental +noir, neon (6 styles)`): every increment of a
    project was called `incremental`, so the runs table could not tell them apart. Its dmm.stage tag
    stays `incremental` (filters, the registered version's description)."""
    if not cfg.incremental.base_merged:
        return "merge"
    from dmm_ray.models.style_unet import merged_style_names

    new = [t.name for t in cfg.teachers]
    # (a merge into its own output_dir may find the new styles saved there already: counted once)
    old = [s for s in merged_style_names(cfg.incremental.base_merged) if s not in new]
    added = ", ".join(new) if len(new) <= 4 else f"{', '.join(new[:3])} and {len(new) - 3} more"
    name = f"incremental +{added} ({len(old) + len(new)} styles)"
    return name if len(name) <= RUN_NAME_CHARS else name[: RUN_NAME_CHARS - 1] + "…"


RUN_NAME_CHARS = 250  # MLflow's SQL stores keep a run name in 250 characters


def evaluate_stage(cfg: MergeConfig, merged_path, teachers: list | None = None):
    """The FID matrix of the merged model against the teachers of every style it holds, `teachers`
    (default: all_teachers(cfg), read now; incremental: the previous merge's teachers, from its record,
    then cfg.teachers); None when evaluation.enabled is false or there are no teachers."""
    eval_cfg = cfg.evaluation
    if not eval_cfg.enabled or not cfg.teachers:
        return None
    from dmm_ray.evaluation.api import evaluate_merge

    log("stage evaluate")
    # (the merge holds its output_dir's lock: no other merge replaces the model it samples)
    return evaluate_merge(merged_path, all_teachers(cfg) if teachers is None else teachers, eval_cfg, check_replaced=False)


def run_merge(cfg: MergeConfig, tracker=None, restart: bool = False) -> MergeResult:
    """The whole merge, holding `output_dir`'s lock (dmm_ray/output_lock.py) from before Ray starts
    until it returns or raises: a second merge on the same folder refuses instead of mixing state."""
    from dmm_ray import fingerprint

    with fingerprint.hashing_once():  # each teacher hashed once, however often the records are compared
        return _run_merge(cfg, tracker, restart)


def _run_merge(cfg: MergeConfig, tracker, restart: bool) -> MergeResult:
    from dmm_ray import output_lock

    started = time.time()
    cfg = cfg.with_absolute_paths()  # workers and actors run in other directories
    # validate: everything that can be checked before Ray starts (teachers, layout), before anything
    # is written: a refused merge leaves no output folder and touches no lock
    out, remote = output_location(cfg)
    put_back_parked_base(cfg, out)
    encode_plan = validate_before_ray(cfg, restart=restart)
    check_fast_lock(cfg, out, restart)  # a running jobs/fast.py on the few-step folder: said now, not after the whole merge
    out.mkdir(parents=True, exist_ok=True)
    if remote:
        log(
            f"output_dir {remote} is a URI: checkpoints, synthesized sets and fingerprints live there; local work is staged in {out} "
            "and the merged model and evaluation are uploaded when saved. The merge lock is taken in the staging folder: "
            "it guards this machine only, so run one merge per output_dir URI"
        )
    with output_lock.hold(out, warn=log, **merge_lock_names(out, remote)):
        return _merge(cfg, out, tracker, restart, started, encode_plan=encode_plan)


def merge_lock_names(local: Path, remote: str | None) -> dict:
    """How the merge's lock (in `local`, output_location's first part) names what it guards, for output_lock's hold /
    check: an output_dir URI (`remote`) by that URI, its lock being in the local staging folder. The refusal of a second
    merge into the same URI named the staging folder as its output_dir, a folder no config of the user's names."""
    return {"what": f"output_dir {remote} (its local staging folder {local})"} if remote else {}


def fast_stage_runs(cfg: MergeConfig, local: Path, restart: bool = False) -> bool:
    """Will a run of this merge (the absolute config) run its few-step stage? fast.enabled, and the merge is not
    complete already (its re-run runs no stage; `restart` merges again)."""
    return cfg.fast.enabled and (restart or completed_merge(cfg, local) is None)


def check_fast_lock(cfg: MergeConfig, local: Path, restart: bool = False, runs: bool | None = None) -> list[str]:
    """With fast.enabled, when the few-step stage will run (the merge is not complete already): the few-step
    folder's fast.lock (dmm_ray/output_lock.py), read, not taken. One a running few-step job holds (jobs/fast.py,
    or another merge's stage on that folder), or one on another host, raises its OutputDirBusyError naming the
    owner: the stage takes the lock only after the whole merge, and was refused there. Returns the line a run
    would log about a stale one (the stage takes it over), for the dry run. `runs`: fast_stage_runs, when the
    caller has it already (it reads and compares the completion record)."""
    if not (fast_stage_runs(cfg, local, restart) if runs is None else runs):
        return []
    from dmm_ray import output_lock

    folder = fast_folder(cfg, local)
    what = f"the few-step folder {folder} (this merge's fast stage)"
    # the merge is the job refused (it writes its few-step stage elsewhere); the holder: a few-step job, as its lock says
    line = output_lock.check(
        folder, name=output_lock.FAST_LOCK, job="merge's few-step stage", what=what, fix="--set fast.output_dir=NEW_DIR", holder="few-step job"
    )
    return [line] if line else []


def put_back_parked_base(cfg: MergeConfig, out: Path) -> None:
    """An incremental merge into its own output_dir whose last save was killed between its two renames: its
    previous model (base_merged) is `merged.old`, `merged/` is gone. `_merge` puts it back (recover_merged),
    but only after validate_before_ray, which read base_merged and refused the merge; put back here first,
    holding the folder's lock as _merge does."""
    merged = out / "merged"
    if not _into_its_own_output(cfg) or merged.exists() or not save_siblings(merged)[1].is_dir():
        return
    from dmm_ray import output_lock

    with output_lock.hold(out, warn=log, **merge_lock_names(out, output_location(cfg)[1])):
        recover_merged(merged)


def as_read_before_it_starts(cfg: MergeConfig) -> MergeConfig:
    """`cfg` as run_merge reads it once put_back_parked_base has run, for jobs/merge.py --dry-run, which changes
    nothing: an incremental merge into its own output_dir whose last save was killed between its two renames reads
    its previous model from the merged.old the run puts back first (the dry run refused the merge there, naming that
    model, and checked nothing after it, where the run merged). Any other config: `cfg`."""
    if not cfg.incremental.base_merged:
        return cfg
    merged = Path(cfg.incremental.base_merged)
    parked = save_siblings(merged)[1]
    if not _into_its_own_output(cfg) or merged.exists() or not parked.is_dir():  # (put_back_parked_base's condition)
        return cfg
    return cfg.model_copy(update={"incremental": cfg.incremental.model_copy(update={"base_merged": str(parked)})})


def resume_point(cfg: MergeConfig, out: Path, restart: bool = False) -> tuple[dict | None, dict | None, dict | None, str | None]:
    """What a run of this merge (the absolute config) in its local work folder `out` finds done there:
    (completed_merge, merged_before_fast, saved_before_evaluate (looked for only without the former),
    the line that says what the run does about it, or None when it merges from the start without a word). _merge acts on
    it; jobs/merge.py --dry-run prints the line, so the dry run says what the run would do."""
    done = completed_merge(cfg, out)
    if done is not None:
        note = (
            f"already complete: this merge, with this config, finished in {out} (model: {done['location']}"
            + (f", MLflow run {done['run_id']}" if done.get("run_id") else "")
            + "); nothing to do. --restart merges again; jobs/evaluate.py evaluates the model again"
        )
        return done, None, None, note
    merged = merged_before_fast(cfg, out)
    if merged is not None and not cfg.fast.enabled:
        note = (
            f"already complete: this merge, with this config, saved its merged model in {out} (model: {merged['location']}"
            + (f", MLflow run {merged['run_id']}" if merged.get("run_id") else "")
            + "); nothing to do. --restart merges again"
        )
        return None, merged, None, note
    if merged is not None:
        note = (
            f"this merge, with this config, already finished every stage before fast (merged model: {merged['location']}"
            + (f", MLflow run {merged['run_id']}" if merged.get("run_id") else "")
            + "); its few-step stage did not finish with these fast: settings, so only that stage runs. --restart merges again"
        )
        return None, merged, None, note
    saved = saved_before_evaluate(cfg, out, restart)
    if saved is not None:
        note = (
            f"this merge, with this config, already saved its merged model ({saved['location']}"
            + (f"; its {MERGE_RECORD} says so: the run was stopped before it recorded the save" if saved.get("from_model_record") else "")
            + "); its evaluate or track stage did not finish, so the training and the save are skipped and the stages after "
            "the save run. --restart merges again"
        )
        return None, None, saved, note
    return None, None, None, _inputs_changed(cfg, out)


def check_before_run(cfg: MergeConfig, restart: bool = False) -> list[str]:
    """jobs/merge.py --dry-run, after validate_before_ray: what run_merge would find in output_dir before it
    trains, nothing written. Raises what it would refuse with: output_dir's lock held by a running merge (or
    one on another host; output_lock.OutputDirBusyError naming it), with fast.enabled the few-step folder's
    fast.lock held by a running few-step job (check_fast_lock), resumable state of other settings
    (check_output_dir, without `restart`, which discards that state). Returns the lines the run would log
    about the folder: a stale lock it would take over, the model a killed save left that it would put back
    (merged.old, fast/model.old; at an output_dir URI, the merged.old / evaluation.old an interrupted upload left)
    and its leftovers it would remove, and that the merge is complete already (nothing to do) or only its stages
    after the save would run, and then what its few-step stage finds (dmm_ray.fast.job.check_merge_stage_before_run)."""
    from dmm_ray import fingerprint

    with fingerprint.hashing_once():  # as run_merge: each teacher hashed once
        return _check_before_run(cfg, restart)


def _check_before_run(cfg: MergeConfig, restart: bool) -> list[str]:
    from dmm_ray import output_lock

    cfg = cfg.with_absolute_paths()  # as run_merge records and compares the merge it completes
    local, remote = output_location(cfg)
    fast_runs = fast_stage_runs(cfg, local, restart)
    lines = [line for line in [output_lock.check(local, **merge_lock_names(local, remote))] if line]
    lines += check_fast_lock(cfg, local, restart, runs=fast_runs)
    # what a killed save left, which the run puts back (or removes) before anything else: _merge's recover_merged
    # first, its few-step stage's run_fast at the stage's start. Said, not done (the dry run changes nothing)
    lines += recover(local / "merged", dry_run=True)
    if remote:  # and at an output_dir URI, what an interrupted upload left (_merge's recover_model): the dry run said nothing
        from dmm_ray.data import fs as fsu

        for name, marker in uploaded_results().items():
            lines += fsu.recover_model(*fsu.resolve(f"{remote}/{name}"), marker=marker, dry_run=True)
    if fast_runs:
        from dmm_ray.fast.job import FAST_RECORD

        lines += recover(fast_folder(cfg, local) / "model", marker=FAST_RECORD, dry_run=True)
    if restart:  # the run forgets the completion record and discards the state first: it merges from the start
        return lines
    check_output_dir(cfg)
    _, merged, saved, note = resume_point(cfg, local)
    lines += [note] if note else []
    if fast_runs and (merged is not None or saved is not None):
        # the stage distills the model saved there now: what it finds in its folder is said too (a saved few-step model,
        # a finished stage). A merge that trains again saves another model, whose stage trains
        from dmm_ray.fast.job import check_merge_stage_before_run

        lines += check_merge_stage_before_run(fast_stage_config(cfg, local), local / "merged", evaluate=cfg.evaluation.enabled)
    return lines


def _merge(cfg: MergeConfig, out: Path, tracker, restart: bool, started: float, encode_plan=None) -> MergeResult:
    """`out`: the local work folder (output_dir, or the staging folder of an output_dir URI). `encode_plan`:
    validate_before_ray's (the encode's plan, made before Ray started; None when there was nothing to encode).
    check the resumable state -> start Ray and plan the cluster -> encode -> the STAGES below, in order."""
    remote = output_location(cfg)[1]
    recover_merged(out / "merged")  # a save that crashed mid-swap: put the last good model back first
    if remote:  # and an upload that was cut short while it replaced the model or the evaluation at the URI (fsu.upload_model)
        from dmm_ray.data import fs as fsu

        for name, marker in uploaded_results().items():
            for line in fsu.recover_model(*fsu.resolve(f"{remote}/{name}"), marker=marker):
                log(line)
    log(
        f"merge {cfg.name!r}: {len(cfg.teachers)} teacher(s) {[t.name for t in cfg.teachers]}, {cfg.num_workers} worker(s)"
        + (
            f", incremental on {cfg.incremental.base_merged} (regularisation {'on' if cfg.regularization_workers else 'off'})"
            if cfg.incremental.base_merged
            else ""
        )
    )
    check_output_dir(cfg, restart)  # resumable state made with other settings stops the merge here
    done, merged, saved, note = resume_point(cfg, out, restart)
    if note:
        log(note)
    if done is not None:  # the same job submitted again: no second save, evaluation or model version
        return MergeResult(merged_path=out / "merged", location=done["location"], run_id=done.get("run_id"), already_complete=True)
    if merged is not None and not cfg.fast.enabled:  # the merged model is this config's: the few-step stage is not asked for
        return MergeResult(merged_path=out / "merged", location=merged["location"], run_id=merged.get("run_id"), already_complete=True)
    if merged is None and saved is None:
        forget(out, COMPLETE_RECORD)  # from here on, the folder's model may change
    asked = cfg  # the config as given (below, the cluster plan fills in the resources)
    # what its records name: the previous model's checksum as this merge reads it, now. Taken when a record was written, it
    # named a model that another merge saved in its place meanwhile, and a re-run found "complete" a model grown from the old one
    request = _merge_request(asked)
    we_started_ray = init_for_training(cfg.scaling.ray_address)
    try:  # a merge that fails leaves no private Ray behind it either
        plan = plan_cluster(cfg)  # before anything long: a layout the cluster cannot hold stops here
        cfg = with_plan(cfg, plan)
        if merged is None:
            if saved is None:
                # encode: latent shards to train on (encoded, or an unfinished encode resumed, when missing)
                ensure_latents(cfg, plan=encode_plan)
                result = MergeResult(merged_path=out / "merged", location=f"{remote}/merged" if remote else str(out / "merged"))
            else:  # saved: what the skipped stages measured, for track (the failed run that logged their curves keeps them)
                measured, seconds = saved.get("stage_metrics") or {}, saved.get("seconds") or 0.0
                result = MergeResult(merged_path=out / "merged", location=saved["location"], stage_metrics=measured, seconds=seconds)
            stage_name = "incremental" if cfg.incremental.base_merged else "merge"
            tracking = tracker.start_stage(stage_name, cfg, run_name=stage_run_name(cfg)) if tracker else None
        else:  # the merged model's stage run is finished: the few-step stage opens its own
            result, tracking = MergeResult(merged_path=out / "merged", location=merged["location"], run_id=merged.get("run_id")), None
        # before any stage: the save may replace the previous model's record. Saved already (into its own
        # base, the previous model is gone): the saved model's record names the teacher of each of its styles
        teachers = (saved and recorded_teachers(out / "merged")) or all_teachers(cfg, missing_ok=True)
        run = MergeRun(
            cfg=cfg,
            out=out,
            remote=remote,
            plan=plan,
            tracker=tracker,
            tracking=tracking,
            result=result,
            started=started,
            teachers=teachers,
            saved_by=saved_model_request(asked),
            asked=asked,
        )
        try:
            for stage in STAGES:
                if (merged is not None and stage.name != "fast") or (saved is not None and stage.name in SAVED_STAGES) or not stage.when(run):
                    continue
                # the merged model is saved and registered: a re-run after a failure here runs only this stage (not when
                # its tracking failed: the record of the save stays, so a re-run logs it: track_stage)
                if stage.name == "fast" and not result.tracking_failed:
                    record_complete(asked, out, result, fast_pending=True, request=request)
                stage.run(run)
                if stage.name == "save":  # a re-run after a failure from here on skips the training and the save
                    record_complete(asked, out, result, evaluate_pending=True, request=request)
            if merged is not None:  # (save_stage times a whole merge)
                result.seconds = time.time() - started
        except BaseException as error:
            if tracker is not None and hasattr(tracker, "abort"):
                tracker.abort(error)  # FAILED, or KILLED when interrupted (re-running resumes); the last good model stays
            raise
        if not result.tracking_failed:  # else the record of the save stays: the same command tracks the model later
            record_complete(asked, out, result, request=request)
    finally:
        if we_started_ray:
            import ray

            ray.shutdown()
    return result


@dataclass
class MergeRun:
    """What the stages of one merge share: the config, where it works, and what earlier stages made."""

    cfg: MergeConfig
    out: Path  # the local work folder
    remote: str | None  # the output_dir URI, or None for a local output_dir
    plan: object  # dmm_ray.resources plan of the cluster (worker resources)
    tracker: object | None  # an observer: logs what the stages produced, never changes it
    tracking: dict | None  # the MLflow stage run ({"uri", "run_id", ...}) the Train workers log to
    result: MergeResult
    started: float
    # every style's teacher spec, codebook order (all_teachers; a previous model without a record: the new
    # ones, and validate_before_ray refuses its evaluation), read before any stage, as save and evaluate need it
    teachers: list
    saved_by: str | None = None  # saved_model_request of the config as given (run.cfg: with the cluster plan's resources)
    asked: MergeConfig | None = None  # the config as given: what the few-step stage's records take (fast_stage)
    shard_dirs: dict[int, str] | None = None  # style index -> the teacher's synthesized set
    student_dir: Path | None = None  # the latest stage's student, extracted on the driver

    @property
    def state(self) -> Path | str:
        """Where checkpoints, synthesized sets and fingerprints.json live."""
        return self.remote or self.out

    def timed(self, name: str, t0: float, metrics: dict | None = None) -> None:
        self.result.stage_metrics[name] = {**(metrics or {}), "seconds": time.time() - t0}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[MergeRun], None]
    when: Callable[[MergeRun], bool] = lambda run: True


def synthesize_stage(run: MergeRun) -> None:
    """The teachers' own samples: one Ray actor per teacher (before distill when they join its stream)."""
    t0 = time.time()
    run.shard_dirs = _synthesize(run.cfg, run.state)
    run.timed("synthesize", t0)


def distill_stage(run: MergeRun) -> None:
    """Score distillation on the common latent stream (+ each style's own synthesized samples)."""
    from dmm_ray import fingerprint
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.distill.trainer import build_trainer, fit_stage

    cfg, tracking = run.cfg, run.tracking
    mixed = run.shard_dirs is not None
    log(
        f"stage distill: {cfg.distill.steps} steps x {cfg.num_workers} worker(s) ({len(cfg.teachers)} teacher(s), "
        f"up to {min(cfg.scaling.teachers_per_worker, len(cfg.teachers))} per worker) x batch {cfg.data.stream.batch_size}"
        + (f" ({cfg.data.synthetic_fraction:.0%} synthesized)" if mixed else "")
    )
    t0 = time.time()
    fingerprint.record(cfg, run.state, "distill")
    datasets = {"train": build_latent_dataset(cfg.data)}
    if mixed:
        datasets.update(_synthetic_datasets(cfg, run.shard_dirs))
    distill = fit_stage(build_trainer(cfg, "distill", datasets, tracking=tracking and {**tracking, "prefix": "distill/"}, plan=run.plan))
    run.timed("distill", t0, distill.metrics)
    run.student_dir = _student_from_result(distill, run.out / "stages" / "distill_student")
    if cfg.finetunes and cfg.synthesis.finetune_continue:  # the fine-tune continues its discriminator and optimizers
        _copy_from_result(distill, run.out / "stages" / "distill_state")


def finetune_stage(run: MergeRun) -> None:
    """Fine-tune on the teachers' synthesized samples (paper 3.3: each style on its own teacher's images)."""
    from dmm_ray import fingerprint
    from dmm_ray.distill.trainer import build_trainer, fit_stage

    cfg, s, out, tracking = run.cfg, run.cfg.synthesis, run.out, run.tracking
    if s.finetune_continue:
        from dmm_ray.distill.checkpointing import MANIFEST

        init_state = _stage_folder(out / "stages" / "distill_state", run.remote, "distill_state", marker=MANIFEST)
    else:
        init_state = None
    log(
        f"stage finetune: {s.finetune_steps} steps at batch {s.finetune_batch_size}"
        + (" (continuing the distill discriminator and optimizer)" if init_state else "")
    )
    t0 = time.time()
    fingerprint.record(cfg, run.state, "finetune")
    finetune = fit_stage(
        build_trainer(
            cfg,
            "finetune",
            _synthetic_datasets(cfg, run.shard_dirs),
            tracking=tracking and {**tracking, "prefix": "finetune/"},
            init_student=_stage_folder(run.student_dir, run.remote, run.student_dir.name, marker=STUDENT_MARKER),
            steps=s.finetune_steps,
            batch_size=s.finetune_batch_size,
            lr=s.finetune_lr,
            split_datasets=False,
            init_state=init_state,
            plan=run.plan,
        )
    )
    run.timed("finetune", t0, finetune.metrics)
    run.student_dir = _student_from_result(finetune, out / "stages" / "finetune_student")


def save_stage(run: MergeRun) -> None:
    """The merged model: one diffusers folder (style names in unet/config.json), saved atomically."""
    from dmm_ray import fingerprint

    result = run.result
    trained_by = fingerprint.training_run(run.state)  # drawn by the first training stage (fingerprint.record)
    save_merged(
        run.cfg, run.student_dir, result.merged_path, tracking=run.tracking, teachers=run.teachers, saved_by=run.saved_by, trained_by=trained_by
    )
    if run.remote:  # after the atomic local save: the staged model is complete and loads
        from dmm_ray.data import fs as fsu

        t0, uri = time.time(), f"{run.remote}/merged"
        fsu.upload_model(run.out / "merged", *fsu.resolve(uri), marker=uploaded_results()["merged"])  # beside the previous model, then swapped in
        log(f"uploaded merged/ -> {uri} ({time.time() - t0:.1f} s)")
    result.seconds = time.time() - run.started
    split = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in result.stage_metrics.items() if "seconds" in v)
    log(f"merged model saved: {result.location} ({result.seconds:.0f} s since start: {split})")


def _evaluate(run: MergeRun) -> None:
    """Every style merged so far (incremental: old teachers + new ones), tracked or not."""
    run.result.evaluation = evaluate_stage(run.cfg, run.result.merged_path, run.teachers)
    if run.remote and run.result.evaluation is not None:
        # from where evaluate_stage wrote it: evaluation.output_dir (<staging>/evaluation unless set); <staging>/evaluation
        # was uploaded whatever that was: nothing, or an earlier run's evaluation, over this model's at the URI
        _upload_result(Path(run.cfg.evaluation.output_dir), run.remote, "evaluation")


def track_stage(run: MergeRun) -> None:
    """Log the evaluation and metrics, register the model (an observer: changes nothing above). A store
    that fails here (a server gone down after MLflow's retries, an sqlite file that can no longer be
    written) stops none of the work: the model is saved, the few-step stage still runs; the failure is
    one warning, kept in result.tracking_failed (the job exits 3), and the merge is left recorded as
    saved but not tracked (saved_before_evaluate), so the same command logs it once the store answers.
    It used to fail the job after the save, and a configured few-step stage never ran."""
    log("stage track")
    try:
        run.tracker.finish_stage(run.cfg, run.result)  # on failure it ends its runs FAILED (if the store takes that)
    except Exception as error:  # noqa: BLE001 - any failure of the store; an interrupt still stops the merge
        result = run.result
        result.tracking_failed = (
            f"the merged model is saved ({result.location or result.merged_path}) but MLflow could not log it to "
            f"{run.cfg.tracking.tracking_uri} ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'no message'}); "
            "its stage run is ended FAILED, where the store still takes that"
            + ("; the few-step stage runs without MLflow" if run.cfg.fast.enabled else "")
            + ". Once the store answers, re-run the same command: the training and the save are skipped, the stages after "
            "the save run again and log the model"
        )
        log(f"warning: {result.tracking_failed}")
        return
    run.result.run_id = run.tracking["run_id"] if run.tracking else None


def fast_stage(run: MergeRun) -> None:
    """The few-step model (dmm_ray/fast): LCM distillation of the model just saved."""
    from dmm_ray.fast.job import run_fast

    cfg, result, out = run.cfg, run.result, run.out
    fast_cfg = fast_stage_config(cfg, out)
    log(
        f"stage fast: LCM distillation of {result.merged_path} -> {fast_cfg.fast.output_dir}/model"
        + (" (kept in the local staging folder: not uploaded to the output_dir URI)" if run.remote else "")
    )
    fast_tracker = None
    # not after the merge's own tracking failed: the store has just failed, and the merge is not recorded as
    # tracked, so the same command tracks it again later
    if run.tracker is not None and getattr(run.tracker, "enabled", False) and not result.tracking_failed:
        from dmm_ray.tracking import make_tracker

        fast_tracker = make_tracker(cfg)  # the merge's project run again, a nested "fast" stage run
    # evaluated as the merged model was (evaluate_stage: when evaluation.enabled), also when a re-run runs only this stage
    # the merged model is this merge's (saved now, or by the run its completion record names): few-step state of
    # these settings from an earlier model there is of a model the merge replaced (run_fast discards it)
    # after the merge's own store failed: not recorded complete either, so the re-run that logs the merged model logs
    # this one too (it takes the saved few-step model as it is); recorded complete, it was never registered
    untracked = result.tracking_failed if fast_tracker is None and getattr(run.tracker, "enabled", False) else None
    # its records take the config as given, as the merge's own (the dry run, which plans no cluster, compares them)
    requested = fast_stage_config(run.asked, out) if run.asked is not None else None
    result.fast = run_fast(
        fast_cfg,
        result.merged_path,
        tracker=fast_tracker,
        evaluate=cfg.evaluation.enabled,
        merge_saved_model=True,
        untracked=untracked,
        requested=requested,
    )
    if result.fast.tracking_failed:  # the job exits 3; not recorded complete, so the same command logs it (only this stage runs)
        result.tracking_failed = result.fast.tracking_failed


# A merge after validate and encode: these stages, in this order, each when its condition holds.
STAGES: tuple[Stage, ...] = (
    Stage("synthesize", synthesize_stage, when=lambda run: run.cfg.data.synthetic_fraction > 0),  # mixed into distill from step 0
    Stage("distill", distill_stage),
    Stage("synthesize", synthesize_stage, when=lambda run: run.cfg.finetunes and run.shard_dirs is None),
    Stage("finetune", finetune_stage, when=lambda run: run.cfg.finetunes),
    Stage("save", save_stage),
    Stage("evaluate", _evaluate),
    Stage("track", track_stage, when=lambda run: bool(run.tracker)),
    Stage("fast", fast_stage, when=lambda run: run.cfg.fast.enabled),
)
# The stages a merge whose model is saved (saved_before_evaluate) does not run again: every stage up to the save.
SAVED_STAGES = tuple(s.name for s in STAGES[: [s.name for s in STAGES].index("save") + 1])


def _synthesize(cfg: MergeConfig, out: Path | str) -> dict[int, str]:
    """Synthesis fan-out: one Ray actor per teacher; returns {style index: shard dir}. `out`: the
    state location (a local folder, or the output_dir URI)."""
    from dmm_ray import fingerprint
    from dmm_ray.data import fs as fsu
    from dmm_ray.distill.synthesis import MergedStyle, synthesize_for

    fingerprint.record(cfg, out, "synthesize")
    s = cfg.synthesis
    old: list[str] = []
    if cfg.incremental.base_merged:
        from dmm_ray.models.style_unet import merged_style_names

        old = merged_style_names(cfg.incremental.base_merged)
    # incremental.old_style_samples: the frozen previous model samples its own styles (rows 0..len(old)-1) for the regulariser
    previous = [MergedStyle(name=n, model=str(cfg.incremental.base_merged)) for n in old] if cfg.old_style_samples else []
    log(
        f"stage synthesize: {s.images_per_teacher} images x {len(cfg.teachers)} teachers"
        + (f" + {len(previous)} old styles of the previous model" if previous else "")
        + f" ({s.num_inference_steps} DPM-Solver++ steps, CFG {s.guidance_scale})"
    )
    t0 = time.time()
    dirs = synthesize_for(
        cfg, [*previous, *cfg.teachers], len(old) - len(previous), fsu.location_join(out, "synthesized")
    )  # style rows stay contiguous
    log(f"synthesis done in {time.time() - t0:.0f} s")
    return dirs


def _synthetic_datasets(cfg: MergeConfig, shard_dirs: dict[int, str]) -> dict:
    """ONE dataset of every teacher's synthesized samples (rows carry their style): each worker
    reads it once and keeps the styles it hosts (one Ray Data execution, not one per style)."""
    from dmm_ray.data.stream import build_latent_dataset

    return {"synth": build_latent_dataset(cfg.data, shards=[shard_dirs[i] for i in sorted(shard_dirs)])}


STUDENT_MARKER = "config.json"  # a stage's student folder (StyleUNet.save_pretrained): its config, with the style names


def uploaded_results() -> dict[str, str]:
    """{folder: the file that marks it complete} of what a merge uploads to a URI output_dir beside its
    state: replaced there through fsu.upload_model, and put back by the next merge's start where an upload
    was cut short."""
    from dmm_ray.data.fs import MODEL_MARKER
    from dmm_ray.evaluation.outputs import MATRIX_FILE

    return {"merged": MODEL_MARKER, "evaluation": MATRIX_FILE}


def _stage_folder(local: Path, remote: str | None, name: str, marker: str) -> str:
    """A stage's student/state extracted on the driver, as Train workers will read it: the local
    folder, or (URI output_dir) its upload to <output_dir>/stages/<name> (`marker`: the file that marks
    it complete; the previous upload is kept until the new one is in), so workers on other nodes never
    read the driver's disk."""
    if remote is None:
        return str(local)
    from dmm_ray.data import fs as fsu

    uri = f"{remote}/stages/{name}"
    fsu.upload(local, uri, marker=marker)
    return uri


def _upload_result(local: Path, remote: str, name: str) -> None:
    """Upload the local folder `local` to <output_dir URI>/<name> (a folder of uploaded_results), replacing the
    previous one there only once it is complete: emptied first, an upload that failed left nothing there."""
    from dmm_ray.data import fs as fsu

    t0 = time.time()
    fsu.upload(local, f"{remote}/{name}", marker=uploaded_results()[name])
    log(f"uploaded {name}/ -> {remote}/{name} ({time.time() - t0:.1f} s)")

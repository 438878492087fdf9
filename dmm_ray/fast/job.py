"""The few-step stage's driver: LCM-distill a merged model on Ray Train, save it as a DMMPipeline
with TCDScheduler (or LCMScheduler: `fast.sampler`), evaluate it (FIDt at `fast.eval_steps` against the merge's own teachers and
reference), and register it in MLflow under the merge project as its own model version.

  run_fast(cfg, model_dir)   # cfg: a MergeConfig (its fast:, data:, evaluation:, tracking:, scaling:)
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dmm_ray.config import MergeConfig
from dmm_ray.console import say
from dmm_ray.data.latents import ensure_latents
from dmm_ray.merged_model import MERGE_RECORD, STYLES_RECORD, read_record, recorded_teachers, recover, staged
from dmm_ray.output_lock import FAST_LOCK  # (re-exported: the few-step job's lock)
from dmm_ray.ray_session import init_for_training
from dmm_ray.tracking import version_record

FAST_RECORD = "fast.json"  # what the few-step model was distilled from, with which settings
LORA_DIR = "lcm_lora"  # the LCM-LoRA alone (pytorch_lora_weights.safetensors), for the merged model it was trained on


@dataclass
class FastResult:
    model_path: Path
    train_metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0
    evaluations: dict = field(default_factory=dict)  # steps -> EvalResult
    model_uri: str | None = None
    already_complete: bool = False  # the same stage, model and settings finished before: nothing was run
    tracking_failed: str | None = None  # the warning when the store failed at the end: saved, not logged (jobs/fast.py exits 3)


COMPLETE_RECORD = "fast_complete.json"  # in the stage's folder (dmm_ray/completion.py)
FAST_LOCK_FIX = "--output-dir NEW_DIR, or --set fast.output_dir=NEW_DIR"  # how to write a few-step job elsewhere (its lock's refusal)


def log(msg: str) -> None:
    say("fast", msg)


class FastError(ValueError):
    """A bad few-step setup (model folder, mode, data), said before Ray starts."""


def require_local_model(model_dir: str | Path) -> Path:
    """`model_dir` as a local Path, or a FastError for a URI: the stage reads a local merged model folder. As a Path a
    URI was `s3:/bucket/...` under the current folder, and the Python API (run_fast) said "no such folder". The error
    says where the model is found locally (jobs/fast.py --model says the same, exit 2)."""
    from dmm_ray.data.fs import require_local

    try:
        return require_local("--model", model_dir)
    except ValueError as error:
        raise FastError(f"{error}; {_local_copy(str(model_dir))}") from None


def _local_copy(uri: str) -> str:
    """Where a merged model given as a URI is found locally: a merge into an output_dir URI keeps its model in
    the driver's staging folder (dmm_ray.paths.staging_dir) beside the upload, the folder to give here."""
    from dmm_ray.paths import staging_dir

    uri = uri.rstrip("/")
    if uri.endswith("/merged"):
        model = staging_dir(uri[: -len("/merged")]) / "merged"
        if (model / "model_index.json").is_file():
            return f"the merge that uploaded it keeps its local copy in {model}: give that folder"
    return "the few-step stage reads a local merged model folder: download it first (or give the merged folder of a local output_dir)"


def check_model_folder(model_dir: str | Path, fast=None) -> list[str]:
    """The merged model's style names, or a FastError that says what is wrong with the folder, or, with
    `fast` (a FastConfig), with the fast.* settings that depend on the model: its schedule (the solver
    grid and sub-steps) and its UNet's layers (fast.lora_targets)."""
    from dmm_ray.models.style_unet import merged_style_names

    folder = require_local_model(model_dir)
    if not folder.is_dir():
        raise FastError(f"--model {folder}: no such folder (give a merged model folder, e.g. $DMM_HOME/outputs/dmm-toy/merged)")
    for part in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "text_encoder", "tokenizer", "vae"):
        if not (folder / part).exists():
            raise FastError(f"--model {folder}: not a merged DMMPipeline folder (missing {part})")
    try:
        names = merged_style_names(folder)
    except (FileNotFoundError, ValueError) as error:
        raise FastError(f"--model {folder}: {error}") from None
    if (folder / FAST_RECORD).is_file():
        raise FastError(f"--model {folder} is already a few-step model ({FAST_RECORD}); distill the merged model it came from")
    if fast is not None:
        _check_settings_fit(folder, fast)
    return names


def _check_settings_fit(folder: Path, fast) -> None:
    """The checks the workers would make after Ray starts and the models load (dmm_ray.fast.lcm), made on
    the model's configs: the schedule's timesteps, and the UNet built on the meta device (no weights read)."""
    import torch

    from dmm_ray.fast.lcm import lora_config, solver_skip
    from dmm_ray.models.style_unet import StyleUNet

    try:
        schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        solver_skip(schedule.get("num_train_timesteps", 1000), fast)
        if fast.mode == "lora":
            with torch.device("meta"):
                unet = StyleUNet.from_config(StyleUNet.load_config(folder / "unet"))
            lora_config(unet, fast)
    except ValueError as error:
        raise FastError(f"{error} (--model {folder})") from None


def check_before_ray(cfg: MergeConfig, model_dir: str | Path):
    """What the few-step stage checks before Ray starts (run_fast; jobs/fast.py --dry-run): the model folder
    and the fast.* settings that depend on it, the output folder, the merge's synthesized sets it reads
    (fast.synthetic_fraction > 0 from the teachers), the synthesis.prompts file it samples the merged model
    with (fast.synthetic_source merged, the rollout pairs), local latent shards that are there or can be encoded,
    and that its worker fits scaling.gpu_memory_gb (the memory
    plan, dmm_ray.memory_plan.fast_worker: a MemoryPlanError naming the numbers). Returns (its styles, the memory
    plan, the encode's plan when the shards are still to be encoded, else None: for ensure_latents, so the source's
    index is read once)."""
    from dmm_ray.memory_plan import check_fast_fits

    styles = check_model_folder(model_dir, cfg.fast)
    check_output_folder(cfg, model_dir)
    if cfg.fast.synthetic_fraction > 0 and cfg.fast.synthetic_source == "teachers":
        # the merge's synthesized sets: missing ones, or too few rows for a batch, were said only after Ray started
        dirs = synthesized_shards(cfg, model_dir)
        check_synthesized_styles(dirs, len(styles))
        check_teacher_sample_rows(cfg, dirs)
    check_merged_sample_rows(cfg, len(styles))
    if cfg.fast.samples_merged_model:  # synthetic_source merged, the rollout pairs: read after Ray started and the stage's run began
        from dmm_ray.data.readers import check_synthesis_prompts

        check_synthesis_prompts(cfg)
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.latents import check_latents

    encode_plan = None
    if not fsu.is_uri(cfg.data.shards):  # as the merge's validate_before_ray (a URI's state: read by ensure_latents)
        encode_plan = check_latents(cfg, job="fast")[1]  # shards there (enough rows) or encodable: ensure_latents said so only after Ray started
    return styles, check_fast_fits(cfg, model_dir), encode_plan


def check_merge_stage(cfg: MergeConfig, fast_cfg: MergeConfig, local: Path, remote: str | None, styles: int) -> None:
    """A merge's few-step stage (fast.enabled), checked with the merge's own (dmm_ray.merge.validate_before_ray):
    what run_fast refuses before its Ray, but only after the whole merge. `fast_cfg`: the config the stage runs
    with (dmm_ray.merge.fast_stage_config); `local`, `remote`: the merge's output_location; `styles`: how many the
    merged model will hold (the teachers', and an incremental merge's previous ones)."""
    from dmm_ray.data import fs as fsu

    merged = local / "merged"  # where the merge's save puts the model the stage distills
    check_output_folder(fast_cfg, merged)  # a few-step folder inside or over the merged model
    synthesizes = cfg.data.synthetic_fraction > 0 or cfg.finetunes
    if cfg.fast.samples_merged_model and synthesizes and remote is None and _same_location(fast_cfg.fast.output_dir, local):
        # (check_output_folder refuses such a folder once the sets are there: after this merge, in its stage)
        raise FastError(
            f"fast.output_dir {cfg.fast.output_dir} is the merge's output_dir: the few-step stage samples the merged model "
            f"(fast.synthetic_source merged, fast.rollout_steps) into {local / 'synthesized'}, where this merge writes its "
            "teachers' synthesized sets, and would delete them; give another folder (default: <output_dir>/fast)"
        )
    f = fast_cfg.fast
    read_now = None  # the synthesized sets the stage will read, when they are there before the merge
    if f.synthetic_fraction > 0 and f.synthetic_source == "teachers":
        # fast.synthesized elsewhere than the sets this merge writes (<output_dir>/synthesized): the stage reads
        # what is there now, whatever the merge synthesizes; it used to be counted only after the whole merge
        own = fsu.location_join(remote or local, "synthesized")
        foreign = f.synthesized and not _same_location(f.synthesized, own)
        if not synthesizes or foreign:  # the stage reads what is there now
            read_now = synthesized_shards(fast_cfg, merged)
            check_teacher_sample_rows(fast_cfg, read_now)
        elif not cfg.incremental.base_merged:  # what this merge synthesizes: synthesis.images_per_teacher per teacher
            n, rows = len(cfg.teachers), len(cfg.teachers) * cfg.synthesis.images_per_teacher
            what = f"the merge synthesizes {cfg.synthesis.images_per_teacher} images x {n} teachers = {rows} rows (synthesis.images_per_teacher)"
            check_sample_rows(fast_cfg, rows, what, f"synthesize at least {-(-synthesized_batch_rows(fast_cfg) // n)} per teacher")
    check_merged_sample_rows(cfg, styles)
    if read_now:  # another merge's sets, of styles this merged model lacks, stopped the stage after the merge
        check_synthesized_styles(read_now, styles)


def _same_location(a, b) -> bool:
    """Two local paths or URIs name one folder."""
    from dmm_ray.data import fs as fsu

    if fsu.is_uri(a) or fsu.is_uri(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def check_merged_sample_rows(cfg: MergeConfig, styles: int) -> None:
    """fast.synthetic_source merged: the merged model's samples (fast.synthetic_images, else
    synthesis.images_per_teacher, per style) must fill the synthesized rows of one batch."""
    f = cfg.fast
    if f.synthetic_fraction > 0 and f.synthetic_source == "merged":
        per_style = "fast.synthetic_images" if f.synthetic_images else "synthesis.images_per_teacher: fast.synthetic_images is unset"
        what = f"fast.synthetic_source merged samples {cfg.merged_images_per_style} images x {styles} styles"
        check_sample_rows(
            cfg,
            styles * cfg.merged_images_per_style,
            f"{what} = {styles * cfg.merged_images_per_style} rows ({per_style})",
            f"sample at least {-(-synthesized_batch_rows(cfg) // styles)} per style",
        )


def synthesized_batch_rows(cfg: MergeConfig) -> int:
    """The synthesized rows of one few-step batch (fast.synthetic_fraction of fast.batch_size)."""
    return cfg.fast.batch_split(cfg.data.stream.batch_size)[1]


def check_sample_rows(cfg: MergeConfig, rows: int, what: str, fix: str) -> None:
    """The few-step stage's synthesized rows (every worker reads them all) must fill the synthesized rows of
    one batch (dmm_ray.distill.streams.cached_stream), else each worker stopped on it after Ray started (and,
    with synthetic_source merged, after the stage had sampled the merged model). A FastError naming the numbers."""
    f, need = cfg.fast, synthesized_batch_rows(cfg)
    if rows < need:
        raise FastError(
            f"{what}, fewer than the {need} synthesized rows one batch takes (fast.synthetic_fraction={f.synthetic_fraction} of "
            f"fast.batch_size={f.batch_size or cfg.data.stream.batch_size}); {fix} or take fewer rows"
        )


def check_synthesized_styles(dirs: list[str], styles: int) -> None:
    """The merge's synthesized sets (style_<i>/, as synthesize names them from the style of their rows) must be of
    the merged model's styles: another merge's sets with more styles stopped every worker (synthesized_rows)."""
    bad = [Path(d).name for d in dirs if int(Path(d).name.split("_")[-1]) >= styles]
    if bad:
        raise FastError(
            f"the synthesized sets {_sets_folder(dirs)} hold {', '.join(bad)}, outside the merged model's {styles} styles: "
            "give fast.synthesized of the merge that produced this model"
        )


def check_teacher_sample_rows(cfg: MergeConfig, dirs: list[str]) -> None:
    """fast.synthetic_source teachers: the merge's synthesized sets there now (their shards' recorded rows)."""
    from dmm_ray.data.shards import shard_set_state

    rows = sum(shard_set_state(folder).rows for folder in dirs)  # the rows of each set's complete shards, as the stream reads them
    check_sample_rows(
        cfg,
        rows,
        f"the merge's synthesized sets ({_sets_folder(dirs)}) hold {rows} rows in {len(dirs)} styles",
        "synthesize more in the merge (synthesis.images_per_teacher)",
    )


def check_output_folder(cfg: MergeConfig, model_dir: str | Path) -> None:
    """The stage's folder (fast_dir) must leave the merged model alone (a FastError otherwise). Inside
    it, the run wrote its state and model among the model's files (an --output-dir of its unet/ changed
    the unet checksum the model is known by: the same command was then refused as "another model").
    And <folder>/model, where the few-step model is saved in place of what is there, must be an
    earlier few-step model or nothing: --output-dir the parent of a merged model folder named `model`
    replaced the merged model itself with the few-step one."""
    out, model = fast_dir(cfg).resolve(), Path(model_dir).resolve()
    where = f"the few-step folder {out} (--output-dir, fast.output_dir)"
    if out == model or model in out.parents:
        raise FastError(
            f"{where} is inside the merged model {model} (--model): the run would write its state and model among its files; "
            "give a folder outside it (default: <output_dir>/fast)"
        )
    saved = out / "model"
    if saved == model or saved in model.parents:
        raise FastError(
            f"{where} saves the few-step model to {saved}, in place of the merged model {model} (--model); give another folder (default: <output_dir>/fast)"
        )
    if saved.exists() and not (saved / FAST_RECORD).is_file():
        raise FastError(
            f"{where} saves the few-step model to {saved}, which holds something else (not a few-step model: no {FAST_RECORD}) "
            "that the save would replace; move it away or give another folder"
        )
    samples = out / "synthesized"
    if cfg.fast.samples_merged_model and samples.is_dir() and any(samples.iterdir()) and not (samples / MERGED_SYNTH_RECORD).is_file():
        # a merge's output_dir as the few-step folder: its teachers' sets were deleted, and with synthetic_source
        # teachers (their default folder is that one) the stage then read the merged model's samples as theirs
        raise FastError(
            f"{where} samples the merged model into {samples} (fast.synthetic_source merged, fast.rollout_steps), which holds "
            f"sets it did not sample (no {MERGED_SYNTH_RECORD}: a merge's teachers' sets, when it is the merge's output_dir) "
            "that the sampling would delete; give another folder (default: <output_dir>/fast)"
        )


def fast_dir(cfg: MergeConfig) -> Path:
    """fast.output_dir, else the merge's few-step folder (output_folders.fast_folder): <output_dir>/fast, or for an
    output_dir URI its local staging folder's (the few-step stage writes local folders only), where the
    merge's own few-step stage writes. Path(uri) / "fast" was a local folder named `s3:` in the current one."""
    from dmm_ray.output_folders import fast_folder, output_location

    return fast_folder(cfg, output_location(cfg)[0])


def teachers_of(cfg: MergeConfig, model_dir: Path) -> list:
    """The merged model's own teachers (its dmm_merge.json), else the config's, in codebook order. A few-step model
    keeps the record of the merged model it was saved from: its teachers."""
    return recorded_teachers(model_dir) or list(cfg.teachers)


def synthesized_shards(cfg: MergeConfig, model_dir: Path) -> list[str]:
    """The merge's synthesized sets (style_<i>/ folders): fast.synthesized (a folder, or a URI: where a merge
    into an output_dir URI writes them), or <model>/../synthesized."""
    from pyarrow import fs as pafs

    from dmm_ray.data import fs as fsu

    folder = cfg.fast.synthesized or Path(model_dir).parent / "synthesized"
    fs, root = fsu.resolve(folder)  # (a URI as Path() read it was a local folder named `s3:`, with no sets)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:  # (a file there, not a folder)
        entries = []
    # only style_<i> as synthesis names them: another folder there (a copy, style_0.bak) failed int() and stopped the stage
    ours = [e.base_name for e in entries if e.type == pafs.FileType.Directory and re.fullmatch(r"style_\d+", e.base_name)]
    dirs = [str(fsu.location_join(folder, name)) for name in sorted(ours, key=lambda name: int(name.split("_")[-1]))]
    if not dirs:
        writes = "a merge with data.synthetic_fraction > 0 or synthesis.finetune_steps > 0 writes them"
        if _same_location(folder, fsu.location_join(cfg.output_dir, "synthesized")):
            # the config's own merge's sets: "set fast.synthesized to the merge's <output_dir>/synthesized" named this folder
            fix = (
                f"the merge into output_dir {cfg.output_dir} wrote none ({writes}): set fast.synthesized to the sets of the merge that made the model"
            )
        else:
            fix = f"set fast.synthesized to the merge's <output_dir>/synthesized ({writes})"
        raise FileNotFoundError(
            f"fast.synthetic_fraction={cfg.fast.synthetic_fraction} needs the merge's synthesized sets, but {folder} "
            f"has no style_<i>/ folders: {fix}, or fast.synthetic_fraction=0"
        )
    return dirs


def _sets_folder(dirs: list[str]) -> str:
    """The folder of the synthesized sets `dirs` (a local path or a URI: not Path(), which mangles `s3://`)."""
    return str(dirs[0]).rsplit("/", 1)[0]


MERGED_SYNTH_RECORD = "synthesized.json"  # what <fast output>/synthesized was sampled from (kept only while it matches)


def merged_synthesized_sets(cfg: MergeConfig, model_dir: Path, styles: list[str], out: Path) -> list[str]:
    """`fast.synthetic_source: merged` and the rollout pairs: every style of the merged model sampled by
    the synthesis fan-out (the synthesis.* sampler, prompts, actors; fast.synthetic_images per style)
    into <out>/synthesized, one style_<i>/ shard each. Sets sampled from another model or with other settings are discarded."""
    from dmm_ray.distill.synthesis import MergedStyle, synthesize_for
    from dmm_ray.fingerprint import prompts_inputs
    from dmm_ray.teachers import files_checksum

    s, folder = cfg.synthesis, out / "synthesized"
    n = cfg.merged_images_per_style
    resolution = cfg.synthesis_resolution
    made_by = {
        "model": str(model_dir),
        "unet": files_checksum([model_dir / "unet"]),
        "styles": styles,
        "images_per_style": n,
        "sampler": [s.num_inference_steps, s.guidance_scale, s.negative_prompt, resolution],
        # the prompt file or the shards whose captions are the prompts, by content: by path alone, samples of a
        # prompt file edited since were kept and trained on
        "prompts": prompts_inputs(cfg),
        "seed": cfg.seed,
    }
    import pyarrow.fs as pafs

    from dmm_ray.data.fs import write_bytes_atomic

    record = folder / MERGED_SYNTH_RECORD
    try:
        recorded = json.loads(record.read_text())
    except (OSError, ValueError):  # none, or one a write cut short left (a full disk): not these samples' record
        recorded = None
    if folder.exists() and recorded != made_by:
        log(f"{folder} was sampled from another model or with other settings: sampling again")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # moved into place whole: written in place, a write cut short left an empty or torn record, and every later run
    # stopped on it with a bare JSONDecodeError
    write_bytes_atomic(pafs.LocalFileSystem(), str(record), json.dumps(made_by, indent=1).encode())
    t0 = time.time()
    log(f"sampling the merged model: {n} images x {len(styles)} styles ({s.num_inference_steps} DPM-Solver++ steps, CFG {s.guidance_scale})")
    dirs = synthesize_for(cfg, [MergedStyle(name=name, model=str(model_dir)) for name in styles], 0, folder, n)
    log(f"merged-model samples done in {time.time() - t0:.0f} s")
    return [dirs[i] for i in sorted(dirs)]


def build_fast_trainer(cfg: MergeConfig, model_dir: Path, datasets: dict, tracking: dict | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dmm_ray.data.stream import train_dataset_config
    from dmm_ray.distill.health import StopWithoutRetry, controller_callbacks
    from dmm_ray.fast.loop import train_fast_per_worker
    from dmm_ray.ray_session import train_run_options

    s, f = cfg.scaling, cfg.fast
    cpus = s.cpus_per_worker if isinstance(s.cpus_per_worker, (int, float)) else 1.0
    resources = {"CPU": cpus}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    from dmm_ray.fingerprint import fast_state_path

    state = fast_state_path(cfg, fast_dir(cfg).resolve())  # where the resume check looks
    return TorchTrainer(
        train_fast_per_worker,
        train_loop_config={"merge": cfg.model_dump(mode="json"), "model": str(model_dir), "tracking": tracking},
        scaling_config=ScalingConfig(num_workers=f.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=state.name,
            storage_path=str(state.parent),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[StopWithoutRetry()] if controller_callbacks() else None,  # an input error: no retries
            **train_run_options(),
        ),
        datasets=datasets,
        dataset_config=train_dataset_config(["train"], data_cpus=s.data_cpus),
    )


def save_fast_model(
    cfg: MergeConfig,
    model_dir: Path,
    checkpoint_dir: Path,
    dest: Path,
    tracking: dict | None = None,
    saved_by: str | None = None,
    trained_by: str | None = None,
    trained_from: str | None = None,
) -> Path:
    """The few-step DMMPipeline: the merged model's VAE, text encoder and tokenizer, its UNet with the
    LCM-LoRA fused in (lora) or the distilled UNet (full), the `fast.sampler` scheduler (TCD or LCM), sampler.json (4 steps, CFG
    off), the merge's dmm_merge.json / styles.json, fast.json; lora mode also keeps the LoRA alone in
    lcm_lora/. Written beside `dest`, verified to load, then swapped in. dmm_merge.json's MLflow run is
    the few-step stage's own (`tracking`: {"uri", "run_id"} of its stage run), none when it is untracked:
    an export of this model (jobs/export.py) is logged to the run that made and registered it, never to
    the merge's run, whose model it is not. So are its `SAVED_BY` (`saved_by`: saved_model_request of the run that
    saves it) and `TRAINED_BY` (`trained_by`: fingerprint.FAST_TRAINING_RUN of the state `checkpoint_dir` is of),
    which saved_by_this_training reads: the merged model's (its merge's) are left out. `trained_from`: the merged UNet's
    checksum when the training began (fast_inputs' model.unet.checksum): a model_dir that no longer holds it (a merge
    saved another model there meanwhile) is refused (check_trained_from) and nothing is saved."""
    import torch

    from dmm_ray.fast.loop import TRAINABLE, build_student, load_saved_ema, load_trainable_state, saved_ema_of
    from dmm_ray.fast.sampler import few_step_scheduler
    from dmm_ray.merged_model import SAVED_BY, TRAINED_BY
    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.output_lock import reading
    from dmm_ray.pipeline import SAMPLER_RECORD, dmm_pipeline_class, load_dmm_pipeline, sampler_defaults, sampler_record

    f = cfg.fast
    state = torch.load(checkpoint_dir / TRAINABLE, map_location="cpu", weights_only=False)
    # Every part read from model_dir below (UNet, VAE, text encoder, tokenizer, records) must be of the model the training
    # read, which a merge started after this job (jobs/fast.py checks merge.lock only at its start) may have replaced
    # since: a merge saving there now waits for these reads (output_lock.reading), one that saved before is refused.
    # The new model is staged: swapped in once written and verified; removed if anything fails first
    with reading(model_dir, job="few-step save"), staged(dest) as tmp:
        check_trained_from(cfg, model_dir, trained_from, dest)
        student, params = build_student(model_dir, f)
        load_trainable_state(student, state["student"], f)
        ema = saved_ema_of(params, f)
        if ema is not None:  # the EMA of the trained weights is what is saved
            load_saved_ema(ema, state, f"checkpoint {checkpoint_dir}")
            ema.copy_to(params)
        cls = dmm_pipeline_class(model_dir)
        if f.mode == "lora":
            from peft import get_peft_model_state_dict

            # PEFT-format keys: diffusers' load_lora_weights reads them back onto the merged model (the reference's
            # convert_state_dict_to_diffusers would write attention layers in the old lora.down/up form, which it then skips).
            # It reads them back at scale 1 (no alphas; the adapter metadata that could carry lora_alpha needs diffusers
            # >= 0.34), so lora_B holds the trained scale lora_alpha / lora_rank
            scale = (f.lora_alpha or f.lora_rank) / f.lora_rank
            layers = {k: v * scale if ".lora_B." in k else v for k, v in get_peft_model_state_dict(student).items()}
            cls.save_lora_weights(tmp / LORA_DIR, unet_lora_layers=layers, safe_serialization=True)
            student.fuse_lora()
            student.unload_lora()
        unet = StyleUNet.from_pretrained(model_dir / "unet")  # a clean StyleUNet (no PEFT state) with the distilled weights
        missing, unexpected = unet.load_state_dict(student.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"distilled UNet does not fit the merged one: missing {missing[:3]}, unexpected {unexpected[:3]}")
        pipe = cls.from_pretrained(
            str(model_dir),
            unet=unet,
            local_files_only=True,
            **({"safety_checker": None, "requires_safety_checker": False} if "XL" not in cls.__name__ else {}),
        )
        pipe.scheduler = few_step_scheduler(model_dir, f)
        scheduler_cls = type(pipe.scheduler)
        pipe.save_pretrained(tmp, safe_serialization=True)
        record = read_record(model_dir)
        record.pop("mlflow", None)  # the merge's run: this model's is the few-step stage run, if any
        if tracking and tracking.get("run_id"):
            record["mlflow"] = {"tracking_uri": tracking.get("uri"), "run_id": tracking["run_id"]}
        for key, value in ((SAVED_BY, saved_by), (TRAINED_BY, trained_by)):
            record.pop(key, None)  # the merge's, of the merged model
            if value:
                record[key] = value
        if record:
            (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=1))
        if (model_dir / STYLES_RECORD).is_file():
            shutil.copy2(model_dir / STYLES_RECORD, tmp / STYLES_RECORD)
        negative = sampler_defaults(model_dir)["negative_prompt"]  # the merged model's (matters only with CFG on)
        (tmp / SAMPLER_RECORD).write_text(
            json.dumps(sampler_record(f.num_inference_steps, f.guidance_scale, negative, scheduler=scheduler_cls.__name__), indent=1)
        )
        (tmp / FAST_RECORD).write_text(
            json.dumps(
                {
                    "method": "LCM (latent consistency distillation)" + (f" + {f.rollout_steps} rollout steps" if f.rollout_steps else ""),
                    "distilled_from": str(model_dir),
                    "steps": state["step"],
                    "fast": f.model_dump(mode="json"),
                },
                indent=1,
            )
        )
        pipe_check = load_dmm_pipeline(tmp)  # verify before it replaces anything
        if not isinstance(pipe_check.scheduler, scheduler_cls):
            raise RuntimeError(f"saved few-step model loads with {type(pipe_check.scheduler).__name__}, not {scheduler_cls.__name__}")
    return dest


def check_trained_from(cfg: MergeConfig, model_dir: Path, trained_from: str | None, dest: Path) -> None:
    """Refuse (output_lock.ModelReplacedError) to save a few-step model from the merged model `model_dir` when it no
    longer holds the UNet the training read (`trained_from`: its checksum then; None: nothing to compare): a merge saved
    another model there while the job trained. The save fused the LoRA trained on the replaced UNet into the new one's
    (fast.mode full: took the UNet trained from it), saved it with the new model's VAE, text encoder and records, and
    swapped that in for the earlier few-step model."""
    from dmm_ray import fingerprint
    from dmm_ray.output_lock import ModelReplacedError

    if not trained_from:
        return
    now = fingerprint.merged_unet_checksum(cfg, model_dir) if (Path(model_dir) / "unet").is_dir() else None
    if now == trained_from:
        return
    raise ModelReplacedError(
        f"the merged model {model_dir} is not the one this few-step job trained on (its UNet checksum was {trained_from}, "
        f"now {now or 'no UNet there'}): a merge replaced it while the job trained, and what the job trained fits the replaced "
        f"model, so nothing was saved ({dest} is "
        + ("still the earlier few-step model" if dest.exists() else "not written")
        + "). Run the job again with --restart: it distills the merged model now there (the training state kept here is of the replaced one)."
    )


def evaluate_fast(cfg: MergeConfig, model_path: Path, teachers: list, steps_list, out: Path, source=None, scheduler: str | None = None) -> dict:
    """FIDt of the few-step model at each step count against the merge's teachers, the teachers
    sampled as the merge's evaluation samples them (cached), the student at `steps` with its own CFG.
    `source`: a StudentSource to sample instead of the folder as saved (e.g. with another scheduler,
    named by `scheduler` for the provenance). Each fid_matrix.json names the model, its unet checksum
    and the teachers as a merge's evaluation does (evaluate_merge's own sources_provenance)."""
    from dmm_ray.evaluation.api import default_extractor, sources_provenance
    from dmm_ray.evaluation.matrix import evaluate_sources
    from dmm_ray.evaluation.outputs import format_table, write_outputs
    from dmm_ray.evaluation.sources import student_source, teacher_sources

    eval_cfg = cfg.evaluation
    made_by = sources_provenance(model_path, None, teachers, scheduler)  # once: it reads the unet for its checksum
    results = {}
    for steps in steps_list:
        student = FewStepStudent.wrap(source or student_source(model_path, eval_cfg.dtype), steps, cfg.fast.guidance_scale)
        result = evaluate_sources(student, teacher_sources(teachers, eval_cfg.dtype), eval_cfg, default_extractor(eval_cfg))
        result.provenance.update(made_by)
        result.files = write_outputs(result, out / f"evaluation_{steps}steps")
        log(
            f"few-step model at {steps} steps (guidance {cfg.fast.guidance_scale}): FIDt {result.fidt:.2f}, FIDt_ref {result.fidt_ref:.2f}, ratio {result.ratio:.3f}"
        )
        print(format_table(result), flush=True)
        results[steps] = result
    return results


from dmm_ray.evaluation.matrix import FewStepStudent  # noqa: E402  (torch-free; its home: jobs/evaluate.py samples a few-step model with it too)


def log_fast_evaluations(tracker, evaluations: dict, default_steps: int) -> None:
    """The few-step model's evaluations on its stage run: `FIDt_<n>steps` and `FIDt_ratio_<n>steps`
    and the files under `evaluation_<n>steps/` for each step count; `FIDt`, `FIDt_ref`, `FIDt_ratio` and
    the `fid_diag/<style>` metrics for `default_steps` (the steps the model samples at, as its version's
    tags) alone, without a step, as a merge's run logs them. They were logged once per step count at
    step = the count, and MLflow's runs table, bar charts and compare view show a metric's value at its
    highest step: the FIDt of the largest count (8), not of the model's own 4 steps, beside the merges'."""
    for steps, ev in evaluations.items():
        if steps == default_steps:
            tracker.log_evaluation(ev, artifact_path=f"evaluation_{steps}steps")
        else:
            tracker.log_evaluation_files(ev, artifact_path=f"evaluation_{steps}steps")
        tracker.log_metrics({f"FIDt_{steps}steps": ev.fidt, f"FIDt_ratio_{steps}steps": ev.ratio})


def trained_line(metrics: dict, loss_name: str, seconds: float) -> str:
    """The log line after training. A re-run of a finished stage trains nothing (resumed_from = step)
    and has no loss: it said 'trained 10 steps ... (loss_rollout nan)'."""
    step, start = metrics.get("step"), metrics.get("resumed_from") or 0
    if start and start == step:
        return f"resumed at its last step ({step}): nothing left to train"
    resumed = f" (resumed from step {start})" if start else ""
    return f"trained {step} steps{resumed} in {seconds:.0f} s ({loss_name} {metrics.get(loss_name, float('nan')):.4f})"


def run_fast(
    cfg: MergeConfig,
    model_dir: str | Path,
    tracker=None,
    evaluate: bool = True,
    restart: bool = False,
    merge_saved_model: bool = False,
    untracked: str | None = None,
    requested: MergeConfig | None = None,
) -> FastResult:
    """The whole stage on the connected (or a new local) Ray: train, save, evaluate, register.
    Training state in the output folder resumes only when it was made from the same model with the
    same settings (dmm_ray.fingerprint.check_fast_resume); `restart` discards it first. One few-step
    job per folder at a time (its `fast.lock`, dmm_ray/output_lock.py): a second one refuses.
    `merge_saved_model`: the stage of the merge that saved `model_dir` (dmm_ray.merge.fast_stage). State of its
    settings made from an earlier model there, which that merge replaced, is discarded, not refused: the merge
    compared every other input before it started, and a refusal now came after the whole merge, on a model
    that no longer exists, and stopped every re-run of the merge command in the same place. `untracked`: why the run
    has no tracker where it should have one (the merge's store failed in its track stage): the run is not recorded
    complete, so the same command, once the store answers, logs its model (as after its own store's failure).
    `requested`: `cfg` as given, where `cfg` holds the cluster plan's resources (a merge's stage: scaling.cpus_per_worker
    `auto` resolved): what its completion record and its saved model's record take, as the merge's own records take
    the config as given. With the planned number they depended on the cluster's size, and the merge's --dry-run, which plans no
    cluster, could not tell that a re-run finds its few-step model saved or finished."""
    from dmm_ray import output_lock

    started = time.time()
    model_dir = require_local_model(model_dir).resolve()
    styles, _, encode_plan = check_before_ray(cfg, model_dir)
    out = fast_dir(cfg).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with output_lock.hold(out, warn=log, name=FAST_LOCK, job="few-step job", what=f"the few-step folder {out}", fix=FAST_LOCK_FIX):
        return _run_fast(
            cfg, model_dir, styles, out, tracker, evaluate, restart, started, merge_saved_model, encode_plan, untracked, requested or cfg
        )


def _fast_request(cfg: MergeConfig, model_dir: Path, inputs: dict, evaluate: bool) -> dict:
    """What decides a few-step run's result, as its completion record compares it."""
    return {"config": cfg.model_dump(mode="json"), "model": str(model_dir), "inputs": inputs, "evaluate": evaluate}


def saved_model_request(asked: dict) -> str:
    """What a few-step model records of the run that saved it (dmm_ray.merged_model.SAVED_BY): the sha256 of its request
    (`_fast_request`) without what only the evaluation reads (`evaluate`, the evaluation: section, fast.eval_steps),
    as the merge's saved_model_request leaves out its evaluation: a re-run whose evaluation was changed (or failed)
    still finds its saved model; nor fast.output_dir and fast.enabled, as the completion record is compared
    (fingerprint.in_its_folder): jobs/fast.py on a merge's model with its config finds the model the merge's few-step
    stage saved (it trained and saved it again when the stage had evaluated and the job did not, or the other way round);
    nor the tracking: section, which only says where the model is logged (a --no-track run after a tracked one trained
    and saved it again, and the next tracked run registered a second version)."""
    from dmm_ray import fingerprint
    from dmm_ray.merged_model import request_sha256, request_without

    return request_sha256(fingerprint.in_its_folder(request_without(_saved_model_fields(asked), ("tracking",))))


def _saved_as_before(asked: dict) -> str:
    """SAVED_BY as a dmm-ray before saved_model_request left out fast.output_dir, fast.enabled and tracking: recorded it: a
    model it saved is still this request's (its run stopped between the save and its record, or another evaluation asked now)."""
    from dmm_ray.merged_model import request_sha256

    return request_sha256(_saved_model_fields(asked))


def _saved_model_fields(asked: dict) -> dict:
    from dmm_ray.merged_model import request_without

    request = request_without({k: v for k, v in asked.items() if k != "evaluate"}, ("evaluation",))
    config = request["config"]
    fast = {k: v for k, v in config["fast"].items() if k != "eval_steps"}
    return {**request, "config": {**config, "fast": fast}}


def saved_by_this_training(out: Path, asked: dict, saved_by: str | None = None) -> bool:
    """The few-step model in `out` is the one a run of this request (`asked`, `_fast_request`) saves: it records its
    `saved_model_request` (`saved_by`, when the caller has it already) or the hash an earlier dmm-ray recorded
    (`_saved_as_before`), and the training state in `out` now (its fingerprint.FAST_TRAINING_RUN), as
    dmm_ray.merge.saved_by_this_training finds a merged model. Saved by a run of this request killed between its
    save's swap and its completion record, or by a finished run whose request differs only in what the saved model
    does not depend on (its evaluation: `jobs/fast.py --no-eval`, then without it). Training again (resumed at its
    last step) only saved the same model again, and registered it again. A --restart killed before its save left the
    model of the training before it, of the same config: another FAST_TRAINING_RUN (the restart discarded that
    one), so False, and the re-run trains."""
    from dmm_ray import fingerprint
    from dmm_ray.merged_model import saved_from

    trained_by = fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN)
    hashes = (saved_by or saved_model_request(asked), _saved_as_before(asked))
    return any(saved_from(out / "model", request, trained_by) for request in hashes)


def _saved_with_the_plan(planned: MergeConfig, model_dir: Path, out: Path, inputs: dict, evaluate: bool) -> bool:
    """saved_by_this_training for a model saved by a merge's few-step stage of a dmm-ray whose records took the config
    with the cluster plan's resources (`planned`: scaling.cpus_per_worker `auto` resolved), not as given: its SAVED_BY
    is that request's hash, which the request as given never equals (a hash: not comparable as same_request compares
    such a completion record). Without this, such a stage stopped between its save and its record trained, saved and
    registered its model again once. A dry run, which plans no cluster, cannot find it: it says the stage trains."""
    return saved_by_this_training(out, _fast_request(planned, model_dir, inputs, evaluate))


def _saved_line(out: Path) -> str:
    why = (
        "a finished run of this training saved it, with other evaluation settings or as a merge's few-step stage"
        if (out / COMPLETE_RECORD).is_file()
        else "the run was stopped before it recorded that it finished"
    )
    return (
        f"this few-step run, with this model and config, already saved its few-step model ({out / 'model'}; its dmm_merge.json "
        f"says so: {why}), so the training and the save are skipped; the evaluation and the registration run where asked. "
        "--restart trains again"
    )


def _complete_line(out: Path, done: dict) -> str:
    return (
        f"already complete: this few-step stage, with this model and config, finished in {out}"
        + (f" (registered: {done['model_uri']})" if done.get("model_uri") else "")
        + "; nothing to do. --restart trains again"
    )


def check_before_run(cfg: MergeConfig, model_dir: str | Path, evaluate: bool = True, restart: bool = False) -> list[str]:
    """jobs/fast.py --dry-run, after check_before_ray: what run_fast would find in its folder before it trains,
    nothing written. Raises what it would refuse with: the folder's fast.lock held by a running few-step job (or
    one on another host; output_lock.OutputDirBusyError naming it), training state from another model or with
    other settings (fingerprint.check_fast_resume, without `restart`, which discards it). Returns the lines the
    run would log about the folder: a stale lock it would take over, the model.old a killed save left that it
    would put back (and the leftovers it would remove), and that it is complete (nothing to do) or saved its
    model already (saved_by_this_training: only the evaluation and registration run)."""
    from dmm_ray import fingerprint, output_lock

    model_dir, out = Path(model_dir).resolve(), fast_dir(cfg).resolve()
    lines = [
        line for line in [output_lock.check(out, name=FAST_LOCK, job="few-step job", what=f"the few-step folder {out}", fix=FAST_LOCK_FIX)] if line
    ]
    lines += recover(out / "model", marker=FAST_RECORD, dry_run=True)  # model.old a killed save left: _run_fast puts it back first
    if restart:  # the run forgets the completion record and discards the state first: it trains from the start
        return lines
    recorded = (out / COMPLETE_RECORD).is_file()
    # the inputs read the merged UNet for its checksum: once, for every comparison, where there is a finished run or
    # training state its saved model could be of to compare with; without either, check_fast_resume reads them only
    # where there is state
    has_run = recorded or fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN) is not None
    inputs = fingerprint.fast_inputs(cfg, model_dir) if has_run else None
    fingerprint.check_fast_resume(cfg, model_dir, out, inputs)
    if inputs is None:
        return lines
    return lines + _found_done(cfg, model_dir, out, inputs, evaluate)


def _finished_here(cfg: MergeConfig, asked: dict, out: Path) -> dict | None:
    """The completion record in `out` of a few-step run that finished with `asked` (its model still there), compared
    as fingerprint.same_request does (earlier checksum rules, the planned cpus_per_worker of older records); None
    otherwise. One home for _run_fast and the dry runs (_found_done), which must agree."""
    from dmm_ray import fingerprint
    from dmm_ray.completion import finished

    return finished(
        out, COMPLETE_RECORD, asked, [out / "model" / "model_index.json"], same=lambda recorded, now: fingerprint.same_request(recorded, now, cfg)
    )


def _found_done(cfg: MergeConfig, model_dir: Path, out: Path, inputs: dict, evaluate: bool) -> list[str]:
    """The line _run_fast logs about its folder `out` before it would train (after any state it discards): this
    request finished there (nothing to do), or its model saved there (saved_by_this_training: only the evaluation
    and registration run); [] when it trains. For the dry runs (both jobs'), which print what the run then does."""

    asked = _fast_request(cfg, model_dir, inputs, evaluate)
    done = _finished_here(cfg, asked, out)
    if done is not None:
        return [_complete_line(out, done)]
    return [_saved_line(out)] if saved_by_this_training(out, asked) else []


def check_merge_stage_before_run(fast_cfg: MergeConfig, model_dir: str | Path, evaluate: bool) -> list[str]:
    """jobs/merge.py --dry-run of a merge that runs only its stages after the save (dmm_ray.merge.resume_point): what
    its few-step stage (_run_fast with merge_saved_model, on the saved merged model `model_dir`) would find in its
    folder, nothing written. `fast_cfg`: dmm_ray.merge.fast_stage_config. Returns the lines the stage would log: the
    training state of an earlier merged model it removes (it then trains from the start), or that it finished
    already (nothing to do) or saved its model already (no training, no save); [] when it trains. The dry run said
    only that the stage runs, and the run then skipped the training, or did nothing."""
    from dmm_ray import fingerprint

    model_dir, out = Path(model_dir).resolve(), fast_dir(fast_cfg).resolve()
    # the inputs read the merged UNet for its checksum: only where there is a finished run, a saved model's training
    # state or training state to compare them with (check_before_run's rule)
    has_run = (out / COMPLETE_RECORD).is_file() or fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN) is not None
    if not has_run and not fingerprint.fast_state_path(fast_cfg, out).exists():
        return []
    inputs = fingerprint.fast_inputs(fast_cfg, model_dir)
    earlier = fingerprint.fast_state_of_a_replaced_model(fast_cfg, out, inputs)
    if earlier is not None:  # _run_fast removes it, and with it the completion record and the training's id: it trains
        return [
            f"{out} holds the training state of a few-step run from an earlier merged model at {model_dir} (UNet checksum "
            f"{earlier}, now {inputs['model.unet.checksum']}), which the merge replaced: a run would remove it and train from the start"
        ]
    return _found_done(fast_cfg, model_dir, out, inputs, evaluate)


def _run_fast(
    cfg: MergeConfig,
    model_dir: Path,
    styles: list[str],
    out: Path,
    tracker,
    evaluate: bool,
    restart: bool,
    started: float,
    merge_saved_model: bool = False,
    encode_plan=None,  # check_before_ray's, for ensure_latents
    untracked: str | None = None,
    requested: MergeConfig | None = None,  # run_fast's (the config its records take)
) -> FastResult:
    import ray

    from dmm_ray import fingerprint
    from dmm_ray.completion import forget, record_finished

    # a save killed between its two renames (merged_model.swap_in) left the last good few-step model only as
    # model.old: put it back first, as the merge does for merged/ (recover_merged), whatever this run does next
    for line in recover(out / "model", marker=FAST_RECORD):
        log(line)
    if restart:
        forget(out, COMPLETE_RECORD)
        removed = fingerprint.discard_fast_state(cfg, out)
        if removed:
            log(f"--restart: removed {', '.join(str(p.relative_to(out)) for p in removed)} from {out}")
    inputs = fingerprint.fast_inputs(cfg, model_dir)  # once: it reads the merged UNet for its checksum
    earlier = fingerprint.fast_state_of_a_replaced_model(cfg, out, inputs) if merge_saved_model else None
    if earlier is not None:
        forget(out, COMPLETE_RECORD)
        removed = fingerprint.discard_fast_state(cfg, out)
        log(
            f"{out} held the training state of a few-step run from an earlier merged model at {model_dir} (UNet checksum "
            f"{earlier}, now {inputs['model.unet.checksum']}), which the merge replaced: removed "
            + ", ".join(str(p.relative_to(out)) for p in removed)
            + "; training from the start"
        )
    fingerprint.check_fast_resume(cfg, model_dir, out, inputs)  # before anything slow
    asked = _fast_request(requested or cfg, model_dir, inputs, evaluate)
    done = _finished_here(cfg, asked, out)
    if done is not None:  # the same job submitted again: no second save, evaluation or model version
        log(_complete_line(out, done))
        return FastResult(model_path=out / "model", model_uri=done.get("model_uri"), already_complete=True)
    # killed between its save's swap and its completion record (or after its registration): evaluate and register
    # the saved model; training again (resumed at its last step) saved it again and registered a second version
    saved_by = saved_model_request(asked)  # what the saved model records of this run: compared here, recorded by the save
    saved = saved_by_this_training(out, asked, saved_by) or (
        requested is not None and requested != cfg and _saved_with_the_plan(cfg, model_dir, out, inputs, evaluate)
    )
    said = _saved_line(out) if saved else None  # (before the record it may name is forgotten)
    forget(out, COMPLETE_RECORD)  # from here on, the folder's model may change
    f = cfg.fast
    if saved:
        log(said)
    else:
        log(
            f"LCM distillation of {model_dir} ({len(styles)} styles: {', '.join(styles)}): mode {f.mode}"
            + (f" rank {f.lora_rank}" if f.mode == "lora" else "")
            + f", {f.steps} steps x {f.num_workers} worker(s) x batch "
            f"{f.batch_size or cfg.data.stream.batch_size}, DDIM solver over {f.num_ddim_timesteps} timesteps"
            + (f" ({f.solver_substeps} sub-steps per skip)" if f.solver_substeps > 1 else "")
            + ", teacher CFG "
            + (f"{f.guidance_min}" if f.guidance_min == f.guidance_max else f"U[{f.guidance_min}, {f.guidance_max}]")
            + (
                f", then {f.rollout_steps} rollout steps through its own sampler at " + " / ".join(str(n) for n in f.rollout_step_counts) + " steps"
                if f.rollout_steps
                else ""
            )
            + f" -> {out}/model"
        )
    we_started_ray = init_for_training(cfg.scaling.ray_address)
    try:  # a run that fails leaves no private Ray behind it either
        if not saved:
            ensure_latents(cfg, job="fast", plan=encode_plan)
        record = read_record(model_dir)
        tracking = None
        if tracker is not None:
            # its runs are its folder's, as its fast.lock; the params in start_stage, which ends its runs if they fail
            tracking = tracker.start_stage("fast", cfg, output=out, params={"fast_source_model": str(model_dir)})
        try:
            result = FastResult(model_path=out / "model")
            if saved:  # the steps it was trained for, from its fast.json (its curves stay in the run that trained it)
                steps = json.loads((result.model_path / FAST_RECORD).read_text()).get("steps", 0)
            else:
                steps = _train_and_save(cfg, model_dir, styles, out, inputs, result, tracking, saved_by, merge_saved_model)
            if evaluate and f.eval_steps:
                # the teachers of the merged model it was saved from, as its own dmm_merge.json keeps them: model_dir may
                # hold another model by now (a merge that saved there after this job's save)
                result.evaluations = evaluate_fast(cfg, result.model_path, teachers_of(cfg, result.model_path), f.eval_steps, out)
            result.seconds = time.time() - started
            if tracker is not None and tracker.enabled:
                try:
                    log_fast_evaluations(tracker, result.evaluations, f.num_inference_steps)
                    measured = {"fast/train_seconds": result.train_seconds} if not saved else {}
                    tracker.log_metrics({**measured, "fast/steps": float(steps), "seconds": result.seconds})
                    default = result.evaluations.get(f.num_inference_steps)
                    # the merged model's version tags (dmm.stage, styles, path, FIDt): without them the Models
                    # page cannot tell this version from the merged model's of the same registered name
                    version = {
                        "description": f"few-step (LCM {f.mode}) model of {record.get('name', model_dir.name)}: "
                        f"{f.num_inference_steps} steps, CFG off" + (f", FIDt {default.fidt:.2f}" if default else ""),
                        "tags": version_record("fast", result.model_path, default)["tags"],
                    }
                    # registered by the run that saved it (its dmm_merge.json names that run): that version, which keeps its own
                    # description and tags where this run measured nothing (a --no-eval re-run wrote a description without FIDt)
                    earlier = version if result.evaluations or not saved else {}
                    result.model_uri = tracker.complete_earlier_registration(result.model_path, **earlier) or tracker.log_merged_model(
                        result.model_path, **version
                    )
                    tracker.close()
                    log(f"registered: {result.model_uri}")
                except Exception as error:  # noqa: BLE001 - MLflow is an observer: a store that fails now undoes none of the work
                    # (it failed the job after the save and the evaluation); its runs end FAILED where the store still takes that
                    tracker.abort(error)
                    text = str(error).strip()
                    result.tracking_failed = (
                        f"the few-step model is saved ({result.model_path}) but MLflow could not log it to {tracker.config.tracking_uri} "
                        f"({type(error).__name__}: {text.splitlines()[0] if text else 'no message'}). Once the store answers, re-run "
                        "the same command: it takes the saved model as it is (nothing is trained or saved again), evaluates and logs it"
                    )
                    log(f"warning: {result.tracking_failed}")
        except BaseException as error:
            if tracker is not None and hasattr(tracker, "abort"):
                tracker.abort(error)  # FAILED, or KILLED when interrupted (re-running resumes); the last good model stays
            raise
        result.tracking_failed = result.tracking_failed or untracked
        if not result.tracking_failed:  # else no record: the same command logs the model (it takes the saved one as it is)
            record_finished(out, COMPLETE_RECORD, asked, model_uri=result.model_uri)
    finally:
        if we_started_ray:
            ray.shutdown()
    return result


def _train_and_save(
    cfg: MergeConfig,
    model_dir: Path,
    styles: list[str],
    out: Path,
    inputs: dict,
    result: FastResult,
    tracking: dict | None,
    saved_by: str,
    merge_saved_model: bool = False,
) -> int:
    """_run_fast's training (on the Ray it started) and the save of its model into `result.model_path`, recording
    `saved_by` (saved_model_request of the run) and the training state's id (saved_by_this_training reads them);
    `result` gets the training's metrics and time. Returns the steps trained. `merge_saved_model`: the stage of the
    merge that saved `model_dir` and holds its output_dir's lock meanwhile, so no other merge replaced it: the save
    does not hash the merged UNet again to compare (check_trained_from)."""
    from dmm_ray import fingerprint
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.distill.trainer import fit_stage

    f, t0 = cfg.fast, time.time()
    datasets = {"train": build_latent_dataset(cfg.data)}
    merged_sets = merged_synthesized_sets(cfg, model_dir, styles, out) if f.samples_merged_model else None
    if f.synthetic_fraction > 0:
        shards = merged_sets if f.synthetic_source == "merged" else synthesized_shards(cfg, model_dir)
        datasets["synth"] = build_latent_dataset(cfg.data, shards=shards)
    if f.rollout_steps:  # the rollout pairs: the merged model's own samples, whose noise the seeds give back
        datasets["rollout"] = build_latent_dataset(cfg.data, shards=merged_sets)
    fingerprint.record_fast(cfg, model_dir, out, inputs)  # (draws the folder's FAST_TRAINING_RUN when it has none)
    trained = fit_stage(build_fast_trainer(cfg, model_dir, datasets, tracking=tracking and {**tracking, "prefix": "fast/"}))
    result.train_metrics, result.train_seconds = dict(trained.metrics), time.time() - t0
    log(trained_line(trained.metrics, "loss_rollout" if f.rollout_steps else "loss_lcm", result.train_seconds))
    with trained.checkpoint.as_directory() as folder:
        save_fast_model(
            cfg,
            model_dir,
            Path(folder),
            result.model_path,
            tracking=tracking,
            saved_by=saved_by,
            trained_by=fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN),
            trained_from=None if merge_saved_model else inputs["model.unet.checksum"],
        )
    log(f"few-step model saved: {result.model_path} ({f.sampler.upper()} sampler, {f.num_inference_steps} steps, guidance {f.guidance_scale})")
    return int(trained.metrics.get("step", 0))


class OwnSampler:
    """A pipeline that samples with fixed steps and guidance whatever the caller asks for (the
    few-step model in studies whose sampler settings are shared with the teachers, e.g.
    jobs/style_mixing.py --student-steps). Picklable factory: `OwnSampler.factory(f, steps, g)`."""

    def __init__(self, pipe, steps: int, guidance: float):
        self.pipe, self.steps, self.guidance = pipe, steps, guidance

    @classmethod
    def factory(cls, pipeline_factory, steps: int, guidance: float):
        from functools import partial

        return partial(_own_sampler, pipeline_factory, steps, guidance)

    def to(self, *args, **kwargs) -> "OwnSampler":
        self.pipe = self.pipe.to(*args, **kwargs)
        return self

    def __call__(self, *args, **kwargs):
        kwargs.update(num_inference_steps=self.steps, guidance_scale=self.guidance)
        return self.pipe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def _own_sampler(pipeline_factory, steps: int, guidance: float) -> OwnSampler:
    return OwnSampler(pipeline_factory(), steps, guidance)

"""One validated config tree for a merge (YAML + `--set a.b=value` overrides).

Every section forbids unknown keys and checks impossible values when the file is loaded, so a
typo or a bad layout fails at once with the key's dotted name, never inside a Ray worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmm_ray import paths
from dmm_ray.data.config import DataConfig
from dmm_ray.defaults import PAPER_GUIDANCE, PAPER_STEPS, SD_ADAPTER_TARGETS, timestep_targets_problem
from dmm_ray.evaluation.config import EvalConfig, resolve_eval_paths  # the evaluation section (a leaf: no torch)
from dmm_ray.fast.config import FastConfig  # the few-step stage (issue 19)
from dmm_ray.teachers import TeacherSpec


def registered_name_problem(name: str) -> str | None:
    """Why MLflow's registry would refuse `name` (its rule, `mlflow.utils.validation._validate_model_name`:
    not empty, no '/' or ':'), or None."""
    if not isinstance(name, str) or not name.strip():
        return "a registered model name must be a non-empty string"
    bad = [c for c in "/:" if c in name]
    return f"{name!r} contains {' and '.join(repr(c) for c in bad)}, which MLflow's model registry does not allow in a name" if bad else None


class TrackingConfig(BaseModel):
    """The `tracking:` section: where MLflow runs and the model registry live (dmm_ray/tracking.py logs there).

    In a merge config (`MergeConfig.tracking`), `project` and `registered_model_name`, when left
    unset, take the merge's `name` instead of the defaults below."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
    shorthand_keys: ClassVar[tuple[str, ...]] = ("uri",)  # `_uri_shorthand`: offered by an unknown key's hint too

    enabled: bool = True
    tracking_uri: str = Field(
        default_factory=paths.default_tracking_uri, description="any MLflow tracking URI; default: sqlite:///$DMM_HOME/mlflow.db"
    )
    registry_uri: str | None = Field(None, description="model registry URI (default: the tracking URI)")
    experiment: str = "dmm-ray"
    project: str = Field("dmm-merge", description="parent run name; one parent run per merge project")
    registered_model_name: str | None = Field("dmm-merged", description="register logged merged models under this name; None: log only")
    artifact_location: str | None = Field(None, description="artifact root for a newly created experiment (default: MLflow's)")

    @model_validator(mode="before")
    @classmethod
    def _uri_shorthand(cls, data: Any) -> Any:
        """`uri:` is short for `tracking_uri:` (the merge config's `tracking:` section)."""
        if isinstance(data, dict) and "uri" in data:
            data = dict(data)
            if data.get("tracking_uri") not in (None, data["uri"]):  # which one was meant cannot be told: the file's, or a --set's
                raise ValueError(
                    f"tracking.uri ({data['uri']!r}) and tracking.tracking_uri ({data['tracking_uri']!r}) are both given; "
                    "uri is short for tracking_uri: give one (e.g. --set tracking.uri=... over a file that sets uri)"
                )
            data["tracking_uri"] = data.pop("uri")
        return data

    @field_validator("project")
    @classmethod
    def _searchable(cls, project: str) -> str:
        if "'" in project and '"' in project:  # the project run is found by an MLflow filter on it (tracking.filter_literal)
            raise ValueError(f"{project!r} holds both ' and \"; MLflow's run search cannot match such a name: drop one of them")
        if project.endswith("\\"):  # its filter's grammar reads \' as a quote inside the literal: the search was a parse error
            raise ValueError(f"{project!r} ends with \\, which MLflow's run search reads as escaping the closing quote: drop it")
        return project

    @field_validator("registered_model_name")
    @classmethod
    def _registrable(cls, name: str | None) -> str | None:
        if name is not None and (problem := registered_name_problem(name)):
            raise ValueError(problem)
        return name

    @field_validator("tracking_uri", "registry_uri")
    @classmethod
    def _absolute_sqlite(cls, uri: str | None) -> str | None:
        """A relative `sqlite:///mlflow.db` is relative to the current directory (a config file's
        relative store was already resolved against its folder by load_config); Ray workers run
        elsewhere, so pin it to an absolute path once, on the driver."""
        return paths.resolve_tracking_uri(uri)

    @model_validator(mode="after")
    def _artifacts_beside_sqlite(self) -> "TrackingConfig":
        # MLflow's default artifact root is relative to the cwd of whoever creates the experiment
        # (inside a Ray job's temporary working_dir): keep artifacts beside the SQLite file instead.
        if self.artifact_location is None and self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///") :])
            self.artifact_location = (db.parent / "mlartifacts").as_uri()
        return self


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StyleAdaptersConfig(_Section):
    """Per-style low-rank adapters (extension, not in the paper; dmm_ray/models/style_adapters.py)."""

    rank: int = Field(0, ge=0, description="rank r of each style's delta on every target layer; 0 switches adapters off")
    init: Literal["svd", "zero"] = Field(
        "svd", description="svd: style i starts at the best rank-r approximation of teacher i's weight delta (LoRA extraction); zero: at the base"
    )
    targets: list[str] = Field(
        default_factory=lambda: list(SD_ADAPTER_TARGETS),  # dmm_ray/defaults.py; PEFT's target_modules rule
        description="Linear/Conv2d module names (or name suffixes) that get per-style adapters; not the timestep embedding's",
    )

    @field_validator("targets")
    @classmethod
    def _targetable(cls, targets: list[str]) -> list[str]:
        problem = timestep_targets_problem(targets)
        if problem:
            raise ValueError(problem)
        return targets

    @model_validator(mode="after")
    def _targets_for_a_rank(self) -> "StyleAdaptersConfig":
        # no target is no layer: the memory plan and --dry-run passed it, and the student refused it only
        # inside the distill workers (StyleUNet.from_unet), after Ray started and the latents were encoded
        if self.rank and not self.targets:
            raise ValueError(
                f"targets is [], so rank {self.rank} adapts no layer; list the layers (leave targets out for the default, "
                f"{', '.join(SD_ADAPTER_TARGETS)}), or set rank: 0 to switch the adapters off"
            )
        return self


class StudentConfig(_Section):
    base: Optional[str] = Field(None, description="student base diffusers folder (SD1.5/SDXL architecture); default: the zoo's base")
    codebook_seed: int = Field(0, description="seed of the style codebook's random initialisation")
    style_init: Literal["random", "zero"] = Field(
        "random",
        description="random: PyTorch default init of the style MLP (the reference code); zero: its last linear starts at 0, "
        "so the student starts exactly at the base output (pair it with distill.style_lr_mult)",
    )
    style_film: bool = Field(
        False,
        description="extension (not in the paper): a zero-initialised per-ResNet-block scale and "
        "shift from the style vector, on top of the time-embedding injection",
    )
    style_adapters: StyleAdaptersConfig = Field(default_factory=StyleAdaptersConfig)


class DistillConfig(_Section):
    steps: int = Field(1000, ge=0, description="optimizer steps of score distillation (paper: 100k)")
    lr: float = Field(1e-5, gt=0, description="student AdamW learning rate (paper 1e-5)")
    disc_lr: float = Field(1e-5, gt=0, description="discriminator AdamW learning rate (paper 1e-5)")
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    score: bool = Field(True, description="score distillation MSE(eps_S, eps_T) (eq. 9)")
    score_weighting: Literal["eps", "v"] = Field(
        "eps",
        description="per-timestep weight of the score MSE: eps (paper: uniform) "
        "or v (weight 1/alpha_bar_t, the error of the v / x0 estimate the sampler steps "
        "with, clipped at score_weight_clip, normalised to mean 1 over t)",
    )
    score_weight_clip: float = Field(20.0, ge=1, description="upper clip of the v weighting 1/alpha_bar_t (t near T reaches ~200)")
    lambda_feat: float = Field(0.001, ge=0, description="feature imitation weight (eq. 10); 0 switches it off")
    lambda_adv: float = Field(0.01, ge=0, description="multi-class adversarial weight (eq. 11); 0 switches it and the discriminator off")
    mixture_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="extension (paper 4.5 mixes styles by e~ = sum w_i e_i but never trains it): each step a worker hosting "
        "k >= 2 teachers adds this share of its rows as mixture rows, drawn from its styles' synthesized samples, with random "
        "weights w over 2..k of its styles, distilled towards sum_j w_j eps_j of its teachers; 0 switches it off",
    )
    renoise_max_timestep: int = Field(500, gt=0, le=1000, description="discriminator inputs are re-noised at t' < this (A.2)")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="lr after warmup: constant (paper), cosine or linear decay to 0"
    )
    warmup_steps: int = Field(0, ge=0, description="linear lr warmup from 0 over this many steps")
    style_lr_mult: float = Field(1.0, gt=0, description="lr multiplier of the style codebook and MLP (the only new parameters)")
    ema_decay: Optional[float] = Field(None, gt=0, lt=1, description="keep an EMA of the student (e.g. 0.999); saved as the merged model")
    ema_warmup: bool = Field(True, description="EMA decay ramps up as 1 - (1 + step)^-3/4 until ema_decay (short runs)")
    bf16: bool = Field(True, description="student (and discriminator) in fp32 master weights with bf16 autocast on GPU workers (ignored on CPU)")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the frozen teachers (UNets and text encoders) are loaded and run in; bfloat16/float16 "
        "halve their memory (their outputs are cast back to float32 for the losses)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the student UNet's block activations in the backward "
        "pass (diffusers enable_gradient_checkpointing): less activation memory, ~30% more compute",
    )
    optimizer: Literal["adamw", "adamw_fused", "adamw8bit"] = Field(
        "adamw",
        description="adamw (torch), adamw_fused (torch fused kernel), adamw8bit (bitsandbytes AdamW8bit: 2 bytes of "
        "state per parameter instead of 8; needs bitsandbytes installed on the workers)",
    )
    checkpoint_every: int = Field(100, gt=0, description="ray.train.report a checkpoint every K steps")
    log_every: int = Field(10, gt=0, description="log losses to MLflow every K steps (rank 0)")
    fail_at_step: Optional[int] = Field(None, description="testing only: kill worker 1 once at this step (fault-tolerance test)")


class ScalingSection(_Section):
    workers_per_teacher: int = Field(1, ge=1, description="k: W = N*k workers, worker r hosts teacher r mod N")
    num_workers: Optional[int] = Field(None, ge=1, description="explicit W (must be N*k, +1 with incremental regularisation)")
    use_gpu: bool = False
    cpus_per_worker: float | Literal["auto"] = Field(
        1.0,
        description="CPUs Ray reserves per Train worker; auto: the cluster's CPUs minus data_cpus, shared equally "
        "by the workers (planned in dmm_ray.resources before Ray Train starts)",
    )
    data_cpus: float = Field(
        1.0,
        ge=1,
        description="CPUs left free for Ray Data (shard reads, tokenisation: 1 CPU per task) "
        "while Train workers run; the merge refuses to start when the cluster cannot keep them free",
    )
    torch_threads: Optional[int] = Field(None, ge=1, description="torch threads per worker (default: cpus_per_worker rounded, at least 1)")
    teachers_per_worker: int = Field(
        1, ge=1, description="k teachers on one worker; each step every teacher gets its own batch of its style (W = ceil(N/k) * workers_per_teacher)"
    )
    teacher_offload: bool = Field(
        False,
        description="keep full (non-LoRA) teachers in CPU RAM and copy each to the device "
        "for its sub-batch (on GPU the next one is prefetched on a side stream): device memory "
        "holds 2 teacher UNets instead of k",
    )
    share_lora_base: bool = Field(
        True,
        description="LoRA teachers of one base on a worker load the base ONCE plus one named "
        "PEFT adapter each, switched per sub-batch (false: each LoRA fused into its own copy)",
    )
    gpu_memory_gb: Optional[float] = Field(
        None,
        gt=0,
        description="memory of one worker's accelerator; the memory planner "
        "(jobs/merge.py --dry-run, and every run) refuses a layout that will not fit",
    )
    gpus_per_worker: float = Field(1.0, ge=0)
    check_resources: bool = Field(
        True,
        description="refuse a layout the cluster cannot hold (needed vs available CPUs/GPUs) "
        "before Ray Train starts; false on an autoscaling cluster whose nodes join on demand",
    )
    max_failures: int = Field(2, ge=-1, description="FailureConfig: restarts from the last checkpoint (-1 = unlimited)")
    ray_address: Optional[str] = Field(None, description="ray.init address; default: RAY_ADDRESS or a local Ray")

    @field_validator("cpus_per_worker")
    @classmethod
    def _positive_cpus(cls, v):
        if v != "auto" and not 0 < v < float("inf"):  # (not `v <= 0`: NaN passes that)
            raise ValueError(f"must be > 0 or 'auto', got {v}")
        return v


class SynthesisConfig(_Section):
    enabled: bool = True
    images_per_teacher: int = Field(1500, ge=1, description="paper: 1.5k per teacher")
    prompts: Optional[str] = Field(None, description="prompt file (txt or COCO captions json); default: training captions")
    num_inference_steps: int = Field(PAPER_STEPS, ge=1)
    guidance_scale: float = Field(PAPER_GUIDANCE, ge=0)
    negative_prompt: Optional[str] = Field(None, description="default: the paper's; the toy zoo uses '' (what its models were trained with)")
    resolution: Optional[int] = Field(None, ge=8, multiple_of=8, description="image side in pixels; default: data.encode.resolution")
    batch_size: int = Field(10, ge=1, description="images per teacher forward")
    actors: Optional[int] = Field(
        None,
        ge=1,
        description="synthesis actors (default: one per teacher); each serves its teachers in turn, so a CPU machine can run one actor per core",
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per synthesis actor (also its torch threads)")
    finetune_steps: int = Field(10000, ge=0, description="paper: 10k iterations at batch 10")
    finetune_batch_size: int = Field(10, ge=1)
    finetune_lr: Optional[float] = Field(None, gt=0, description="default: distill.lr")
    finetune_continue: bool = Field(
        False, description="the fine-tune continues the distill stage's discriminator head, both optimizers' state and the EMA (else: fresh ones)"
    )


class IncrementalConfig(_Section):
    base_merged: Optional[str] = Field(None, description="previous merged DMMPipeline folder; teachers: then lists only the new ones")
    regularization: bool = Field(True, description="one extra worker supervises old styles with the frozen previous model (paper 3.5)")
    old_style_samples: Optional[bool] = Field(
        None,
        description="extension: the frozen previous model also samples each old style (synthesis.images_per_teacher, the "
        "teachers' sampler), and the regulariser mixes those rows in at data.synthetic_fraction (and fine-tunes on them), "
        "each under its own style, as a teacher worker does with its teacher's samples; the paper's regulariser sees only "
        "the common stream. Unset: on when the regulariser runs and data.synthetic_fraction > 0 (README: Table 2)",
    )


class MergeConfig(_Section):
    name: str = Field("dmm-merge", description="merge project name: MLflow parent run and registered model name")
    output_dir: str = Field(description="where checkpoints, shards and the merged model go; default $DMM_HOME/outputs/<name>")
    seed: int = 0
    zoo: Optional[str] = Field(
        None,
        description="a toy-zoo manifest (zoo.yaml or its folder), or a preset name (full, micro): "
        "$DMM_HOME/zoo/<name>, built on first use; fills teachers, student.base and data defaults",
    )
    zoo_teachers: Optional[list[int | str]] = Field(None, description="use only these zoo teachers (indices or names), in this order")
    teachers: list[TeacherSpec] = Field(default_factory=list)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    incremental: IncrementalConfig = Field(default_factory=IncrementalConfig)
    evaluation: EvalConfig = Field(
        default_factory=EvalConfig,
        description="dmm_ray.evaluation.config.EvalConfig, with its shorthands (prompts: <file>, num_prompts, feature_net, "
        "inception_weights, resolution, flat sampler keys); output_dir defaults to <output_dir>/evaluation (a URI "
        "output_dir: its local staging folder), cache_dir to $DMM_HOME/cache/fid",
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="TrackingConfig (uri: is short for tracking_uri); project and registered_model_name default to `name`",
    )
    # --- few-step model (dmm_ray/fast, jobs/fast.py) ---
    fast: FastConfig = Field(default_factory=FastConfig, description="LCM distillation of the merged model; enabled: run it after the merge")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        """`name` is also a folder ($DMM_HOME/outputs/<name>): one plain path component, so a name never
        puts the default output_dir somewhere else (`../x`, `a/b`, `.`). Put a merge elsewhere with output_dir."""
        if not name.strip() or name.strip(".") == "" or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{name!r} is not a plain name: the merge's name is also its folder $DMM_HOME/outputs/<name> and its MLflow run, "
                "so it may not be empty, '.' or '..', or contain '/' or '\\'; e.g. dmm-toy-2 (to write elsewhere, set output_dir)"
            )
        return name

    @model_validator(mode="before")
    @classmethod
    def _default_locations(cls, data: Any) -> Any:
        """output_dir defaults to $DMM_HOME/outputs/<name>, data.shards to <output_dir>/latents."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("name"), (int, float)) and not isinstance(data["name"], bool):
            data["name"] = str(data["name"])  # `name: 2024` (YAML reads a number) means the name "2024"
        if data.get("output_dir") is None:
            name = data.get("name") if isinstance(data.get("name"), str) else None  # anything else: the field's own error
            data["output_dir"] = str(paths.outputs_dir(name or cls.model_fields["name"].default))
        section = data.get("data")
        if isinstance(section, dict) and section.get("shards") is None:
            data["data"] = {**section, "shards": str(data["output_dir"]).rstrip("/") + "/latents"}
        elif section is None:
            data["data"] = {"shards": str(data["output_dir"]).rstrip("/") + "/latents"}
        return data

    @model_validator(mode="after")
    def _section_defaults(self) -> "MergeConfig":
        """THE place of the merge's defaults of the evaluation and tracking sections, filled into the
        fields the user left unset (`model_fields_set` keeps naming only the user's): evaluation
        output under `<output_dir>/evaluation` (a URI output_dir: in its local staging folder; the
        merge uploads it), FID statistics cached under $DMM_HOME (not the cwd: a Ray job's working
        dir is temporary), the MLflow project and registered model named after the merge."""
        out = self.output_dir
        if paths.is_uri(out):
            out = str(paths.staging_dir(out))
        ev_defaults = {"output_dir": str(Path(out) / "evaluation"), "cache_dir": str(paths.fid_cache_dir())}
        self.evaluation = _copy_with(self.evaluation, ev_defaults, unset_only=True)
        if self.name:
            self.tracking = _copy_with(self.tracking, {"project": self.name, "registered_model_name": self.name}, unset_only=True)
        return self

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if self.tracking.enabled and self.tracking.registered_model_name is not None:
            if problem := registered_name_problem(self.tracking.registered_model_name):  # the merge's name, by default
                raise ValueError(f"name / tracking.registered_model_name: {problem}; choose another name (or tracking.registered_model_name: null)")
        if not self.teachers:
            raise ValueError("teachers: give at least one teacher (or zoo: a zoo.yaml)")
        if self.student.base is None:
            raise ValueError("student.base: give the student base diffusers folder (or zoo:)")
        names = [t.name for t in self.teachers]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"teachers: duplicate names {dups}")
        from dmm_ray.data import fs as fsu

        fsu.check_location("output_dir", self.output_dir)  # URIs: pyarrow schemes; never a local folder named `s3:`
        fsu.check_location("data.shards", self.data.shards)
        fsu.require_local("student.base", self.student.base)
        if self.incremental.base_merged:
            fsu.require_local("incremental.base_merged", self.incremental.base_merged)
        fsu.require_local("evaluation.output_dir", self.evaluation.output_dir)
        if self.fast.output_dir:  # the few-step stage writes local folders only (a merge's keeps its model local too)
            fsu.require_local("fast.output_dir", self.fast.output_dir)
        self.fast.batch_split(self.data.stream.batch_size)  # the few-step stage's batch split: not first inside its workers
        if self.data.synthetic_fraction > 0 and not self.synthesis.enabled:
            raise ValueError(
                "data.synthetic_fraction > 0 mixes the teachers' synthesized samples into distillation; it needs synthesis.enabled: true"
            )
        side, shards_side = self.synthesis_resolution, self.data.encode.resolution
        # data.encode.resolution is what the shards are at (a set encoded at another is refused before Ray), so shards
        # encoded elsewhere at the synthesis size are described by that setting, not by changing the synthesis
        shards_hint = f"; if the shards were encoded at {side} px, set data.encode.resolution: {side}"
        if self.data.synthetic_fraction > 0 and side != shards_side:  # else distill stops after the synthesis: latents of two sizes
            raise ValueError(
                f"data.synthetic_fraction > 0 puts synthesized latents and latent-shard rows in one batch, which needs one size: "
                f"synthesis.resolution is {side} but the shards' data.encode.resolution is {shards_side}; "
                f"unset synthesis.resolution (its default is data.encode.resolution) or set it to {shards_side}{shards_hint}"
            )
        if self.fast.synthetic_fraction > 0 and side != shards_side:  # else the few-step stage stops inside its workers, after Ray starts
            raise ValueError(
                f"fast.synthetic_fraction > 0 puts synthesized latents (fast.synthetic_source {self.fast.synthetic_source}: made at synthesis.resolution) "
                f"and latent-shard rows in one batch, which needs one size: synthesis.resolution is {side} but the shards' "
                f"data.encode.resolution is {shards_side}; unset synthesis.resolution (its default is data.encode.resolution) "
                f"or set it to {shards_side}, or fast.synthetic_fraction: 0{shards_hint}"
            )
        if self.distill.mixture_fraction > 0 and (self.scaling.teachers_per_worker < 2 or self.data.synthetic_fraction == 0):
            raise ValueError(
                f"distill.mixture_fraction={self.distill.mixture_fraction}: mixture rows mix the predictions of the teachers one "
                f"worker hosts, on their synthesized samples; it needs scaling.teachers_per_worker >= 2 (got "
                f"{self.scaling.teachers_per_worker}) and data.synthetic_fraction > 0 (got {self.data.synthetic_fraction}), or 0"
            )
        if self.incremental.old_style_samples:  # asked for explicitly
            if not self.regularization_workers:
                raise ValueError(
                    "incremental.old_style_samples: the previous model's own samples are the regulariser's; it needs "
                    "incremental.base_merged and incremental.regularization: true"
                )
            if self.data.synthetic_fraction == 0 and not self.finetunes:
                raise ValueError(
                    "incremental.old_style_samples: nothing would read the old styles' samples; set data.synthetic_fraction > 0 "
                    "(mixed into distillation) or synthesis.finetune_steps > 0 (the fine-tune)"
                )
        n, groups = len(self.teachers), self.teacher_groups
        expected = groups * self.scaling.workers_per_teacher + self.regularization_workers
        if self.scaling.num_workers is not None and self.scaling.num_workers != expected:
            k_ok = (self.scaling.num_workers - self.regularization_workers) % groups == 0 and self.scaling.num_workers > self.regularization_workers
            if not k_ok:
                reg = " + 1 regularisation worker" if self.regularization_workers else ""
                what = (
                    f"the {n} teachers"
                    if groups == n
                    else f"the {groups} teacher groups ({n} teachers, {self.scaling.teachers_per_worker} per worker)"
                )
                # fewer GPUs than teachers: the same workers host more teachers each (ceil(n / k) groups must
                # divide the teacher workers); k = n always does, the smallest such k packs the least (mixture
                # rows mix a worker's teachers: k >= 2, as refused above)
                asked = self.scaling.num_workers - self.regularization_workers
                packing = ""
                if asked > 0:
                    fewest = 2 if self.distill.mixture_fraction > 0 else 1
                    k = next(k for k in range(fewest, n + 1) if asked % -(-n // k) == 0)
                    packing = f", or keep {self.scaling.num_workers} with scaling.teachers_per_worker: {k} (each worker hosts up to {k} teachers)"
                raise ValueError(
                    f"scaling.num_workers={self.scaling.num_workers} is not a multiple of {what}{reg}; "
                    f"use N*k{' + 1' if reg else ''} workers, e.g. {expected}{packing}"
                )
        return self

    def with_absolute_paths(self, root: str | os.PathLike | None = None) -> "MergeConfig":
        """Local relative paths made absolute against `root` (default: the current directory), by
        `dmm_ray.paths.resolve`. `load_config` has already resolved a file's paths against its folder;
        this covers configs built in Python. The driver calls it before Ray starts: Train workers
        and actors run in other working directories. URIs and absolute paths stay as they are."""

        def fix(p):
            return paths.resolve(p, root)

        data = self.data.model_copy(update={k: fix(getattr(self.data, k)) for k in ("base", "vae", "tokenizer", "shards")})
        if data.source is not None:
            data = data.model_copy(
                update={
                    "source": data.source.model_copy(update={"root": fix(data.source.root), "annotations": [fix(a) for a in data.source.annotations]})
                }
            )  # manifest: relative to root
        ev = self.evaluation  # (copies that keep model_fields_set: a merge default made absolute stays a default)
        evaluation = _copy_with(ev, {k: fix(getattr(ev, k)) for k in ("output_dir", "cache_dir", "prompts_file")})
        if ev.extractor.kind != "import":  # import: 'package.module:factory', not a path
            evaluation = _copy_with(evaluation, {"extractor": _copy_with(ev.extractor, {"path": fix(ev.extractor.path)})})
        return self.model_copy(
            update={
                "output_dir": fix(self.output_dir),
                "teachers": [t.model_copy(update={"source": fix(t.source), "base": fix(t.base)}) for t in self.teachers],
                "student": self.student.model_copy(update={"base": fix(self.student.base)}),
                "data": data,
                "synthesis": self.synthesis.model_copy(update={"prompts": fix(self.synthesis.prompts)}),
                "incremental": self.incremental.model_copy(update={"base_merged": fix(self.incremental.base_merged)}),
                "evaluation": evaluation,
                "fast": _copy_with(self.fast, {k: fix(getattr(self.fast, k)) for k in ("output_dir", "synthesized")}),
            }
        )

    @property
    def regularization_workers(self) -> int:
        return int(self.incremental.base_merged is not None and self.incremental.regularization)

    @property
    def old_style_samples(self) -> bool:
        """incremental.old_style_samples resolved: unset, on when the regulariser runs and the teachers'
        samples join the distill stream (data.synthetic_fraction > 0)."""
        asked = self.incremental.old_style_samples
        return bool(self.regularization_workers) and (self.data.synthetic_fraction > 0 if asked is None else asked)

    @property
    def finetunes(self) -> bool:
        """The fine-tune stage runs (on the teachers' synthesized samples)."""
        return self.synthesis.enabled and self.synthesis.finetune_steps > 0

    @property
    def synthesis_resolution(self) -> int:
        """synthesis.resolution, else data.encode.resolution: the side of the synthesized samples (the fine-tune trains at it)."""
        return self.synthesis.resolution or self.data.encode.resolution

    @property
    def merged_images_per_style(self) -> int:
        """The few-step stage's samples of the merged model per style (the rollout pairs, synthetic_source
        merged): fast.synthetic_images, else synthesis.images_per_teacher."""
        return self.fast.synthetic_images or self.synthesis.images_per_teacher

    @property
    def teacher_groups(self) -> int:
        """G = ceil(N / teachers_per_worker): the distinct sets of teachers a worker can host."""
        return -(-len(self.teachers) // self.scaling.teachers_per_worker)

    @property
    def workers_per_teacher(self) -> int:
        if self.scaling.num_workers is None:
            return self.scaling.workers_per_teacher
        return (self.scaling.num_workers - self.regularization_workers) // self.teacher_groups

    @property
    def num_workers(self) -> int:
        return self.teacher_groups * self.workers_per_teacher + self.regularization_workers


class StageConfig(BaseModel):
    """What one Ray Train worker of a merge stage reads (`train_loop_per_worker(config)`), all of it:
    the stage's MergeConfig (`distill/trainer.py::stage_config`: its own steps, lr and batch size, set
    on the driver), which stage, where it starts from, and the MLflow run rank 0 logs its steps to."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    merge: MergeConfig
    stage: Literal["distill", "finetune"] = "distill"
    init_student: Optional[str] = Field(None, description="finetune: the distilled student (a folder, or a URI under output_dir)")
    init_state: Optional[str] = Field(None, description="finetune: the distill stage's training state (discriminator head, optimizer)")
    tracking: Optional[dict[str, Any]] = Field(None, description="the MLflow stage run: {uri, run_id, prefix, ...} (dmm_ray/tracking.py)")


def _copy_with(section: BaseModel, values: dict[str, Any], unset_only: bool = False) -> BaseModel:
    """A copy of `section` with `values` (`unset_only`: only in the fields the user left unset), its
    `model_fields_set` unchanged, so it keeps naming only what the user gave (jobs/fast.py lets a
    merged model's own name replace a default project, never the user's). The values are already
    valid: the merge's defaults, or a field's own value made absolute."""
    fill = {k: v for k, v in values.items() if not (unset_only and k in section.model_fields_set)}
    if all(getattr(section, k) == v for k, v in fill.items()):
        return section
    return type(section).model_construct(_fields_set=set(section.model_fields_set), **{**dict(section), **fill})


from dmm_ray.overrides import (  # noqa: E402  (one --set parser, re-exported)
    ConfigError,
    _section_model,
    apply_override,
    config_error,
    parse_override,
    read_yaml_file,
)

# Keys of a raw config tree that hold local paths (or URIs), resolved by `dmm_ray.paths.resolve`
# (the evaluation section's: `resolve_eval_paths`, which `jobs/evaluate.py --config` uses too).
_PATH_KEYS = {
    "": ("output_dir",),
    "student": ("base",),
    "data": ("base", "vae", "tokenizer", "shards"),
    "synthesis": ("prompts",),
    "incremental": ("base_merged",),
    "fast": ("output_dir", "synthesized"),
}
_TRACKING_URI_KEYS = ("uri", "tracking_uri", "registry_uri")
# Top-level keys that hold a section (a mapping of settings).
_SECTIONS = tuple(name for name, field in MergeConfig.model_fields.items() if _section_model(field.annotation) and name != "teachers")


def is_zoo_preset(value: str) -> bool:
    """`zoo: full` / `zoo: micro` name a preset (no slash, no .yaml); `./full` is a folder."""
    return "/" not in value and not value.endswith((".yaml", ".yml")) and value not in (".", "..") and "$" not in value and "~" not in value


def resolve_tree_paths(tree: dict, base: str | os.PathLike) -> None:
    """Make every relative local path in a raw config tree absolute against `base`, in place
    (`dmm_ray.paths.resolve`: `$DMM_HOME` and `~` expand, URIs and absolute paths stay)."""

    def fix(section: Any, keys) -> None:
        if isinstance(section, dict):
            for key in keys:
                if isinstance(section.get(key), str):
                    section[key] = paths.resolve(section[key], base)

    for name, keys in _PATH_KEYS.items():
        fix(tree if not name else tree.get(name), keys)
    if isinstance(tree.get("zoo"), str) and not is_zoo_preset(tree["zoo"]):
        tree["zoo"] = paths.resolve(tree["zoo"], base)
    for teacher in tree["teachers"] if isinstance(tree.get("teachers"), list) else []:  # else: the model's own error
        fix(teacher, ("source", "base"))
    data = tree.get("data")
    if isinstance(data, dict) and isinstance(data.get("source"), dict):
        source = data["source"]
        fix(source, ("root",))  # source.manifest is relative to source.root
        if isinstance(source.get("annotations"), list):
            source["annotations"] = [paths.resolve(a, base) if isinstance(a, str) else a for a in source["annotations"]]
        elif isinstance(source.get("annotations"), str):
            source["annotations"] = paths.resolve(source["annotations"], base)
    if isinstance(tree.get("evaluation"), dict):
        resolve_eval_paths(tree["evaluation"], base)
    tracking = tree.get("tracking")
    if isinstance(tracking, dict):
        for key in _TRACKING_URI_KEYS:
            if isinstance(tracking.get(key), str):
                tracking[key] = paths.resolve_tracking_uri(tracking[key], base)
        fix(tracking, ("artifact_location",))


def _zoo_manifest(value: str, build: bool) -> Path:
    """The zoo.yaml that `zoo:` names: an (already resolved) file or folder, or a preset name."""
    if is_zoo_preset(value):
        from dmm_ray.zoo.config import PRESETS

        if value not in PRESETS:
            raise ConfigError(
                f"zoo: {value!r} is not a preset (presets: {', '.join(PRESETS)}, built under $DMM_HOME/zoo); "
                f"for a zoo folder give its path, e.g. zoo: ./{value}"
            )
        folder = paths.zoo_dir(value)
        if build:
            from dmm_ray.zoo.build import ZooBuildError, ensure_zoo_preset

            try:
                ensure_zoo_preset(value, folder)
            except (ZooBuildError, ValueError) as error:
                raise ConfigError(f"zoo: {value!r}: {error}") from None
        elif not (folder / "zoo.yaml").is_file():
            raise ConfigError(
                f"zoo: {value!r} names the toy-zoo preset at {folder}, which is not built yet; build it with "
                f"`python jobs/build_zoo.py --size {value}` (jobs/merge.py builds it on first use)"
            )
        else:
            from dmm_ray.zoo.config import outdated_preset

            outdated = outdated_preset(value, folder)  # what the run's build step would refuse (--dry-run says it too)
            if outdated:
                raise ConfigError(f"zoo: {value!r}: {outdated}")
        return folder / "zoo.yaml"
    zoo_path = Path(value)
    if zoo_path.is_dir():
        zoo_path = zoo_path / "zoo.yaml"
    if not zoo_path.exists():
        raise ConfigError(
            f"zoo: {zoo_path} does not exist; build it with `python jobs/build_zoo.py --out {zoo_path.parent if zoo_path.suffix in ('.yaml', '.yml') else zoo_path}`, "
            f"or name a preset (zoo: full / zoo: micro, built on first use under $DMM_HOME/zoo)"
        )
    return zoo_path


def _zoo_defaults(tree: dict, build: bool = False) -> None:
    """Fill teachers / student.base / data paths from a zoo.yaml (explicit keys win)."""
    from dmm_ray.zoo.manifest import read_manifest, teacher_entries

    # an empty list names no teacher: it was taken as unset, so `teachers: []` merged every zoo teacher and
    # `zoo_teachers: []` was told "give at least one teacher (or zoo: a zoo.yaml)" though a zoo was given.
    # Said before a zoo preset is built. (null, `--set zoo_teachers=`, is unset.)
    if tree.get("teachers") == []:
        raise ConfigError(
            f"teachers: [] lists no teacher; list at least one (for an incremental merge, the new ones), or leave it out to take zoo {tree['zoo']}'s"
        )
    if tree.get("zoo_teachers") == []:
        raise ConfigError(
            f"zoo_teachers: [] picks no teacher of zoo {tree['zoo']}; name at least one (for an incremental merge, the new ones), or leave it out to take them all"
        )
    chosen = tree.get("zoo_teachers")
    for item in chosen if isinstance(chosen, list) else [chosen]:
        if isinstance(item, bool):  # an int to Python: `no` picked teacher 0 and `yes` / `on` teacher 1, without a word
            word = "yes" if item else "no"
            raise ConfigError(
                f"zoo_teachers: YAML reads an unquoted yes/no/on/off/true/false as a boolean (got {item}), not a teacher; "
                f'quote a teacher\'s name (zoo_teachers: ["{word}"], or --set \'zoo_teachers=["{word}"]\') or give its index'
            )
    zoo_path = _zoo_manifest(tree["zoo"], build)
    tree["zoo"] = str(zoo_path)  # the preset name becomes the manifest it names
    try:
        zoo = read_manifest(zoo_path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"zoo: {error}") from None
    root = zoo_path.parent

    def rel(p):  # the zoo.yaml's paths: relative to its folder, `~` and `$DMM_HOME` expanded (as its teachers')
        return paths.resolve(p, root)

    if not tree.get("teachers"):
        listed = teacher_entries(zoo, root)
        if tree.get("zoo_teachers") is not None:
            names = [t["name"] for t in listed]
            picked = []
            chosen = tree["zoo_teachers"]
            if isinstance(chosen, (str, int)):  # --set zoo_teachers=noir (or noir,neon / 0,2): one name or a comma list
                chosen = tree["zoo_teachers"] = [int(x) if x.strip().isdigit() else x.strip() for x in str(chosen).split(",") if x.strip()]
            if not isinstance(chosen, list):
                raise ConfigError(f"zoo_teachers: give teacher names or indices of {zoo_path} (a list, or noir,neon), got {chosen!r}")
            for item in chosen:
                if isinstance(item, int) and 0 <= item < len(listed):
                    picked.append(listed[item])
                elif item in names:
                    picked.append(listed[names.index(item)])
                else:
                    raise ConfigError(f"zoo_teachers: {item!r} is not a teacher of {zoo_path} (teachers: {names})")
            listed = picked
        tree["teachers"] = listed

    def section(tree: dict, name: str) -> dict:  # a scalar where a section belongs: {} here, the model's own error names it
        value = tree.setdefault(name, {})
        return value if isinstance(value, dict) else {}

    def fill(section: dict, key: str, value, *given: str) -> None:
        # what the user left unset takes the zoo's: a key that is missing or null (`--set student.base=`, the
        # field's own default "the zoo's"), and none of `given`, the keys that say the same otherwise. A null
        # was kept (student.base: "give the student base ... (or zoo:)" beside a zoo), and the zoo's prompts
        # file replaced the user's evaluation.prompts_file (the shorthand `prompts: <file>` is written over it)
        if all(section.get(k) is None for k in (key, *given)):
            section[key] = value

    fill(section(tree, "student"), "base", rel(zoo["base"]))
    data = section(tree, "data")
    fill(data, "base", rel(zoo["base"]))
    if zoo.get("dataset"):
        source = section(data, "source")
        fill(source, "kind", "folder")
        fill(source, "root", rel(zoo["dataset"]))
    if zoo.get("eval_prompts"):
        fill(section(tree, "evaluation"), "prompts", rel(zoo["eval_prompts"]), "prompts_file")
    if zoo.get("feature_net"):
        fill(section(tree, "evaluation"), "feature_net", rel(zoo["feature_net"]))


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), extra: dict | None = None, build_zoo: bool = False) -> MergeConfig:
    """The validated config of a YAML file plus `--set` overrides (and `extra` top-level keys).

    Relative paths in the file resolve against the file's folder, those in overrides and `extra`
    against the current directory (`dmm_ray.paths`). `zoo: <preset>` needs the preset built under
    $DMM_HOME/zoo; `build_zoo=True` builds it when missing (the merge job does)."""
    tree, source = _config_tree(path, overrides, extra)
    if tree.get("zoo") and isinstance(tree["zoo"], str):  # anything else: the model's own error names it
        zoo = tree["zoo"]
        if build_zoo and is_zoo_preset(zoo) and not (paths.zoo_dir(zoo) / "zoo.yaml").is_file():
            _check_before_zoo_build(tree, source)  # a typo must not wait for minutes of zoo building
        _zoo_defaults(tree, build=build_zoo)
    try:
        return MergeConfig.model_validate(tree)
    except ValidationError as error:
        raise config_error(error, MergeConfig, source) from None


def _config_tree(path: str | os.PathLike | None, overrides: list[str] = (), extra: dict | None = None) -> tuple[dict, str]:
    """The unvalidated tree of `load_config` (the file, `extra`, the overrides; paths resolved) and its name for errors."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        tree = read_yaml_file(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        resolve_tree_paths(tree, path.resolve().parent)
    for key, value in (extra or {}).items():
        tree[key] = value
    for text in overrides:
        apply_override(tree, *parse_override(text))
    for name in _SECTIONS:
        if name in tree and tree[name] is None:  # `data:` with every key commented out, `--set evaluation=`: its defaults
            tree[name] = {}
    resolve_tree_paths(tree, Path.cwd())  # what the file held is absolute by now: only overrides / extra change
    return tree, f"config{f' {path}' if path else ''}"


def check_before_zoo_build(path: str | os.PathLike | None, overrides: list[str] = (), extra: dict | None = None) -> str | None:
    """For a caller that builds the config's zoo itself before `load_config` (jobs/demo.py): what
    `load_config(..., build_zoo=True)` refuses before it builds a preset (a misspelt key, a value of the
    wrong type or range, a malformed override), raised now instead of after minutes of building. Builds
    and reads no zoo; what needs the zoo waits for `load_config`. Returns the zoo the config names, the
    one to build: a preset's name, or the path (absolute), or None."""
    tree, source = _config_tree(path, overrides, extra)
    _check_before_zoo_build(tree, source)
    return tree["zoo"] if isinstance(tree.get("zoo"), str) and tree["zoo"] else None


def _check_before_zoo_build(tree: dict, source: str) -> None:
    """The problems of `tree` that the zoo cannot mend, raised before a preset is built (minutes): an
    unknown or misspelt key, a value of the wrong type or range. The zoo only fills in the teachers and
    the base and data paths, and reads zoo_teachers, so a missing field, zoo_teachers, or a check of the
    whole config or of a whole section (which may need them), waits for the build."""

    def waits(e) -> bool:
        section = len(e["loc"]) == 1 and (tree.get(e["loc"][0]) is None or isinstance(tree.get(e["loc"][0]), dict))  # given or not
        whole = e["type"] == "value_error" and (not e["loc"] or section)
        return e["type"] == "missing" or whole or e["loc"][:1] == ("zoo_teachers",)  # a name or comma list: the zoo's to read

    try:
        MergeConfig.model_validate(tree)
    except ValidationError as error:
        kept = [e for e in error.errors() if not waits(e)]
        if kept:
            raise config_error(kept, MergeConfig, source) from None

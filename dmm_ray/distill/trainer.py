"""Thin driver side: ScalingConfig + RunConfig + TorchTrainer for a merge stage."""

from __future__ import annotations

from pathlib import Path

from dmm_ray.config import MergeConfig, StageConfig


def build_trainer(
    cfg: MergeConfig,
    stage: str,
    datasets: dict,
    *,
    tracking: dict | None = None,
    init_student: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    split_datasets=True,
    init_state: str | None = None,
    plan=None,
):
    """`datasets["train"]` (the common stream) is split across workers; every other dataset (a
    teacher's synthesized set) is read whole by the workers that host its style.

    `plan` (a `dmm_ray.resources.ResourcePlan`; planned here from the cluster when absent) fixes
    the CPUs per worker (`auto`) and caps Ray Data at the CPUs the workers leave free."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dmm_ray.data.stream import train_dataset_config
    from dmm_ray.distill.health import StopWithoutRetry, controller_callbacks
    from dmm_ray.distill.loop import train_loop_per_worker
    from dmm_ray.ray_session import train_run_options
    from dmm_ray.resources import check_cluster, with_plan

    if plan is None:
        plan = check_cluster(cfg)
    cfg = with_plan(cfg, plan)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    worker_config = StageConfig(  # the one typed config the workers read
        merge=stage_config(cfg, steps=steps, batch_size=batch_size, lr=lr),
        stage=stage,
        init_student=init_student,
        init_state=init_state,
        tracking=tracking,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{cfg.name}-{stage}",
            storage_path=storage_path(cfg.output_dir),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # a NaN/Inf loss or an input error is deterministic: stop at once instead of retrying it max_failures times
            callbacks=[StopWithoutRetry()] if controller_callbacks() else None,
            **train_run_options(),
        ),
        datasets=datasets,
        dataset_config=train_dataset_config(["train"] if split_datasets and "train" in datasets else [], data_cpus=plan.data_limit_cpus),
    )


def stage_config(cfg: MergeConfig, *, steps: int | None = None, batch_size: int | None = None, lr: float | None = None) -> MergeConfig:
    """The config a stage's workers train with: `cfg` with the stage's own steps, lr (distill.*) and
    rows per style per step (data.stream.batch_size), e.g. the fine-tune's synthesis.finetune_*."""
    distill = {k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}
    update = {"distill": cfg.distill.model_copy(update=distill)} if distill else {}
    if batch_size is not None:
        update["data"] = cfg.data.model_copy(update={"stream": cfg.data.stream.model_copy(update={"batch_size": batch_size})})
    return cfg.model_copy(update=update) if update else cfg


def storage_path(output_dir: str) -> str:
    """Ray Train's storage for a merge's checkpoints: `<output_dir>/ray_results`. A URI stays a URI
    (Ray Train writes and restores checkpoints through pyarrow: every node reads them from there,
    none from the driver's disk); a local folder is made absolute."""
    from dmm_ray.data import fs as fsu

    if fsu.is_uri(output_dir):
        fsu.check_location("output_dir", output_dir)
        return output_dir.rstrip("/") + "/ray_results"
    return str((Path(output_dir) / "ray_results").resolve())


def fit_stage(trainer):
    """`trainer.fit()`, with a non-finite loss raised as the worker's own NonFiniteLossError (its
    message names the step, the term and the style) instead of Ray Train's wrapper, and any other
    input error a worker raised (`health.stops_without_retry`) as itself: a job prints one line.

    Ray Train's fit() installs its own Ctrl-C handler (abort the run, then sys.exit(0)) and leaves it
    installed: put back the one from before, so Ctrl-C during the stages after training (save,
    evaluate, register) stops the merge instead of being swallowed; its exit from inside fit() is
    raised as KeyboardInterrupt.

    After a finished fit, the run's checkpoint folders Ray Train does not keep (an interrupted earlier
    run's, never recorded: distill/checkpointing.py) are removed."""
    import signal
    import threading

    from ray.train import TrainingFailedError

    from dmm_ray.distill.checkpointing import prune_unrecorded
    from dmm_ray.distill.health import unwrap_training_error

    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        result = trainer.fit()
        for path in prune_unrecorded(result):  # an interrupted earlier run's checkpoints that Ray Train never recorded
            print(f"removed an unrecorded checkpoint of an interrupted run: {path}", flush=True)
        return result
    except TrainingFailedError as error:
        own = unwrap_training_error(error)  # a NaN/Inf loss or an input error: the worker's words, not Ray's wrapper
        if own is None:
            raise
        raise own.with_traceback(None) from None
    except SystemExit:
        # Ray Train's Ctrl-C handler aborts the run, then calls sys.exit(0) from inside fit(): a Ctrl-C
        # it is, for the caller (jobs answer it with one line and exit 130; nothing after training runs)
        raise KeyboardInterrupt("Ctrl-C: Ray Train aborted the training run") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

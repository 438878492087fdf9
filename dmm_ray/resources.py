"""Resource planning before Ray Train starts: will the cluster hold this merge's layout?

Ray schedules by logical resources. A Train worker reserves `scaling.cpus_per_worker` CPUs (and
`gpus_per_worker` GPUs) for the whole stage, and the Ray Data tasks that read and tokenise the
latent shards while it trains need 1 CPU each. If the workers take every CPU, those reads can
never be scheduled and the merge waits forever at step 0. So, before Ray Train starts:

    needed CPUs = W x cpus_per_worker + scaling.data_cpus   <=   the cluster's CPUs
    needed GPUs = W x gpus_per_worker (use_gpu)              <=   the cluster's GPUs

and every single actor of the other stages (a synthesis actor: synthesis.cpus_per_actor [+1 GPU]; an evaluation
actor: evaluation.worker_num_cpus/gpus; the encode stage's VAE actors, when latents must be
encoded) must fit the cluster. `cpus_per_worker: auto` shares the CPUs left after `data_cpus`
equally among the W workers. A layout that does not fit stops at once with the numbers and the
knobs; nothing waits. Ray Data's resource limit for the training streams is set to the CPUs the
workers leave free (`ResourcePlan.data_limit_cpus`).

A leaf module (no torch): `plan_resources` is pure; `check_cluster` reads `ray.cluster_resources()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RAY_DATA_TASK_CPUS = 1.0  # Ray Data's default num_cpus for read and map tasks
KNOBS = (
    "scaling.workers_per_teacher",
    "scaling.teachers_per_worker",
    "scaling.cpus_per_worker (or auto)",
    "scaling.data_cpus",
    "--set scaling.num_workers=N",
)


class ResourceError(ValueError):
    """The cluster cannot hold the merge's layout; the message names needed vs available and the knobs."""


@dataclass(frozen=True)
class ResourcePlan:
    cluster_cpus: float
    cluster_gpus: float
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float

    @property
    def train_cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def train_gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    @property
    def data_limit_cpus(self) -> float:
        """CPUs Ray Data may use while the workers train: everything they leave free (>= data_cpus)."""
        return max(self.data_cpus, round(self.cluster_cpus - self.train_cpus, 4))

    def summary(self) -> str:
        gpus = f", {_n(self.train_gpus)} of {_n(self.cluster_gpus)} GPUs" if self.gpus_per_worker else ""
        return (
            f"resources: {self.workers} Train workers x {_n(self.cpus_per_worker)} CPU = {_n(self.train_cpus)} CPUs{gpus}; "
            f"{_n(self.data_limit_cpus)} CPUs left for Ray Data (at least {_n(self.data_cpus)}); cluster: {_n(self.cluster_cpus)} CPUs"
            + (f", {_n(self.cluster_gpus)} GPUs" if self.cluster_gpus else "")
        )


def _n(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.3g}"


def plan_resources(cfg, cluster: dict, needs_encode: bool = False) -> ResourcePlan:
    """The layout of `cfg` (a MergeConfig) on a cluster with `cluster` resources ({"CPU": .., "GPU": ..}),
    or a ResourceError naming needed vs available and the knobs."""
    s = cfg.scaling
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    workers = cfg.num_workers
    layout = (
        f"{workers} Train workers ({cfg.teacher_groups} teacher group(s) x {cfg.workers_per_teacher} worker(s) per teacher"
        + (" + 1 regularisation worker" if cfg.regularization_workers else "")
        + ")"
    )
    problems = []
    if s.cpus_per_worker == "auto":
        spare = cpus - s.data_cpus
        per_worker = math.floor(spare / workers * 1000) / 1000 if spare > 0 else 0.0
        if per_worker <= 0:
            problems.append(
                f"CPUs: needed more than {_n(s.data_cpus)} = scaling.data_cpus for Ray Data's shard reads + a share "
                f"for each of the {workers} workers (scaling.cpus_per_worker=auto), available {_n(cpus)}"
            )
    else:
        per_worker = float(s.cpus_per_worker)
    gpus_per_worker = s.gpus_per_worker if s.use_gpu else 0.0
    plan = ResourcePlan(cpus, gpus, workers, per_worker, gpus_per_worker, s.data_cpus)
    if per_worker > 0 and plan.train_cpus + s.data_cpus > cpus + 1e-9:
        problems.append(
            f"CPUs: needed {_n(plan.train_cpus + s.data_cpus)} = {workers} workers x scaling.cpus_per_worker={_n(per_worker)} "
            f"+ scaling.data_cpus={_n(s.data_cpus)} (Ray Data's shard reads), available {_n(cpus)}"
        )
    if plan.train_gpus > gpus + 1e-9:
        problems.append(
            f"GPUs: needed {_n(plan.train_gpus)} = {workers} workers x scaling.gpus_per_worker={_n(gpus_per_worker)}, available {_n(gpus)}"
        )
    # Stages that do not overlap with training: each of their actors must at least fit on its own.
    singles = []
    if cfg.synthesis.enabled:
        synth = cfg.synthesis  # dmm_ray.distill.synthesis: TeacherSynthesizer.options(num_cpus=cpus_per_actor)
        singles.append(("a synthesis actor", synth.cpus_per_actor, 1.0 if s.use_gpu else 0.0, "synthesis.cpus_per_actor, or synthesis.enabled=false"))
    ev = cfg.evaluation
    if ev.enabled and ev.use_ray:
        singles.append(("an evaluation actor", ev.worker_num_cpus, ev.worker_num_gpus, "evaluation.worker_num_cpus / worker_num_gpus"))
    if needs_encode:
        e = cfg.data.encode
        vae_cpus = RAY_DATA_TASK_CPUS * e.concurrency + (e.decode_cpus if e.num_gpus else 0.0)
        singles.append(
            (f"the encode stage ({e.concurrency} VAE actor(s))", vae_cpus, e.num_gpus * e.concurrency, "data.encode.concurrency / num_gpus")
        )
    for what, need_cpu, need_gpu, knob in singles:
        if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
            problems.append(
                f"{what} needs {_n(need_cpu)} CPUs"
                + (f" and {_n(need_gpu)} GPUs" if need_gpu else "")
                + f", the cluster has {_n(cpus)} CPUs"
                + (f" and {_n(gpus)} GPUs" if need_gpu else "")
                + f" (change {knob})"
            )
    if problems:
        raise ResourceError(
            f"the cluster cannot hold this merge ({layout}); it would wait for resources forever:\n  "
            + "\n  ".join(problems)
            + "\nchange "
            + ", ".join(KNOBS)
            + ", or start Ray with more CPUs/GPUs"
        )
    return plan


def check_cluster(cfg, needs_encode: bool = False) -> ResourcePlan:
    """`plan_resources` on the connected Ray cluster's `ray.cluster_resources()`; prints the plan.
    `scaling.check_resources: false` (an autoscaling cluster) still plans `auto`, but never refuses."""
    import ray

    cluster = ray.cluster_resources()
    try:
        plan = plan_resources(cfg, cluster, needs_encode)
    except ResourceError:
        if cfg.scaling.check_resources:
            raise
        s = cfg.scaling
        per_worker = 1.0 if s.cpus_per_worker == "auto" else float(s.cpus_per_worker)
        plan = ResourcePlan(
            float(cluster.get("CPU", 0)),
            float(cluster.get("GPU", 0)),
            cfg.num_workers,
            per_worker,
            s.gpus_per_worker if s.use_gpu else 0.0,
            s.data_cpus,
        )
        print(
            f"warning: the cluster does not hold this layout now (scaling.check_resources=false: waiting for nodes to join); {plan.summary()}",
            flush=True,
        )
        return plan
    print(plan.summary(), flush=True)
    return plan


def with_plan(cfg, plan: ResourcePlan):
    """`cfg` with `scaling.cpus_per_worker` set to the plan's number (resolves `auto`)."""
    return cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"cpus_per_worker": plan.cpus_per_worker})})

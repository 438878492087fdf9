"""A non-finite loss stops a merge at once, with one clear message, and is never retried.

Every step each worker checks the loss terms it already computed (one `math.isfinite` on their sum,
plus the gradient norm, which DDP's all-reduce makes NaN on every worker when any worker's loss is
NaN). With several workers the verdict is agreed by one tiny all-reduce, so every worker stops at the
same step, before anything (checkpoint, merged model, MLflow model) is written, and every worker
raises the same `NonFiniteLossError` naming the step, the loss term and the style/teacher.

A NaN from a NaN teacher or a diverged student comes back after every restart from the last
checkpoint, so retrying it only burns time (forever with `scaling.max_failures: -1`). So does any
other input error a worker finds (`stops_without_retry`: the project's own ValueErrors, such as a
`TrainingInputError` for a synthesized set smaller than its batch): `StopWithoutRetry`, a Ray Train
callback, turns the worker error into a controller error, which Ray Train does not retry, and
`unwrap_training_error` gives the driver the original message (one `error:` line from a job).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

HINT = (
    "Nothing from this step on was saved (no checkpoint, no merged model, no registered model). A NaN/Inf teacher "
    "is named by `python jobs/merge.py --dry-run --deep` (a full finite-check of every tensor); with finite "
    "teachers, lower distill.lr or keep distill.grad_clip > 0"
)


class NonFiniteLossError(ValueError):
    """A loss term (or the gradient) became NaN/Inf; the message names the step, term and style."""


class TrainingInputError(ValueError):
    """A worker's inputs cannot train: a data set smaller than one batch, an optional package its
    settings need and its image lacks. The same on every restart, so it is not retried."""


def stops_without_retry(error: BaseException) -> bool:
    """A worker error a restart from the last checkpoint cannot get past: a non-finite loss, or any of
    the project's own ValueErrors (bad input, as `dmm_ray.console.cli_main` reads them), not a crash."""
    return isinstance(error, ValueError) and type(error).__module__.startswith("dmm_ray")


def nonfinite_terms(logs: Mapping[str, float]) -> dict[str, float]:
    """The non-finite loss terms of one step's logs (`loss_*`), else the gradient norm if that is
    non-finite; {} when everything is finite. One isfinite on the sum for the common case."""
    losses = {k: float(v) for k, v in logs.items() if k.startswith("loss")}
    grad = float(logs.get("grad_norm", 0.0))
    if math.isfinite(sum(losses.values()) + grad):
        return {}
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    return bad or ({"grad_norm": grad} if not math.isfinite(grad) else {})


def describe_nonfinite(bad: Mapping[str, float], *, stage: str, step: int, steps: int, rank: int, hosts: str) -> str:
    """One worker's part of the message: `hosts` names its style(s) and teacher(s)."""
    terms = ", ".join(f"{k} = {v}" for k, v in bad.items())
    if set(bad) == {"grad_norm"}:
        return (
            f"non-finite gradient in {stage} step {step} of {steps} on rank {rank} ({hosts}): {terms} "
            "with finite losses on every worker (the student's update overflowed)"
        )
    return f"non-finite loss in {stage} step {step} of {steps} on rank {rank} ({hosts}): {terms}"


def agree_on_nonfinite(local: str | None, device) -> list[str]:
    """The workers' messages when ANY worker saw a non-finite value (the same list on every rank:
    the non-finite losses, else the gradients); [] when all are finite. One 1-element all-reduce per step with several
    workers; the messages are gathered only on the failing step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [local] if local else []
    flag = torch.tensor([0.0 if local is None else 1.0], device=device)
    dist.all_reduce(flag)
    if flag.item() == 0:
        return []
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    messages = [m for m in gathered if m]
    losses = [m for m in messages if m.startswith("non-finite loss")]
    return losses or messages  # a NaN loss makes every worker's gradient NaN too: name the cause only


def raise_if_nonfinite(messages: Sequence[str]) -> None:
    if messages:
        raise NonFiniteLossError("; ".join(messages) + ". " + HINT)


def _cause_first(errors: Sequence[BaseException]) -> BaseException | None:
    """Of the worker errors that `stops_without_retry`, the one to report: a NonFiniteLossError (a NaN on
    one worker is collateral on the rest), else the lowest rank's; None when there is none."""
    errors = [e for e in errors if stops_without_retry(e)]
    return next((e for e in errors if isinstance(e, NonFiniteLossError)), errors[0] if errors else None)


def unwrap_training_error(error: BaseException) -> ValueError | None:
    """The worker's own error inside a Ray Train TrainingFailedError (controller or worker error) when
    it is one that `stops_without_retry` (`_cause_first` picks among several), else None."""
    seen: list[BaseException] = [error]
    failures = getattr(error, "worker_failures", None) or {}
    seen += [failures[r] for r in sorted(failures)]
    if getattr(error, "controller_failure", None) is not None:
        seen.append(error.controller_failure)
    inner = [getattr(c, "_base_exc", c) for c in seen]  # Ray's UserExceptionWithTraceback holds the worker's own
    return _cause_first(
        [e for i in inner for e in (i, getattr(i, "__cause__", None)) if isinstance(e, BaseException)]
    )  # a controller error re-raised from the worker's


def _callback_base():
    try:
        from ray.train import UserCallback  # Ray Train v2

        return UserCallback
    except ImportError:  # pragma: no cover - Ray Train v1: retries hit the same NaN; the driver unwraps it
        return object


def controller_callbacks() -> bool:
    """Whether this Ray Train takes `StopWithoutRetry` in RunConfig(callbacks=...) (v2, the default)."""
    return StopWithoutRetry.__mro__[1] is not object


class StopWithoutRetry(_callback_base()):
    """Ray Train (v2) callback on the controller: a worker error that `stops_without_retry` (a
    NonFiniteLossError first) is re-raised there, which Ray Train treats as a controller error and
    does not retry (FailureConfig retries are for crashes that a restart from the last checkpoint can
    get past; a deterministic NaN or a batch larger than its data set is not one)."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        stop = _cause_first([getattr(worker_exceptions[rank], "_base_exc", worker_exceptions[rank]) for rank in sorted(worker_exceptions)])
        if stop is not None:
            raise stop.with_traceback(None)

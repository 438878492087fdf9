"""Library notices that say nothing to a dmm-ray user, dropped at their loggers (nothing else is).

- transformers, once per process (so once per Ray worker): "`CLIPImageProcessor` requires torchvision
  (not installed); falling back to ...Pil". diffusers imports the safety checker's image processor,
  which a merge never uses; torchvision is not a dependency (it would pull a second torch build).
- diffusers, per LoRA teacher: "No LoRA keys associated to CLIPTextModel ... This is safe to ignore"
  (the zoo's and most community LoRAs train the UNet only).
- diffusers >= 0.42, per pipeline load: "`torch_dtype` is deprecated ... use `dtype`" (dmm-ray passes
  `torch_dtype`, which every supported diffusers version takes, and `from_single_file` still needs).
- peft, per LoRA teacher after the first on a shared base: "Already found a `peft_config` attribute
  ... multiple adapters" (the teacher bank hosts several LoRA teachers as named adapters on purpose).
- diffusers, per single-file teacher: "There are modules in UNet2DConditionModel that should be kept in
  float32: []" (an empty list: nothing to keep; the notice with a non-empty list stays).
- MLflow, on a new sqlite store: "Creating initial MLflow database tables..." / "Updating database
  tables" (the job prints its store's URI; these two lines came before it, at INFO).
- MLflow, per registered model: "Passing a Python object as `python_model` causes it to be serialized
  using CloudPickle" (DMMPyfuncModel is importable from the installed package: pickled by reference).
- Ray: the token notice of a private local Ray, Ray Data's "Progress bars disabled" (on purpose) and
  its "Estimated parquet encoding ratio / reader batch size" (per dataset a stage builds), and Ray
  Train's per-worker "Reporting training result N: TrainingReport(...)" (each checkpoint, from every rank).

`DMM_VERBOSE=1` keeps them. Installed by `import dmm_ray`, before transformers or diffusers log.

In Ray worker processes (`no_loading_bars`, called where a worker loads models): no diffusers
"Loading pipeline components" / transformers "Loading weights" bars, one per teacher and actor,
interleaved on the driver's console (the merge shows one progress bar per stage instead).
"""

from __future__ import annotations

import logging
import os

_DROPPED = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
    # diffusers warns on every `.to(dtype)` even when no module must stay in float32 (the list is empty)
    "diffusers.models.modeling_utils": ("that should be kept in float32: []",),
    # a new sqlite store (the first run in a DMM_HOME): the tracking lines print the store's URI already
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
    # DMMPyfuncModel is a class of an installed package: cloudpickle stores a reference to it, not its code
    "mlflow.pyfunc": ("Passing a Python object as `python_model`",),
    # a private local Ray generates a token itself; nothing for the user to do
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
    # dmm-ray turns Ray Data's bars off on purpose (ray_session.init_for_training)
    "ray.data._internal.progress": ("Progress bars disabled",),
    # Ray Data's read-size estimates, per latent dataset a stage builds
    "ray.data._internal.datasource.parquet_datasource": ("Estimated parquet",),
}


def _ray_train_report_logger() -> str | None:
    """Ray Train V2 logs every worker's "Reporting training result ..." (the whole report, at INFO) on a
    logger named by its file's PATH (`logging.getLogger(__file__)`), which RunConfig(logging_config=)
    does not reach. The path, found without importing ray."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.origin:
        return None
    return str(Path(spec.origin).parent / "train" / "v2" / "_internal" / "execution" / "context.py")


_REPORT_LOGGER = _ray_train_report_logger()
if _REPORT_LOGGER:
    _DROPPED[_REPORT_LOGGER] = ("Reporting training result",)


class _DropNotices(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


_WARNINGS = (
    (FutureWarning, r"`torch_dtype` is deprecated"),
    (UserWarning, r"Already found a `peft_config` attribute in the model"),
)


def install() -> None:
    if os.environ.get("DMM_VERBOSE"):
        return
    import warnings

    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, fragments in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(fragments))


def uninstall() -> None:
    """Keep every notice again (a job's --verbose, after `import dmm_ray` installed the filters)."""
    import warnings

    for name in _DROPPED:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropNotices)]:
            logger.removeFilter(f)
    for category, message in _WARNINGS:  # ahead of install()'s "ignore": Python's own default action again
        warnings.filterwarnings("default", message=message, category=category)


def no_loading_bars() -> None:
    """Inside a Ray worker: no model-loading progress bars (DMM_VERBOSE=1 keeps them)."""
    if os.environ.get("DMM_VERBOSE"):
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def in_ray_actor() -> bool:
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None

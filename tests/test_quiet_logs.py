"""Default verbosity drops library notices that say nothing to a merge (dmm_ray/_quiet.py);
DMM_VERBOSE=1 keeps them."""

import importlib.util
import os
import subprocess
import sys

import pytest

CODE = "import dmm_ray\nfrom diffusers import StableDiffusionPipeline\n"


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **env})


def _side_by_side(code: str, variants) -> list[subprocess.CompletedProcess]:
    """`code` in one fresh interpreter per (args, env) variant, all at once: each imports torch and
    diffusers (~10 s on 2 cores), so two of them side by side take the time of one."""
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for args, env in variants
    ]
    outputs = [p.communicate(timeout=300) for p in procs]  # sets each returncode
    done = [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    for result in done:
        assert result.returncode == 0, result.stderr[-3000:]
    return done


def _quiet_and_verbose(code: str) -> list[subprocess.CompletedProcess]:
    return _side_by_side(code, [((), os.environ), ((), {**os.environ, "DMM_VERBOSE": "1"})])


@pytest.mark.slow  # two fresh interpreters importing transformers: 17-31 s on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="with torchvision installed transformers has no notice to drop")
def test_torchvision_fallback_notice_is_dropped_unless_verbose():
    quiet, verbose = _quiet_and_verbose(CODE)
    assert "requires torchvision" not in quiet.stderr
    assert "requires torchvision" in verbose.stderr  # the filter, not the import order, removed it


def test_placement_group_cleaner_thread_death_goes_to_a_log_file_not_the_console(tmp_path):
    """Ray Train's cleaner thread dies on a slow GCS (an RpcError it does not catch), and its controller's
    stop of the cleaner times out at the end of a run: the worker setup hook writes both tracebacks to
    dmm-muted.log; any other thread's exception and any other error still reach stderr."""
    code = (
        "import threading\n"
        "from dmm_ray.ray_session import quiet_worker_logs\n"
        "quiet_worker_logs()\n"
        "def boom(msg):\n    raise RuntimeError(msg)\n"
        "for name in ('PlacementGroupCleanerMonitor', 'mine'):\n"
        "    t = threading.Thread(target=boom, args=(f'{name} failed',), name=name); t.start(); t.join()\n"
    )
    code += (  # the controller's timed-out stop of the cleaner at the end of a run (logger.exception)
        "import logging\nlogging.basicConfig()\n"
        "log = logging.getLogger('ray.train.v2._internal.callbacks.placement_group_callback')\n"
        "try:\n    raise TimeoutError('Get timed out: some object(s) not ready.')\n"
        "except TimeoutError:\n    log.exception('Failed to stop PlacementGroupCleaner gracefully.')\n"
        "log.error('another error')\n"
    )
    result = _run(code, TMPDIR=str(tmp_path))
    assert "PlacementGroupCleanerMonitor failed" not in result.stderr and "mine failed" in result.stderr
    assert "Failed to stop PlacementGroupCleaner" not in result.stderr and "another error" in result.stderr
    muted = (tmp_path / "dmm-muted.log").read_text()
    assert "PlacementGroupCleanerMonitor failed" in muted
    assert "Failed to stop PlacementGroupCleaner gracefully" in muted and "Get timed out" in muted  # kept, with its traceback


def test_model_loading_bars_are_off_in_workers_unless_verbose():
    code = (
        "from dmm_ray._quiet import no_loading_bars\n"
        "no_loading_bars()\n"
        "from diffusers.utils import logging as d\nfrom transformers.utils import logging as t\n"
        "print(d.is_progress_bar_enabled(), t.is_progress_bar_enabled())\n"
    )
    quiet, verbose = _quiet_and_verbose(code)
    assert quiet.stdout.split() == ["False", "False"]
    assert verbose.stdout.split() == ["True", "True"]


def test_ray_data_progress_token_and_empty_fp32_notices_are_dropped():
    code = (
        "import logging, dmm_ray\n"
        "logging.basicConfig()\n"
        "import ray.train.v2._internal.execution.context as c\n"
        "c.logger.warning('Reporting training result 3: TrainingReport(checkpoint=None)')\n"
        "logging.getLogger('ray.data._internal.progress').warning('Progress bars disabled. To enable, set x')\n"
        "logging.getLogger('ray._private.authentication.authentication_token_setup').warning("
        "'Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled')\n"
        "logging.getLogger('ray.data._internal.progress').warning('another notice')\n"
        "logging.getLogger('ray.data._internal.datasource.parquet_datasource').warning('Estimated parquet encoding ratio is 0.742.')\n"
        "logging.getLogger('diffusers.models.modeling_utils').warning('modules in UNet2DConditionModel that should be kept in float32: [].')\n"
        "logging.getLogger('diffusers.models.modeling_utils').warning(\"modules in T5 that should be kept in float32: ['wo'].\")\n"
    )
    quiet, verbose = (r.stderr for r in _quiet_and_verbose(code))
    assert "Progress bars disabled" not in quiet and "Token authentication" not in quiet and "another notice" in quiet
    assert "float32: []" not in quiet and "float32: ['wo']" in quiet  # only the empty-list notice goes
    assert "Progress bars disabled" in verbose and "Token authentication" in verbose and "float32: []" in verbose
    assert "Estimated parquet" not in quiet and "Estimated parquet" in verbose
    assert "Reporting training result" not in quiet and "Reporting training result" in verbose  # Ray Train's own logger


def test_our_own_deprecation_and_multi_adapter_warnings_are_dropped_unless_verbose():
    code = (
        "import warnings, dmm_ray\n"
        "warnings.warn('`torch_dtype` is deprecated and will be removed in version 1.0.0.', FutureWarning)\n"
        "warnings.warn('Already found a `peft_config` attribute in the model. This will lead to having multiple adapters', UserWarning)\n"
        "warnings.warn('some other warning', UserWarning)\n"
    )
    quiet, verbose = (r.stderr for r in _quiet_and_verbose(code))
    assert "torch_dtype" not in quiet and "peft_config" not in quiet and "some other warning" in quiet
    assert "torch_dtype" in verbose and "peft_config" in verbose


def test_verbose_flag_keeps_every_notice_and_default_quiets_the_driver():
    """A job's --verbose (console.set_verbosity(True)) removes the filters `import dmm_ray` installed;
    the default turns the driver's model-loading and MLflow artifact bars off."""
    code = (
        "import logging, os, sys, warnings, dmm_ray\n"
        "from dmm_ray.console import set_verbosity\n"
        "set_verbosity(sys.argv[1] == 'verbose')\n"
        "logging.basicConfig()\n"
        "logging.getLogger('mlflow.pyfunc').warning('Passing a Python object as `python_model` causes it')\n"
        "warnings.warn('`torch_dtype` is deprecated', FutureWarning)\n"
        "from diffusers.utils import logging as d\n"
        "print(d.is_progress_bar_enabled(), os.environ.get('MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'), os.environ.get('DMM_VERBOSE'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DMM_VERBOSE", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    quiet, verbose = _side_by_side(code, [(["quiet"], env), (["verbose"], env)])
    assert "python_model" not in quiet.stderr and "torch_dtype" not in quiet.stderr
    assert quiet.stdout.split() == ["False", "false", "None"]
    assert "python_model" in verbose.stderr and "torch_dtype" in verbose.stderr
    assert verbose.stdout.split() == ["True", "None", "1"]


def test_ray_train_info_lines_stay_in_its_log_files_unless_verbose(monkeypatch):
    from dmm_ray.ray_session import train_run_options

    monkeypatch.delenv("DMM_VERBOSE", raising=False)
    assert train_run_options()["logging_config"].log_level == "WARNING"
    monkeypatch.setenv("DMM_VERBOSE", "1")
    assert train_run_options()["logging_config"].log_level == "INFO"


def test_the_mlflow_model_class_is_defined_without_mlflows_type_hint_nudge():
    result = _run("import dmm_ray.mlflow_model\n")
    assert "type hints" not in result.stderr, result.stderr


def test_a_new_sqlite_stores_table_creation_lines_are_dropped(tmp_path):
    """The first run in a DMM_HOME creates its mlflow.db: MLflow's two INFO lines about it go (real MLflow,
    a real new store: the test fails if MLflow renames its logger or rewords them and the filter stops matching)."""
    code = "import sys, dmm_ray, mlflow\nmlflow.set_tracking_uri('sqlite:///' + sys.argv[1])\nmlflow.search_experiments()\n"
    quiet, verbose = _side_by_side(code, [((str(tmp_path / "q.db"),), os.environ), ((str(tmp_path / "v.db"),), {**os.environ, "DMM_VERBOSE": "1"})])
    assert (tmp_path / "q.db").is_file() and (tmp_path / "v.db").is_file()  # both created their store
    assert "Creating initial MLflow database tables" in verbose.stderr and "Updating database tables" in verbose.stderr
    assert "Creating initial MLflow database tables" not in quiet.stderr and "Updating database tables" not in quiet.stderr

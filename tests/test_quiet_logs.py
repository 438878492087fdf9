"""Default verbosity drops two library notices that say nothing to a merge (dmm_ray/_quiet.py);
DMM_VERBOSE=1 keeps them."""

import importlib.util
import os
import subprocess
import sys

import pytest

CODE = "import dmm_ray\nfrom diffusers import StableDiffusionPipeline\n"


def _stderr(**env) -> str:
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True, env={**os.environ, **env}).stderr


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="with torchvision installed transformers has no notice to drop")
def test_torchvision_fallback_notice_is_dropped_unless_verbose():
    assert "requires torchvision" not in _stderr()
    assert "requires torchvision" in _stderr(DMM_VERBOSE="1")  # the filter, not the import order, removed it

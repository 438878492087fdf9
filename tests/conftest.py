"""Shared fixtures: tiny seeded components, one local Ray cluster for the whole session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance shared by every test marked `ray` (starting Ray costs ~10 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_components():
    from dmm_ray.tiny import tiny_sd_components

    return tiny_sd_components(seed=0)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny SD base pipeline saved as a diffusers folder (session-scoped, built once)."""
    from diffusers import StableDiffusionPipeline

    from dmm_ray.tiny import tiny_sd_components

    path = tmp_path_factory.mktemp("base") / "base"
    StableDiffusionPipeline(**tiny_sd_components(seed=0)).save_pretrained(path)
    return path

"""Data: captioned image readers, VAE latent shards, streaming noised batches for Ray Train.

Public API (imported lazily, so `import dmm_ray.data.config` stays light):
    read_image_index(SourceConfig) -> ImageIndex     readers.py
    read_prompts(path, limit=None) -> list[str]       readers.py
    run_encode(DataConfig) -> EncodeReport            encode.py (jobs/encode_latents.py)
    build_latent_dataset(DataConfig) -> ray Dataset   stream.py
    train_dataset_config() -> ray.train.DataConfig    stream.py
    iter_noised_batches(shard, DataConfig, epoch=...) stream.py
"""

_LAZY = {
    "DataConfig": "dmm_ray.data.config",
    "SourceConfig": "dmm_ray.data.config",
    "EncodeConfig": "dmm_ray.data.config",
    "StreamConfig": "dmm_ray.data.config",
    "ImageIndex": "dmm_ray.data.readers",
    "read_image_index": "dmm_ray.data.readers",
    "read_prompts": "dmm_ray.data.readers",
    "EncodeReport": "dmm_ray.data.encode",
    "run_encode": "dmm_ray.data.encode",
    "build_latent_dataset": "dmm_ray.data.stream",
    "train_dataset_config": "dmm_ray.data.stream",
    "iter_noised_batches": "dmm_ray.data.stream",
    "noised_batch": "dmm_ray.data.stream",
    "load_noise_scheduler": "dmm_ray.data.stream",
    "complete_shards": "dmm_ray.data.shards",
}


from dmm_ray._lazy import lazy_getattr  # noqa: E402

__getattr__ = lazy_getattr(_LAZY)


__all__ = list(_LAZY)

"""Validated configuration of the data area: where images come from, how they become latent
shards, and how the shards stream to training workers.

Every model forbids unknown keys, so a typo such as `encode.batchsize` fails at load time
naming the key instead of being silently ignored deep inside a Ray worker.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SourceConfig(BaseModel):
    """Where captioned images come from.

    kind="journeydb": `annotations` are JSONL files (or folders of them) whose records carry
    `img_path` (relative to `root`) and a caption, looked up in `caption_fields` order
    (JourneyDB puts the generation prompt in `prompt` and a caption in `Task2.Caption`).
    kind="folder": `root` holds images and a manifest (JSONL, CSV or parquet) with one row per
    image: `image_field` (path relative to root), `caption_fields`, optional `id_field`.
    The toy zoo's image set is a folder source (`DIR/images/manifest.jsonl`).
    Paths may be local or any pyarrow filesystem URI (file://, s3://, gs://, hdfs://).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["journeydb", "folder"] = "folder"
    root: str = Field(description="image root folder (local path or pyarrow filesystem URI)")
    annotations: list[str] = Field(
        default_factory=list,
        description="journeydb: JSONL annotation files or folders of *.jsonl, paths/URIs (default: every *.jsonl directly in root)",
    )
    manifest: Optional[str] = Field(
        default=None, description="folder: manifest file relative to root (default: the first of manifest.jsonl/.csv/.parquet)"
    )
    image_field: Optional[str] = Field(default=None, description="record field with the image path (default img_path for journeydb, file for folder)")
    caption_fields: list[str] = Field(
        default_factory=lambda: ["prompt", "Task2.Caption", "caption"],
        description="dotted record fields tried in order; the first non-empty string is the caption",
    )
    id_field: Optional[str] = Field(default=None, description="record field with a unique id (default: id if present, else the image path)")
    limit: Optional[int] = Field(default=None, gt=0, description="use only the first N records (in annotation order)")

    @field_validator("caption_fields")
    @classmethod
    def _non_empty_fields(cls, v: list[str]) -> list[str]:
        if not v or any(not f.strip() for f in v):
            raise ValueError(f"caption_fields must be a non-empty list of field names, got {v!r}")
        return v

    @model_validator(mode="after")
    def _keys_of_its_kind(self) -> "SourceConfig":
        # each kind reads only its own index file(s): the other kind's key was accepted and ignored (another file read)
        if self.kind == "folder" and self.annotations:
            raise ValueError(
                "source.annotations is read only with kind: journeydb (a folder source reads its manifest, source.manifest); "
                "set source.kind: journeydb or drop source.annotations"
            )
        if self.kind == "journeydb" and self.manifest:
            raise ValueError(
                "source.manifest is read only with kind: folder (a journeydb source reads source.annotations, default every *.jsonl in root); "
                f"set source.annotations: [<source.root>/{self.manifest}] or source.kind: folder"
            )
        return self

    def resolved_image_field(self) -> str:
        return self.image_field or ("img_path" if self.kind == "journeydb" else "file")


class EncodeConfig(BaseModel):
    """VAE encoding of images into latent parquet shards (jobs/encode_latents.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    resolution: int = Field(512, description="images are resized (short side) and centre-cropped to resolution x resolution")
    shard_size: int = Field(1000, gt=0, description="records per parquet shard (the unit of resumption)")
    batch_size: int = Field(16, gt=0, description="images per VAE forward pass (map_batches batch size)")
    concurrency: int = Field(1, gt=0, description="number of VAE actors")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per VAE actor (0 = run the VAE on CPU)")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per image-decoding task")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="VAE compute dtype (latents are stored float32)")
    latent_sampling: Literal["mean", "sample"] = Field(
        "mean", description="mean: deterministic posterior mean; sample: one draw from the VAE posterior (diffusers' train_text_to_image)"
    )

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, v: int) -> int:
        if v < 8 or v % 8:
            raise ValueError(f"encode.resolution must be a positive multiple of 8 (VAE downsampling), got {v}")
        return v


class StreamConfig(BaseModel):
    """Streaming noised batches from latent shards to TorchTrainer workers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(20, gt=0, description="samples per batch per training worker (paper: 20 per GPU)")
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="probability a caption is replaced by '' (CFG), drawn once per sample")
    seed: int = Field(0, ge=0, description="seeds timesteps, noise, dropout and shuffling")
    shuffle_buffer: int = Field(0, ge=0, description="rows in each worker's local shuffle buffer (0 = no local shuffle)")
    shuffle_blocks: bool = Field(True, description="randomise the order of shard blocks (seeded) before splitting to workers")
    prefetch_batches: int = Field(2, ge=0, description="batches each worker prefetches")
    drop_last: bool = Field(True, description="drop a final batch smaller than batch_size (keeps DDP step shapes equal)")


class DataConfig(BaseModel):
    """The data area's config tree: `data:` in the composed dmm-ray config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: Optional[str] = Field(
        default=None,
        description="base SD diffusers folder, local and present on every node: its vae/, tokenizer/ and scheduler/ are used (or give vae/tokenizer explicitly)",
    )
    vae: Optional[str] = Field(default=None, description="VAE folder (default: <base>/vae)")
    tokenizer: Optional[str] = Field(default=None, description="tokenizer folder (default: <base>/tokenizer)")
    shards: str = Field(description="latent shard folder (local path or pyarrow filesystem URI): encode writes it, streaming reads it")
    source: Optional[SourceConfig] = Field(default=None, description="images+captions to encode (needed by encode_latents only)")
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    synthetic_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of each style's distillation batch drawn from its own teacher's synthesized samples "
        "(synthesis then runs before distillation); 0 = the paper: distill on the common stream only",
    )

    @model_validator(mode="after")
    def _models_locatable(self) -> "DataConfig":
        if self.base is None and (self.vae is None or self.tokenizer is None):
            missing = [k for k in ("vae", "tokenizer") if getattr(self, k) is None]
            raise ValueError(f"data.base is not set, so data.{' and data.'.join(missing)} must be given (diffusers folders)")
        return self

    def vae_path(self) -> str:
        return self.vae or _join(self.base, "vae")

    def tokenizer_path(self) -> str:
        return self.tokenizer or _join(self.base, "tokenizer")

    def scheduler_path(self) -> Optional[str]:
        """The base's scheduler/ folder (its schedule is re-used as a DDPM training schedule)."""
        return _join(self.base, "scheduler") if self.base else None


def _join(root: Optional[str], name: str) -> str:
    assert root is not None
    return root.rstrip("/") + "/" + name


def split_batch(batch_size: int, synthetic_fraction: float, keys=("data.synthetic_fraction", "data.stream.batch_size")) -> tuple[int, int]:
    """(rows from the common stream, rows from the synthesized sets) of one batch; `keys`: the fraction's
    and the batch size's config keys, named when the fraction leaves no row of either."""
    synthetic = int(round(batch_size * synthetic_fraction))
    if synthetic_fraction > 0 and not 0 < synthetic < batch_size:
        raise ValueError(
            f"{keys[0]}={synthetic_fraction} of a batch of {batch_size} leaves {synthetic} synthetic rows; use a larger {keys[1]} or another fraction"
        )
    return batch_size - synthetic, synthetic

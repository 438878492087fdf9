"""ServeConfig: every knob of the style-serving application, validated at bind time.

Values come from (lowest to highest precedence): the defaults below, a YAML file named by
`DMM_SERVE_CONFIG`, the environment (`DMM_MODEL`, `DMM_API_KEY`), and the `args:` of a
Serve config file (`serve run serve/config.yaml`) or `serve run serve:build_app key=value`.
Unknown keys fail naming the key (extra="forbid"), never inside a replica.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmm_ray import paths
from dmm_ray.overrides import ConfigError, config_error, deep_merge, read_yaml_file

REPO_ROOT = Path(__file__).resolve().parents[1]
# The merged model of the embedded default merge (jobs/configs/toy.yaml, name dmm-toy): what
# `make demo`, `python jobs/merge.py` and `ray job submit --working-dir . -- python jobs/merge.py` write.
DEFAULT_MODEL = "$DMM_HOME/outputs/dmm-toy/merged"


class ServeLimits(BaseModel):
    """Upper bounds on one request: a request above any of them is a 422 naming the limit."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Unset (and without a default_size), the size limits rise to the model's native size where that is larger
    # (ServeConfig.limits_for: SDXL's 1024 px), so a request that leaves its size out is never refused; set,
    # they are the user's bound, and one below the native size fails the deploy (check_native_size).
    max_width: int = Field(
        768, ge=8, description="largest image width in pixels; unset: 768, or the model's native width if larger (without a default_size)"
    )
    max_height: int = Field(
        768, ge=8, description="largest image height in pixels; unset: 768, or the model's native height if larger (without a default_size)"
    )
    max_steps: int = Field(50, ge=1, description="largest num_inference_steps")
    max_images: int = Field(4, ge=1, description="largest number of images per request (prompts x num_images)")
    max_prompt_chars: int = Field(1000, ge=1, description="longest prompt / negative prompt, in characters")

    @model_validator(mode="after")
    def _multiples_of_8(self):
        for key in ("max_width", "max_height"):
            if getattr(self, key) % 8:
                raise ValueError(f"limits.{key}={getattr(self, key)} must be a multiple of 8 (the VAE downsamples by 8 on SD)")
        return self


class ServeConfig(BaseModel):
    """The application's settings (`build_app(ServeConfig)`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(
        DEFAULT_MODEL,
        description="merged-model folder (diffusers DMMPipeline layout) or an MLflow URI `models:/name/version`; "
        "default: the embedded default merge's model, $DMM_HOME/outputs/dmm-toy/merged",
    )
    api_key: Optional[str] = Field(None, description="when set, every POST (/generate, /export_command) needs header `X-API-Key: <key>`")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the replica sees a GPU")
    num_gpus: Optional[float] = Field(None, ge=0, description="GPUs per model replica; None = 1 if this process sees CUDA, else 0")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica")
    num_replicas: int = Field(1, ge=1, description="model replicas (a Serve config's autoscaling_config overrides)")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch: most samples (images) in one forward")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="@serve.batch: how long to wait to fill a batch")
    # --- overload and failure limits (README "Serving limits"; serve/config.yaml) ---
    max_ongoing_requests: int = Field(32, ge=1, description="images in flight per model replica (batches running + waiting in @serve.batch)")
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="images each router replica queues for the model when every replica is full; "
        "beyond it /generate answers 503 + Retry-After at once (Serve's BackPressureError)",
    )
    router_max_ongoing_requests: int = Field(
        256,
        ge=1,
        description="concurrent HTTP requests per router replica; keep it above max_ongoing_requests x "
        "model replicas + max_queued_requests so /healthz never queues behind generation",
    )
    router_max_queued_requests: int = Field(
        128, ge=1, description="requests the HTTP proxy queues for the router; beyond it Serve answers 503 + Retry-After"
    )
    retry_after_s: float = Field(2.0, gt=0, description="Retry-After (seconds) on every 503 the server sheds")
    max_retries: int = Field(
        1,
        ge=0,
        description="times one image is retried on another model replica after its replica died; a request "
        "that crashes replicas takes down at most 1 + max_retries of them, then gets a 500; the router's read of the "
        "model's style list is retried as often, then is a 503 + Retry-After",
    )
    max_body_bytes: int = Field(65536, ge=1024, description="largest POST body in bytes (413 above it), checked before the body is parsed")
    readyz_timeout_s: float = Field(2.0, gt=0, description="GET /readyz: how long the model may take to answer")
    default_steps: Optional[int] = Field(
        None,
        ge=1,
        description="num_inference_steps when a request names none; default: "
        "the model's own (4 for a few-step LCM model, jobs/fast.py; else the paper's 25)",
    )
    default_guidance: Optional[float] = Field(
        None, ge=0, description="CFG scale when a request names none; default: the model's own (1, CFG off, for a few-step model; else the paper's 7)"
    )
    default_size: Optional[int] = Field(
        None, ge=8, description="width/height when a request names none; default: the model's native size (UNet sample_size x VAE factor)"
    )
    limits: ServeLimits = Field(default_factory=ServeLimits)
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters preloaded on every model replica, {name: path to a LoRA .safetensors file or folder "
        'that diffusers\' load_lora_weights reads}; a request picks them by name (`"lora": {name: weight}`). '
        "Paths come only from this config, never from a request",
    )

    @field_validator("default_size")
    @classmethod
    def _size_multiple_of_8(cls, v):
        if v is not None and v % 8:
            raise ValueError(f"default_size={v} must be a multiple of 8")
        return v

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "ServeConfig":
        """A default above its limit would make every request that leaves the field out a 422."""
        lim = self.limits
        if self.default_steps is not None and self.default_steps > lim.max_steps:
            raise ValueError(f"default_steps={self.default_steps} is above limits.max_steps={lim.max_steps}; raise the limit or lower the default")
        if self.default_size is not None and self.default_size > min(lim.max_width, lim.max_height):
            raise ValueError(
                f"default_size={self.default_size} is above limits.max_width/max_height ({lim.max_width}/{lim.max_height}); "
                "raise the limits or lower the default"
            )
        return self

    def limits_for(self, native_size: tuple[int, int]) -> ServeLimits:
        """The limits against a model of this native (width, height): without a default_size, a size limit the
        config leaves unset rises to the model's native size (SDXL's 1024 px above the default 768), so the
        default limits never refuse the size a request without width/height gets; a limit the config sets
        stays (check_native_size refuses the deploy where it is below that size), and a default_size is
        already within the limits (the validator above)."""
        if self.default_size is not None:
            return self.limits
        update = {}
        for key, value in zip(("max_width", "max_height"), native_size):
            if key not in self.limits.model_fields_set and value > getattr(self.limits, key):
                update[key] = int(value)
        return self.limits.model_copy(update=update) if update else self.limits

    def check_native_size(self, native_size: tuple[int, int]) -> None:
        """Deploy time (the model replica, once its model is loaded): a limits.max_width/max_height set below the
        model's native size with no default_size would make every request that leaves its size out a 422."""
        limits = self.limits_for(native_size)
        for key, name, value in zip(("max_width", "max_height"), ("width", "height"), native_size):
            top = getattr(limits, key)
            if self.default_size is None and value > top:
                fits = min(limits.max_width, limits.max_height) // 8 * 8
                raise ConfigError(
                    f"serve config: the model's native {name} is {value} px (UNet sample_size x VAE factor), above limits.{key}={top}, "
                    f"and default_size is unset, so every request without a {name} would be refused: raise limits.{key} to at least "
                    f"{value} (or leave it unset: it then follows the model), or set default_size to at most {fits} "
                    "(the model then samples below its native size)"
                )

    @field_validator("lora_adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, path in v.items():
            if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
                raise ValueError(f"lora_adapters: adapter name {name!r} must be non-empty letters, digits, '-' or '_'")
            if not str(path).strip():
                raise ValueError(f"lora_adapters.{name}: give the path of a LoRA file or folder")
        return v

    def lora_locations(self) -> dict[str, str]:
        """Adapter paths with `$DMM_HOME` / `~` expanded and relative paths resolved like `model`."""
        out = {}
        for name, raw in self.lora_adapters.items():
            path = Path(paths.expand(raw))
            if not path.is_absolute():
                path = path.resolve() if path.exists() else (REPO_ROOT / path).resolve()
            out[name] = str(path)
        return out

    @field_validator("api_key")
    @classmethod
    def _api_key_not_empty(cls, v):
        if v is not None and not v.strip():
            raise ValueError("api_key is empty: set a non-empty key, or leave api_key / DMM_API_KEY unset for no key")
        if v is not None and not (v.isascii() and v.isprintable()):
            # HTTP header values are bytes that clients and servers read as ASCII / latin-1: such a key could never match
            raise ValueError("api_key must be printable ASCII (it travels in the X-API-Key header); got a key with other characters")
        if v is not None and v != v.strip():
            # HTTP strips the spaces around a header value (RFC 9110), so every client's key would arrive without them: always a 403
            raise ValueError("api_key starts or ends with a space, which the X-API-Key header cannot carry; remove the spaces around the key")
        return v

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must name a merged-model folder or `models:/name/version`")
        return v.strip()

    @property
    def is_registry_uri(self) -> bool:
        return self.model.startswith("models:/") or self.model.startswith("runs:/")

    def model_location(self) -> str:
        """An absolute folder, or the URI unchanged (resolved lazily on the replica).

        `$DMM_HOME` and `~` expand (`dmm_ray.paths`). Relative folders are taken from the current
        directory when they exist there, else from the repo root: a Serve config is built inside
        the Serve controller, whose working directory is not the one `serve run` was started from.
        """
        if self.is_registry_uri or "://" in self.model:  # MLflow, or object storage (downloaded on the replica)
            return self.model
        path = Path(paths.expand(self.model))
        if path.is_absolute():
            return str(path)
        if path.exists():
            return str(path.resolve())
        return str((REPO_ROOT / path).resolve())

    def replica_num_gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        if self.device == "cpu":
            return 0.0
        try:
            import torch

            return 1.0 if torch.cuda.is_available() else 0.0
        except Exception:  # torch missing on a head node: serve on CPU rather than fail
            return 0.0

    @classmethod
    def from_env(cls, overrides: Optional[dict] = None, environ: Optional[dict] = None) -> "ServeConfig":
        """Defaults < YAML at $DMM_SERVE_CONFIG < $DMM_MODEL / $DMM_API_KEY < `overrides`, key by key (also
        inside `limits` and `lora_adapters`)."""
        env = os.environ if environ is None else environ
        data: dict = {}
        if env.get("DMM_SERVE_CONFIG"):
            cfg_path = Path(env["DMM_SERVE_CONFIG"])
            if not cfg_path.is_file():
                raise FileNotFoundError(f"DMM_SERVE_CONFIG={cfg_path} is not a file (a YAML of ServeConfig fields)")
            loaded = read_yaml_file(cfg_path, "DMM_SERVE_CONFIG file") or {}  # malformed YAML: says where, no parser dump
            if not isinstance(loaded, dict):
                raise ConfigError(f"DMM_SERVE_CONFIG={cfg_path}: the top level must be a mapping of ServeConfig fields, e.g. max_batch_size: 8")
            if "applications" in loaded:
                raise ConfigError(
                    f"DMM_SERVE_CONFIG={cfg_path}: this is a Ray Serve config file (applications:); run it with `serve run {cfg_path}`, "
                    "or give DMM_SERVE_CONFIG a YAML of ServeConfig fields (what goes under its args:)"
                )
            data.update(loaded)
        if env.get("DMM_MODEL"):
            data["model"] = env["DMM_MODEL"]
        if "DMM_API_KEY" in env:  # set but empty is a config error (the validator says so), never "no key"
            data["api_key"] = env["DMM_API_KEY"]
        # key by key, into sections too: args' `limits: {max_steps: 50}` (serve/config.yaml's) over the file's
        # `limits: {max_width: 1024}` keeps its max_width, and args' lora_adapters add to the file's
        data = deep_merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as error:  # one line per key, the nearest known key for a typo
            raise config_error(error, cls, "serve config" + (f" {env['DMM_SERVE_CONFIG']}" if env.get("DMM_SERVE_CONFIG") else "")) from None

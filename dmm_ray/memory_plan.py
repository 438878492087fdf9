"""Memory planner: what one merge or few-step worker holds on its accelerator, before anything starts.

    python -m dmm_ray.memory_plan --config jobs/configs/sd15_8styles_1gpu.yaml      # one config's plan
    python -m dmm_ray.memory_plan --table                                             # README "How many GPUs do I need?"

Per worker, in bytes (every teacher group's worker in every stage that trains, distill at
data.encode.resolution and the fine-tune at the synthesized samples' with its own rows per style;
the largest is reported and checked):
  student      StyleUNet fp32 master weights + grads + optimizer state (AdamW 8 B/param, 8-bit 2 B) + EMA (4 B)
  student text encoder(s) (frozen, fp32), the bf16 weight copies autocast keeps during a step (GPU)
  discriminator: frozen backbone (the base UNet without its up blocks) + head (weights, grads, AdamW)
  teachers     each full teacher's UNet + text encoder(s) in distill.teacher_dtype, or one base +
               k LoRA adapters (sizes from the LoRA files' headers when present, else rank `lora_rank`),
               or with teacher_offload two device slots
  activations  what the student's forward keeps for backward at the worker batch (k teachers x
               data.stream.batch_size rows; the fine-tune: synthesis.finetune_batch_size), MEASURED
               by running the student StyleUNet's forward (its style MLP, FiLM and adapters as configured;
               the adapters on a teacher worker's k one-style runs, or the regulariser's and few-step
               worker's rows of mixed styles) on the meta device (no memory, no weights) with
               saved-tensor hooks counting the bytes; attention
               probability matrices are left out (a fused SDPA kernel on GPU does not keep them);
               the discriminator's generator term (gradient through the frozen backbone) likewise;
               the teachers' no-grad forward: MEASURED on the meta device as the most bytes its tensors hold
               at once (skip connections, a block's input, working tensors and output; fused attention)
  overhead     CUDA context, cuBLAS/cuDNN workspaces, allocator slack: ESTIMATED 1.5 GiB + 5 %
               (CPU workers: the process itself, torch, diffusers, Ray, data buffers: 1 GiB + 5 %)
An incremental merge's regularisation worker (paper 3.5) holds the same student and discriminator, and in
place of teachers the previous merged StyleUNet in fp32 (counted from its config), at a teacher worker's
reads per step; its no-grad forward takes the whole batch.
The few-step stage's worker (jobs/fast.py, a merge with fast.enabled; `plan_fast`): the merged model
(teacher), the student (its own copy + the LCM-LoRA, or a full copy + the EMA target network), gradients,
AdamW (+ the rollout steps' own), the saved EMA, the text encoder(s), all fp32 (no autocast); activations
(of the student as it trains: fast.mode lora, the frozen merged model with the LCM-LoRA on it) of an LCM
step (fast.batch_size rows) or of a rollout step (fast.rollout_batch_size rows x the longest
fast.rollout_sampler_steps chain, every step kept for the one backward), whichever is larger; the CFG
teacher's and the target's no-grad forward and the overhead as above.
Every number is counted from the architecture (meta-device modules), none needs the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dmm_ray.console import cli_main, given_options, positive_int, refuse_empty
from dmm_ray.overrides import add_set_argument

GiB = 1024**3
OVERHEAD_BYTES = int(1.5 * GiB)
OVERHEAD_FRACTION = 0.05
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES = {"adamw": 8, "adamw_fused": 8, "adamw8bit": 2}
COMMON_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
)
SD15_VAE = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json: 4 blocks, 8x downsampling
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
ARCHITECTURES = {"sd15": (SD15_UNET, [CLIP_L], 512), "sdxl": (SDXL_UNET, [CLIP_L, CLIP_BIGG], 1024)}


@dataclass
class Arch:
    name: str
    unet: dict
    text_encoders: list[dict]
    vae_factor: int = 8
    source: str = "built in"


@dataclass
class Plan:
    """One worker's bytes, by line; `how`: counted | measured (meta device) | estimated."""

    lines: list[tuple[str, int, str]] = field(default_factory=list)
    capacity: int | None = None
    notes: list[str] = field(default_factory=list)
    worker: "WorkerLayout | None" = None  # plan_config: which worker of which stage this is

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.lines)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def format(self, title: str = "") -> str:
        width = max(len(n) for n, _, _ in self.lines)
        out = [title] if title else []
        out += [f"  {n:<{width}}  {b / GiB:8.2f} GiB  ({how})" for n, b, how in self.lines]
        out.append(
            f"  {'total':<{width}}  {self.total / GiB:8.2f} GiB"
            + (f"  of {self.capacity / GiB:g} GiB: {'fits' if self.fits else 'DOES NOT FIT'}" if self.capacity else "")
        )
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


@dataclass(frozen=True)
class Layout:
    """What the planner needs of a config (also built directly for the README table)."""

    arch: str  # key into the arch cache
    teachers_on_worker: int  # k: the teachers this worker hosts
    lora_teachers: int = 0  # of those, LoRAs of one base sharing it (>= 2) ...
    lora_adapter_bytes: tuple[int, ...] = ()  # ... their adapter sizes in bytes (fp32 as stored), one per LoRA
    lora_bases: int = 1  # ... the bases they share: the teacher bank loads each base (UNet + text encoders) once
    batch_per_style: int = 4
    resolution: int = 512
    num_styles: int = 8
    teacher_dtype: str = "float32"
    bf16: bool = True  # GPU autocast
    gpu: bool = True
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    ema: bool = False
    offload: bool = False
    lambda_adv: float = 0.01
    adapter_rank: int = 0  # student.style_adapters.rank
    adapter_targets: tuple[str, ...] = ()
    style_film: bool = False  # student.style_film
    mixture_rows: int = 0  # distill.mixture_fraction: mixture rows each hosted style adds (student: k x; every teacher: all k x)
    # The incremental merge's regularisation worker (paper 3.5): no teachers of its own but the frozen previous
    # merged StyleUNet (fp32, the student's text encoder conditions it) of this many parameters; k is then the
    # reads per step of a teacher worker (its batch: k x batch_per_style rows, one forward of the previous model)
    previous_model_params: int = 0

    @property
    def style(self) -> "StyleModules":
        return StyleModules(self.num_styles, self.style_film, self.adapter_rank, self.adapter_targets if self.adapter_rank else ())


@dataclass(frozen=True)
class StyleModules:
    """The student's style modules as configured (models.style_unet.StyleUNet): the codebook and style MLP of
    `num_styles` styles, FiLM on every ResNet block (`film`), rank-`adapter_rank` per-style adapters on the
    layers `adapter_targets` names (PEFT's rule: whole names or dotted suffixes; a saved model's full names
    match themselves). Its forward keeps more for backward than the plain UNet's: each FiLM block its norm2
    output, each adapted layer its un-weighted delta (the layer's output size) and the rank-r product."""

    num_styles: int = 1
    film: bool = False
    adapter_rank: int = 0
    adapter_targets: tuple[str, ...] = ()

    @classmethod
    def of_folder(cls, folder: str | Path) -> "StyleModules":
        """A merged model's, from the StyleUNet config in its unet/ (no weights read)."""
        from dmm_ray.models.style_unet import StyleUNet

        cfg = StyleUNet.load_config(Path(folder) / "unet")
        rank = int(cfg.get("style_adapter_rank", 0))
        return cls(
            len(cfg.get("style_names", ("style_0",))),
            bool(cfg.get("style_film", False)),
            rank,
            tuple(cfg.get("style_adapter_modules", ())) if rank else (),
        )


_ARCHS: dict[str, Arch] = {}


def arch_from_folder(folder: str | Path) -> Arch:
    folder = Path(folder)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    unet = {k: v for k, v in unet.items() if not k.startswith("style_")}  # a merged model's StyleUNet: its own keys are no UNet's
    encoders = [
        json.loads((folder / te / "config.json").read_text()) for te in ("text_encoder", "text_encoder_2") if (folder / te / "config.json").is_file()
    ]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return Arch(folder.name, unet, encoders, 2 ** (len(vae["block_out_channels"]) - 1), f"read from {folder}")


def register_arch(key: str, arch: Arch) -> str:
    _ARCHS[key] = arch
    return key


for _name, (_unet, _encoders, _res) in ARCHITECTURES.items():
    register_arch(_name, Arch(_name, _unet, _encoders))


@functools.lru_cache(maxsize=None)
def _meta_unet(key: str):
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in _ARCHS[key].unet.items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(cfg)


@functools.lru_cache(maxsize=None)
def _meta_student(key: str, style: StyleModules):
    """The student StyleUNet of architecture `key` with `style`'s modules, on the meta device (what
    distill.loop.build_models makes of the base with StyleUNet.from_unet)."""
    from dmm_ray.models.style_adapters import target_modules
    from dmm_ray.models.style_unet import StyleUNet

    modules = target_modules(_meta_unet(key), style.adapter_targets) if style.adapter_rank else []
    cfg = {k: v for k, v in _ARCHS[key].unet.items() if not k.startswith("_")}
    with torch.device("meta"):
        return StyleUNet(
            **cfg,
            style_names=[f"style_{i}" for i in range(style.num_styles)],
            style_film=style.film,
            style_adapter_rank=style.adapter_rank,
            style_adapter_modules=modules,
        )


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=None)
def unet_params(key: str) -> int:
    return _params(_meta_unet(key))


@functools.lru_cache(maxsize=None)
def disc_backbone_params(key: str) -> int:
    unet = _meta_unet(key)
    dropped = _params(unet.up_blocks) + _params(unet.conv_norm_out) + _params(unet.conv_out)
    return unet_params(key) - dropped


@functools.lru_cache(maxsize=None)
def text_encoder_params(key: str) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for i, cfg in enumerate(_ARCHS[key].text_encoders):
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        with torch.device("meta"):
            total += _params(cls(CLIPTextConfig(**cfg)))
    return total


def _matching(unet, targets) -> list:
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets):
            out.append(module)
    return out


def _meta_style_unet(folder: str | Path):
    """A saved StyleUNet (a merged model's unet/) built from its config on the meta device: no weights read."""
    from dmm_ray.models.style_unet import StyleUNet

    with torch.device("meta"):
        return StyleUNet.from_config(StyleUNet.load_config(Path(folder) / "unet"))


def _lora_count(unet, rank: int, targets) -> int:
    """Parameters of a rank-r LoRA on the Linear/Conv2d layers of `unet` whose names end in one of `targets`
    (PEFT's match: the whole name or a dotted suffix): down r x in*kh*kw + up out x r per layer."""
    total = 0
    for m in _matching(unet, targets):
        if isinstance(m, torch.nn.Linear):
            total += rank * (m.in_features + m.out_features)
        else:
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return total


@functools.lru_cache(maxsize=None)
def lora_params(key: str, rank: int, targets: tuple[str, ...] = COMMON_LORA_TARGETS) -> int:
    """Parameters of one rank-r LoRA on `targets` (down r x in*kh*kw + up out x r per layer)."""
    return _lora_count(_meta_unet(key), rank, targets)


def student_params(key: str, num_styles: int, adapter_rank: int = 0, adapter_targets: tuple[str, ...] = (), film: bool = False) -> int:
    """Parameters of the student StyleUNet, counted from it built on the meta device: the UNet, the codebook
    and style MLP, with `film` a Linear(d, 2C) per ResNet block, the adapters with their per-style biases."""
    style = StyleModules(num_styles, film, adapter_rank, tuple(adapter_targets) if adapter_rank else ())
    return _params(_meta_student(key, style))


@contextlib.contextmanager
def _meta_style_layout(style, runs: int):
    """The planner's forward through a meta-device StyleUNet's style embedding `style` (a StyleEmbedding):
    its own forward reads the style weights' values (least squares on the codebook, then which rows share
    a style) to choose the adapters' path, and the meta device has no values. For the planner's forward
    its rows are laid out as `runs` equal one-style runs (a teacher worker's sub-batches), 0: rows of mixed
    styles (the dense N-style path: a regulariser's or few-step worker's random style per row). Replaces
    the two methods on this instance only, and puts them back."""
    if not len(style.adapters):  # no adapters: its own forward reads no values
        yield
        return
    n = style.codebook.num_embeddings

    def forward(style_embeds):
        out = style.mlp(style_embeds)
        # what the adapter hooks read: the forward's MLP output, weights of the batch's shape (no values), adapters on
        style._current, style._weights, style._adapters_on = out, torch.zeros(style_embeds.shape[0], n, device="meta"), True
        return out

    def adapter_runs(batch: int):
        return None if runs == 0 else [(s % n, s * batch // runs, (s + 1) * batch // runs) for s in range(runs)]

    style.forward, style.adapter_runs = forward, adapter_runs
    try:
        yield
    finally:
        del style.forward, style.adapter_runs


@functools.lru_cache(maxsize=None)
def activation_bytes_per_row(
    key: str,
    latent: int,
    dtype: str,
    checkpointing: bool,
    part: str = "unet",
    style: StyleModules | None = None,
    runs: int = 1,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = (),
) -> int:
    """Bytes the forward keeps for backward per batch row, measured on the meta device.
    part=unet: the student, a StyleUNet with `style`'s modules (None: the plain UNet, a teacher); its style
    adapters take the path of the batch's layout: `runs` one-style runs (a teacher worker's k sub-batches,
    measured at one row each), or 0: rows of mixed styles (the dense N-style path: the regulariser's and the
    few-step worker's random style per row, a mixture block); `lora_rank`: the few-step student of
    fast.mode lora, its weights frozen and a rank-`lora_rank` LCM-LoRA on `lora_targets` trained (what a
    frozen layer need not keep, what the LoRA's own layers keep); part=disc: the generator term through
    the frozen discriminator backbone."""
    import copy
    import logging

    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)  # "modules ... kept in float32": none here
    model = _meta_student(key, style) if style is not None and part == "unet" else _meta_unet(key)
    unet = copy.deepcopy(model).to({"float32": torch.float32}.get(dtype, torch.bfloat16))
    cfg = _ARCHS[key].unet
    unet.requires_grad_(part == "unet")
    if lora_rank and part == "unet":
        from types import SimpleNamespace

        from dmm_ray.fast.lcm import add_lcm_lora

        with torch.device("meta"):  # the few-step loop's own LoRA (fast.loop.build_student), without weights
            add_lcm_lora(unet, SimpleNamespace(lora_rank=lora_rank, lora_alpha=None, lora_targets=lora_targets))
    if checkpointing and part == "unet":
        unet.enable_gradient_checkpointing()
        unet.train()
    params = {id(p) for p in unet.parameters()}
    saved: dict[int, int] = {}
    keep: list = []

    def pack(t):
        if id(t) in params or id(getattr(t, "_base", None)) in params:
            return t
        # attention probabilities (B, heads, Lq, Lk): a fused SDPA kernel on GPU keeps none of them
        if t.dim() >= 3 and t.shape[-2] > latent and t.shape[-1] in (t.shape[-2], 77):
            return t
        base = t._base if t._base is not None else t  # views of one activation count once
        if id(base) not in saved:
            saved[id(base)] = base.numel() * base.element_size()
            keep.append(base)
        return t

    styled = style is not None and part == "unet"
    dt = next(unet.parameters()).dtype
    stop = None
    if part == "disc":

        class _Stop(Exception):
            pass

        def hook(*_):
            raise _Stop

        stop = unet.mid_block.register_forward_hook(hook)

    def saved_at(b: int) -> int:
        saved.clear()
        keep.clear()
        x = torch.zeros(b, cfg.get("in_channels", 4), latent, latent, device="meta", dtype=dt, requires_grad=part == "disc")
        text = torch.zeros(b, 77, cfg["cross_attention_dim"], device="meta", dtype=dt)
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            added = {"text_embeds": torch.zeros(b, pooled, device="meta", dtype=dt), "time_ids": torch.zeros(b, 6, device="meta", dtype=dt)}
        # codebook-space rows (B, d): style ids would be range-checked by value
        style_kw = {"style_embeds": torch.zeros(b, unet.style_dim, device="meta", dtype=dt)} if styled else {}
        layout = _meta_style_layout(unet.class_embedding, runs) if styled else contextlib.nullcontext()
        try:
            with layout, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                unet(x, torch.zeros(b, device="meta", dtype=torch.long), text, added_cond_kwargs=added, **style_kw)
        except Exception as error:  # noqa: BLE001 - the disc hook's stop
            if stop is None:
                raise
            del error
        return sum(saved.values())

    try:
        if styled and style.adapter_rank and runs:
            # k one-style runs take the grouped path, which gathers the runs' adapter factors once per forward
            # (weight-sized, not a row's): per row is the growth from one to two rows per run
            total = (saved_at(2 * runs) - saved_at(runs)) // runs
        else:
            total = saved_at(1)
    finally:
        if stop is not None:
            stop.remove()
    if checkpointing and part == "unet":
        # recompute in backward: one block's activations at a time on top (the largest block)
        total += activation_bytes_per_row(key, latent, dtype, False, "unet", style, runs, lora_rank, lora_targets) // max(
            1, len(cfg["down_block_types"]) * 2 + 1
        )
    return total


@functools.lru_cache(maxsize=None)
def no_grad_bytes_per_row(key: str, latent: int, dtype: str, style: StyleModules | None = None) -> int:
    """The most bytes a no-grad forward (a teacher's, the previous merged model's, the few-step stage's CFG
    teacher and target) holds alive at once, per row: it keeps nothing for a backward, but the UNet's skip
    connections live from the down blocks to the up blocks, and a block's input, its working tensors and its
    output overlap. MEASURED as the forward runs on the meta device: every tensor an operation allocates
    (views and in-place results share their input's memory) is counted from its allocation until it is freed,
    and the peak is kept. Attention runs as a fused kernel (what SDPA does on GPU and CPU): its output only,
    never the probability matrix. `style`: the StyleUNet with these modules, rows of mixed styles (the dense
    path: the previous merged model's, the few-step teacher's); None: a plain UNet (a teacher). A flat 10 % of
    the student's saved activations, the estimate this replaces, was 30.7 MiB where a real toy forward
    (CPU, fp32, 16 rows at 32x32 latents) peaked at 66 MiB."""
    import copy
    import logging
    import weakref

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    dt = {"float32": torch.float32}.get(dtype, torch.bfloat16)
    unet = copy.deepcopy(_meta_student(key, style) if style is not None else _meta_unet(key)).to(dt).requires_grad_(False)
    cfg = _ARCHS[key].unet

    class Fused(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, v = args[0], args[2] if len(args) > 2 else kwargs["value"]
                return q.new_empty(*q.shape[:-1], v.shape[-1])
            return func(*args, **kwargs)

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            for i, t in enumerate(tree_flatten(out)[0]):
                if isinstance(t, torch.Tensor) and (i >= len(returns) or returns[i].alias_info is None):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
            return out

        def _free(self, n: int) -> None:
            self.live -= n

    b = 1
    live = Live()
    layout = _meta_style_layout(unet.class_embedding, 0) if style is not None else contextlib.nullcontext()
    with layout, torch.no_grad(), Fused(), live:  # its inputs counted too: the noised latents, the text and style embeddings
        x = torch.zeros(b, cfg.get("in_channels", 4), latent, latent, device="meta", dtype=dt)
        text = torch.zeros(b, 77, cfg["cross_attention_dim"], device="meta", dtype=dt)
        added = None
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            added = {"text_embeds": torch.zeros(b, pooled, device="meta", dtype=dt), "time_ids": torch.zeros(b, 6, device="meta", dtype=dt)}
        style_kw = {"style_embeds": torch.zeros(b, unet.style_dim, device="meta", dtype=dt)} if style is not None else {}
        out = unet(x, torch.zeros(b, device="meta", dtype=torch.long), text, added_cond_kwargs=added, **style_kw)
    del out
    return live.peak


def plan_layout(lay: Layout, capacity_gb: float | None = None) -> Plan:
    key = lay.arch
    a = _ARCHS[key]
    latent = lay.resolution // a.vae_factor
    k = lay.teachers_on_worker
    rows = k * (lay.batch_per_style + lay.mixture_rows)  # the plain rows, then the mixture block
    p_student = student_params(key, lay.num_styles, lay.adapter_rank, lay.adapter_targets, lay.style_film)
    p_text = text_encoder_params(key)
    p_unet = unet_params(key)
    tb = DTYPE_BYTES[lay.teacher_dtype]
    autocast = lay.gpu and lay.bf16
    act_dtype = "bfloat16" if autocast else "float32"
    plan = Plan(capacity=None if capacity_gb is None else int(capacity_gb * GiB))
    L = plan.lines
    L.append(("student weights (fp32)", 4 * p_student, "counted"))
    L.append(("student gradients (fp32)", 4 * p_student, "counted"))
    L.append((f"student optimizer ({lay.optimizer})", OPTIMIZER_BYTES[lay.optimizer] * p_student, "counted"))
    if lay.ema:
        L.append(("student EMA (fp32)", 4 * p_student, "counted"))
    L.append(("student text encoder(s) (fp32, frozen)", 4 * p_text, "counted"))
    if lay.lambda_adv > 0:
        c = a.unet["block_out_channels"][-1]
        head = 2 * (9 * c * c + c) + 4 * c + c * 2 * lay.num_styles + 2 * lay.num_styles
        L.append(("discriminator backbone (fp32, frozen)", 4 * disc_backbone_params(key), "counted"))
        L.append(("discriminator head (weights, grads, AdamW)", (4 + 4 + OPTIMIZER_BYTES[lay.optimizer]) * head, "counted"))
    if autocast:
        L.append(("bf16 weight copies under autocast", 2 * (p_student + (disc_backbone_params(key) if lay.lambda_adv > 0 else 0)), "counted"))
    full = 0 if lay.previous_model_params else k - lay.lora_teachers
    if lay.previous_model_params:  # loop.build_models: StyleUNet.from_pretrained as stored (fp32), distill.teacher_dtype does not apply
        L.append(("previous merged model (fp32, frozen; the student's text encoder)", 4 * lay.previous_model_params, "counted"))
    if lay.lora_teachers:
        bases = f"{lay.lora_bases} LoRA base UNets + text encoder(s), once each" if lay.lora_bases > 1 else "LoRA base UNet + text encoder(s), once"
        L.append((f"{bases} ({lay.teacher_dtype})", tb * (p_unet + p_text) * lay.lora_bases, "counted"))
        adapters = sum(lay.lora_adapter_bytes) // 4 * tb
        L.append((f"{lay.lora_teachers} LoRA adapters ({lay.teacher_dtype})", adapters, "counted"))
    if full:
        resident = min(full, 2 if full > 1 else 1) if lay.offload else full
        what = f"{full} full teacher UNets" + (f", offloaded: {resident} device slot{'s' if resident > 1 else ''}" if lay.offload else "")
        if lay.offload and not lay.gpu:  # a CPU worker's "device" slots and host copies share one memory
            resident, what = full + resident, what + " + the host copies (one memory on CPU)"
        L.append((f"{what} ({lay.teacher_dtype})", tb * p_unet * resident, "counted"))
        L.append((f"{full} teacher text encoder(s) ({lay.teacher_dtype})", tb * p_text * full, "counted"))
    # a teacher worker's plain rows: k one-style runs; the mixture block and the regulariser's rows (a random old
    # style each): mixed styles
    runs = 0 if lay.previous_model_params else k
    act = activation_bytes_per_row(key, latent, act_dtype, lay.gradient_checkpointing, "unet", lay.style, runs) * k * lay.batch_per_style
    act += activation_bytes_per_row(key, latent, act_dtype, lay.gradient_checkpointing, "unet", lay.style, 0) * k * lay.mixture_rows
    L.append((f"student activations ({rows} rows{', checkpointed' if lay.gradient_checkpointing else ''})", act, "measured (meta device)"))
    if lay.lambda_adv > 0:
        L.append(
            (
                f"discriminator generator-term activations ({rows} rows)",
                activation_bytes_per_row(key, latent, act_dtype, False, "disc") * rows,
                "measured (meta device)",
            )
        )
    teacher_rows = lay.batch_per_style + k * lay.mixture_rows  # its own rows and the whole mixture block in one forward
    if lay.previous_model_params:  # the previous model: the whole batch in one forward (no teacher slices)
        teacher_rows = rows
    if lay.previous_model_params:  # the previous merged StyleUNet, stored fp32 (autocast runs it in bf16 on GPU)
        teacher_row = no_grad_bytes_per_row(key, latent, act_dtype, lay.style)
    else:
        teacher_row = no_grad_bytes_per_row(key, latent, act_dtype if lay.teacher_dtype == "float32" and not autocast else "bfloat16")
    teacher = "previous model's forward, the batch of" if lay.previous_model_params else "teacher forward, one sub-batch of"
    L.append((f"{teacher} {teacher_rows} (no grad)", teacher_row * teacher_rows, "measured (meta device)"))
    L.append(
        (
            "CUDA context, workspaces, allocator slack" if lay.gpu else "process runtime (torch, Ray worker)",
            (OVERHEAD_BYTES if lay.gpu else GiB) + int(OVERHEAD_FRACTION * sum(b for _, b, _ in L)),
            "estimated",
        )
    )
    return plan


@dataclass(frozen=True)
class FastLayout:
    """One worker of the few-step stage (dmm_ray/fast/loop.py): the frozen merged StyleUNet (the teacher),
    the student (a LoRA on its own copy of the merged weights, or a full copy with an EMA target network),
    the text encoder(s), AdamW (and the rollout steps' own AdamW), all fp32: the loop runs no autocast."""

    arch: str
    model_params: int  # the merged StyleUNet's parameters (teacher; the student's copy; full mode: the target's)
    lora_params: int  # fast.mode lora: the LCM-LoRA's trainable parameters
    full_trainable_params: int  # fast.mode full: every weight but the style codebook
    mode: str = "lora"
    batch_size: int = 4  # fast.batch_size: rows of one LCM step
    resolution: int = 512  # the latent shards' (data.encode.resolution)
    saved_ema: bool = False  # fast.saved_ema_decay: an EMA of the trainable weights
    rollout_batch_size: int = 0  # pairs of one rollout step (0: no rollout steps)
    rollout_sampler_steps: int = 0  # the longest chain the rollout steps backpropagate through
    rollout_resolution: int = 512  # the merged model's samples' (the rollout pairs)
    gpu: bool = True
    workers: int = 1  # fast.num_workers: each holds all of this
    style: StyleModules | None = None  # the merged model's style modules (its activations); None: a plain UNet's
    lora_rank: int = 0  # fast.lora_rank, fast.lora_targets: the LCM-LoRA of fast.mode lora (its activations)
    lora_targets: tuple[str, ...] = ()

    @property
    def trainable(self) -> int:
        return self.lora_params if self.mode == "lora" else self.full_trainable_params


def plan_fast(lay: FastLayout, capacity_gb: float | None = None) -> Plan:
    """One few-step worker's bytes, counted and measured as plan_layout does (same activations, same
    no-grad forward peak, same overhead). The LCM step and a rollout step do not overlap (each
    step's activations are freed by its backward), so the larger of the two is the activations line;
    on a CPU worker whose rollout step is the larger, the LCM steps' too (the heap keeps them)."""
    key = lay.arch
    a = _ARCHS[key]
    p, t = lay.model_params, lay.trainable
    plan = Plan(capacity=None if capacity_gb is None else int(capacity_gb * GiB))
    L = plan.lines
    L.append(("teacher: the merged model (fp32, frozen)", 4 * p, "counted"))
    if lay.mode == "lora":
        L.append(("student: a copy of the merged model (fp32, frozen) + the LCM-LoRA", 4 * (p + t), "counted"))
    else:
        L.append(("student: a full copy of the merged model (fp32)", 4 * p, "counted"))
        L.append(("target network: an EMA copy (fp32)", 4 * p, "counted"))
    L.append((f"student gradients (fp32, {t / 1e6:.1f}M trainable)", 4 * t, "counted"))
    L.append(("AdamW state of the LCM steps (fp32)", OPTIMIZER_BYTES["adamw"] * t, "counted"))
    if lay.rollout_batch_size:  # RolloutPhase: its own AdamW, built at the start; the LCM one stays alive
        L.append(("AdamW state of the rollout steps (fp32)", OPTIMIZER_BYTES["adamw"] * t, "counted"))
    if lay.saved_ema:
        L.append(("saved EMA of the trainable weights (fp32)", 4 * t, "counted"))
    L.append(("text encoder(s) (fp32, frozen)", 4 * text_encoder_params(key), "counted"))
    # a random style per row (LCM steps and rollout pairs alike): the adapters' dense path; fast.mode lora:
    # the student's forward through its frozen weights and the LoRA's own layers
    lora = (lay.lora_rank, lay.lora_targets) if lay.mode == "lora" else (0, ())
    lcm = activation_bytes_per_row(key, lay.resolution // a.vae_factor, "float32", False, "unet", lay.style, 0, *lora) * lay.batch_size
    lcm_label = f"an LCM step, {lay.batch_size} rows"
    label, act = lcm_label, lcm
    if lay.rollout_batch_size:  # the chain keeps every sampler step's activations for the one backward
        rollout = activation_bytes_per_row(key, lay.rollout_resolution // a.vae_factor, "float32", False, "unet", lay.style, 0, *lora)
        rollout *= lay.rollout_batch_size
        rollout *= lay.rollout_sampler_steps
        rollout_label = f"a rollout step, {lay.rollout_batch_size} rows x {lay.rollout_sampler_steps} sampler steps"
        label, act, other, other_bytes = (rollout_label, rollout, lcm_label, lcm) if rollout > lcm else (lcm_label, lcm, rollout_label, rollout)
        label += f" ({other}: {other_bytes / GiB:.2f} GiB)"
    L.append((f"student activations: {label}", act, "measured (meta device)"))
    if lay.rollout_batch_size and rollout > lcm and not lay.gpu:
        # the rollout steps follow the LCM steps; on a CPU worker glibc's heap keeps what the LCM steps' activations
        # freed, and the rollout chain's tensors (of other sizes) grow it further: the toy's lora mode, peak RSS growth
        # over the plan without this line 53 / 97 / 156 MiB at 8 / 32 / 64 LCM rows, with it 37 / 31 / 18 (the
        # process's own, in its runtime line). A GPU's caching allocator hands freed blocks on to the next step
        L.append((f"{lcm_label}: its activations, kept by the CPU heap", lcm, "estimated"))
    # the CFG teacher (conditional, then unconditional) and the target, one no-grad forward at a time: the merged model's
    merged_row = no_grad_bytes_per_row(key, lay.resolution // a.vae_factor, "float32", lay.style)
    L.append((f"teacher / target forward, {lay.batch_size} rows (no grad)", merged_row * lay.batch_size, "measured (meta device)"))
    L.append(
        (
            "CUDA context, workspaces, allocator slack" if lay.gpu else "process runtime (torch, Ray worker)",
            (OVERHEAD_BYTES if lay.gpu else GiB) + int(OVERHEAD_FRACTION * sum(b for _, b, _ in L)),
            "estimated",
        )
    )
    return plan


def fast_suggestions(lay: FastLayout, capacity_gb: float) -> list[str]:
    """The single fast.* changes that make a few-step worker fit (fast.mode lora, the largest batch that fits)."""
    out = []

    def fits(layout: FastLayout) -> bool:
        return plan_fast(layout, capacity_gb).fits

    if lay.mode == "full" and fits(replace(lay, mode="lora")):
        out.append("fast.mode: lora")
    b = next((b for b in range(lay.batch_size - 1, 0, -1) if fits(replace(lay, batch_size=b))), None)
    if b:
        out.append(f"fast.batch_size: {b}")
    if lay.rollout_batch_size:
        r = next((r for r in range(lay.rollout_batch_size - 1, 0, -1) if fits(replace(lay, rollout_batch_size=r))), None)
        if r:
            out.append(f"fast.rollout_batch_size: {r}")
    if lay.saved_ema and fits(replace(lay, saved_ema=False)):
        out.append("fast.saved_ema_decay: null")
    return out or [f"nothing fits in {capacity_gb:g} GiB with single fast.* changes (fast.mode lora, fewer rows per step): use a larger GPU"]


# ---- from a merge config ------------------------------------------------------------------


def _lora_file_bytes(path: str) -> int | None:
    p = Path(path)
    if not p.is_file():
        return None
    with open(p, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(n))
    total = 0
    for key, info in header.items():
        if key == "__metadata__" or "text_encoder" in key or not key.startswith(("unet", "lora_unet", "down_blocks", "up_blocks", "mid_block")):
            continue
        numel = math.prod(info["shape"])
        total += 4 * numel  # counted as fp32, scaled to teacher_dtype by plan_layout
    return total


def _config_arch(cfg) -> tuple[str, str]:
    base = Path(cfg.student.base)
    if (base / "unet" / "config.json").is_file():
        arch = arch_from_folder(base)
        return register_arch(f"folder:{base}", arch), arch.source
    name = "sdxl" if "xl" in base.name.lower() else "sd15"
    return name, f"{base} is not here: assuming the {name.upper()} architecture from its name"


def _group_layout(cfg, key: str, hosted: list, num_styles: int, lora_rank: int) -> tuple[Layout, list[str]]:
    """The distill-stage layout of a worker hosting the teachers `hosted` (LoRA sizes from the files, else rank `lora_rank`)."""
    notes = []
    k = len(hosted)
    groups: dict[str, list] = {}
    if cfg.scaling.share_lora_base:
        for spec in hosted:
            fmt = spec.format or ("lora" if spec.source.endswith(".safetensors") and "lora" in spec.source.lower() else None)
            if fmt is None:
                try:
                    fmt = spec.resolved_format()
                except Exception:  # noqa: BLE001 - a missing file: planned as a full teacher
                    fmt = "full"
            if fmt == "lora" and spec.base:
                groups.setdefault(spec.base, []).append(spec)
    shared = [g for g in groups.values() if len(g) > 1]  # teacher_bank: a lone LoRA of its base is fused (a full teacher)
    loras = [s for g in shared for s in g]
    sizes, assumed = [], []
    for spec in loras:
        size = _lora_file_bytes(spec.source)
        if size is None:
            size = 4 * lora_params(key, lora_rank)
            assumed.append(spec.name)
        sizes.append(size)
    if assumed:
        notes.append(
            f"LoRA file(s) of {', '.join(assumed[:3])}{' ...' if len(assumed) > 3 else ''} not here: planned as rank "
            f"{lora_rank} on the attention/proj/ff layers"
        )
    from dmm_ray.distill.streams import mixture_rows

    d = cfg.distill
    lay = Layout(
        arch=key,
        teachers_on_worker=k,
        lora_teachers=len(loras),
        lora_adapter_bytes=tuple(sizes),
        lora_bases=max(1, len(shared)),
        batch_per_style=cfg.data.stream.batch_size,
        resolution=cfg.data.encode.resolution,  # distill trains on the latent shards (synthesized rows join them at that size)
        num_styles=num_styles,
        teacher_dtype=d.teacher_dtype,
        bf16=d.bf16,
        gpu=cfg.scaling.use_gpu,
        gradient_checkpointing=d.gradient_checkpointing,
        optimizer=d.optimizer,
        ema=d.ema_decay is not None,
        offload=cfg.scaling.teacher_offload,
        lambda_adv=d.lambda_adv,
        adapter_rank=cfg.student.style_adapters.rank,
        adapter_targets=tuple(cfg.student.style_adapters.targets),
        style_film=cfg.student.style_film,
        mixture_rows=mixture_rows(cfg.data.stream.batch_size, d.mixture_fraction) if d.mixture_fraction > 0 and k > 1 else 0,
    )
    return lay, notes


@dataclass(frozen=True)
class WorkerLayout:
    """One worker of one training stage, as the merge lays them out (dmm_ray.distill.layout), or the
    few-step stage's (every one of its fast.num_workers workers alike)."""

    stage: str  # "distill" | "finetune" | "fast"
    teachers: tuple[str, ...]  # the names of the teachers it hosts (none: the regulariser, the few-step worker)
    layout: Layout | FastLayout
    notes: tuple[str, ...] = ()
    kind: str = "teacher"  # "teacher" | "regularizer" | "fast"

    @property
    def batch_key(self) -> str:
        if self.kind == "fast":
            return "fast.batch_size"
        return "synthesis.finetune_batch_size" if self.stage == "finetune" else "data.stream.batch_size"

    @property
    def who(self) -> str:
        """The worker(s) a refusal names."""
        if self.kind == "fast":
            return f"each of its fast.num_workers = {self.layout.workers} worker(s)"
        return "the regularisation worker" if self.kind == "regularizer" else "one worker"

    def describe(self) -> str:
        lay = self.layout
        if self.kind == "fast":
            rollout = (
                f"; rollout steps: {lay.rollout_batch_size} rows x {lay.rollout_sampler_steps} sampler steps at {lay.rollout_resolution} px"
                if lay.rollout_batch_size
                else ""
            )
            return f"worker: the merged model (teacher) + a {lay.mode} student, {lay.batch_size} rows per LCM step at {lay.resolution} px{rollout}"
        k = lay.teachers_on_worker
        if self.kind == "regularizer":
            return f"regularisation worker (the previous merged model), {k} x {lay.batch_per_style} rows per micro-batch at {lay.resolution} px"
        names = ", ".join(self.teachers[:3]) + (", ..." if len(self.teachers) > 3 else "")
        return f"worker hosting {k} teacher{'s' if k > 1 else ''} ({names}), {k} x {lay.batch_per_style} rows per micro-batch at {lay.resolution} px"


def _styles(cfg, notes: list[str]) -> tuple[int, int]:
    """(every style of the merge's student, the previous model's old ones): an incremental merge's old styles too."""
    old = 0
    if cfg.incremental.base_merged:
        from dmm_ray.models.style_unet import merged_style_names

        try:
            old = len(merged_style_names(cfg.incremental.base_merged))
        except (OSError, ValueError) as error:  # validate_before_ray names it; the plan still prints
            notes.append(f"incremental.base_merged's styles not read ({error}): planned with the new teachers' styles only")
    return len(cfg.teachers) + old, old


def worker_layouts(cfg, lora_rank: int = 64) -> list[WorkerLayout]:
    """Every teacher group's worker (one group per distinct set of hosted teachers) and an incremental
    merge's regularisation worker, in every stage that trains: distill at data.encode.resolution and
    data.stream.batch_size rows per style, the fine-tune (when it runs) at the synthesized samples'
    resolution and synthesis.finetune_batch_size. Every worker's student and discriminator have all
    the styles: an incremental merge's old ones too."""
    from dmm_ray.distill.layout import worker_layout

    key, how = _config_arch(cfg)
    notes = [f"architecture: {how}"]
    styles, old = _styles(cfg, notes)
    previous = _previous_model_params(cfg, notes) if cfg.regularization_workers and old else 0
    out = []
    roles = worker_layout(len(cfg.teachers), 1, teachers_per_worker=cfg.scaling.teachers_per_worker)
    for role in roles:
        hosted = [cfg.teachers[i] for i in role.teacher_indices]
        lay, own = _group_layout(cfg, key, hosted, styles, lora_rank)
        names = tuple(t.name for t in hosted)
        out.append(WorkerLayout("distill", names, lay, tuple(notes + own)))
        if cfg.finetunes:  # trainer.stage_config: the same workers at the fine-tune's rows per style, no mixture block
            ft = replace(lay, batch_per_style=cfg.synthesis.finetune_batch_size, resolution=cfg.synthesis_resolution, mixture_rows=0)
            out.append(WorkerLayout("finetune", names, ft, tuple(notes + own)))
    if previous:
        out += _regulariser_layouts(cfg, out[0].layout, max(len(r.teacher_indices) for r in roles), previous, notes)
    return out


def _previous_model_params(cfg, notes: list[str]) -> int:
    """The parameters of an incremental merge's previous model, counted from its config (0: not read)."""
    folder = Path(cfg.incremental.base_merged)
    try:
        return _params(_meta_style_unet(folder))
    except (OSError, ValueError) as error:  # validate_before_ray names it; the plan still prints
        notes.append(f"the regularisation worker is not planned: {folder / 'unet'} not read ({error})")
        return 0


def _regulariser_layouts(cfg, teacher: Layout, reads: int, previous: int, notes: list[str]) -> list[WorkerLayout]:
    """The incremental merge's regularisation worker (loop.build_models): the student and discriminator
    of a teacher worker (`teacher`, its layout), but in place of teachers the previous merged StyleUNet
    in fp32 (parameters counted from its config) on the student's text encoder. Its batch
    (distill.streams.StageBatches): distill, the common rows of each of a teacher worker's `reads` reads
    per step (with incremental.old_style_samples also their synthesized share, from the previous
    model's samples); the fine-tune, one read of synthesis.finetune_batch_size rows."""
    from dmm_ray.data.config import split_batch

    folder = Path(cfg.incremental.base_merged)
    n_common, n_synth = split_batch(cfg.data.stream.batch_size, cfg.data.synthetic_fraction)
    lay = replace(
        teacher,
        teachers_on_worker=reads,
        lora_teachers=0,
        lora_adapter_bytes=(),
        batch_per_style=n_common + (n_synth if cfg.old_style_samples else 0),
        teacher_dtype="float32",
        offload=False,
        mixture_rows=0,
        previous_model_params=previous,
    )
    own = tuple(notes) + (f"the previous merged model: {previous / 1e6:.1f}M parameters, counted from {folder / 'unet' / 'config.json'}",)
    out = [WorkerLayout("distill", (), lay, own, "regularizer")]
    if cfg.finetunes:
        ft = replace(lay, teachers_on_worker=1, batch_per_style=cfg.synthesis.finetune_batch_size, resolution=cfg.synthesis_resolution)
        out.append(WorkerLayout("finetune", (), ft, own, "regularizer"))
    return out


def fast_worker(cfg, model_dir: str | Path | None = None) -> WorkerLayout:
    """The few-step stage's worker (fast.*): of the merged model in `model_dir` (jobs/fast.py; its
    configs read, the StyleUNet built on the meta device), else of the model the merge will save (a
    merge with fast.enabled: the student's architecture with every style). LCM rows at the latent
    shards' resolution, rollout pairs at the merged model's samples' (synthesis resolution)."""
    f = cfg.fast
    notes: list[str] = []
    if model_dir is not None:
        folder = Path(model_dir)
        key = register_arch(f"folder:{folder}", arch_from_folder(folder))
        unet = _meta_style_unet(folder)
        params, codebook = _params(unet), unet.class_embedding.codebook.weight.numel()
        lora = _lora_count(unet, f.lora_rank, f.lora_targets)
        style = StyleModules.of_folder(folder)
        notes.append(f"the merged model: {params / 1e6:.1f}M parameters, counted from {folder / 'unet' / 'config.json'}")
    else:
        key, how = _config_arch(cfg)
        notes.append(f"architecture: {how}")
        styles, _ = _styles(cfg, notes)
        s = cfg.student.style_adapters
        style = StyleModules(styles, cfg.student.style_film, s.rank, tuple(s.targets) if s.rank else ())
        params = student_params(key, styles, s.rank, tuple(s.targets), cfg.student.style_film)
        codebook = styles * _ARCHS[key].unet["block_out_channels"][0] * 4  # N x the time embedding dim
        lora = lora_params(key, f.lora_rank, tuple(f.lora_targets))
    batch = f.batch_size or cfg.data.stream.batch_size
    lay = FastLayout(
        arch=key,
        model_params=params,
        lora_params=lora,
        full_trainable_params=params - codebook,  # fast.lcm.full_trainable: the codebook stays frozen
        mode=f.mode,
        batch_size=batch,
        resolution=cfg.data.encode.resolution,
        saved_ema=f.saved_ema_decay is not None,
        rollout_batch_size=(f.rollout_batch_size or batch) if f.rollout_steps else 0,
        rollout_sampler_steps=max(f.rollout_step_counts) if f.rollout_steps else 0,
        rollout_resolution=cfg.synthesis_resolution,
        gpu=cfg.scaling.use_gpu,
        workers=f.num_workers,
        style=style,
        lora_rank=f.lora_rank,
        lora_targets=tuple(f.lora_targets),
    )
    return WorkerLayout("fast", (), lay, tuple(notes), "fast")


def suggestions(
    lay: Layout, capacity_gb: float, num_teachers: int, workers_per_teacher: int = 1, batch_key: str = "data.stream.batch_size"
) -> list[str]:
    """The single changes that make `lay` fit (smallest k / batch change that fits), else one combination."""
    out = []

    def with_k(k: int, **change) -> Layout:
        n_lora = min(lay.lora_teachers, k) if min(lay.lora_teachers, k) > 1 else 0
        bases = max(1, min(lay.lora_bases, n_lora // 2))  # each shared base holds two LoRAs or more
        return replace(
            lay, teachers_on_worker=k, lora_teachers=n_lora, lora_adapter_bytes=lay.lora_adapter_bytes[:n_lora], lora_bases=bases, **change
        )

    def fits(layout: Layout) -> bool:
        return plan_layout(layout, capacity_gb).fits

    def workers(k: int) -> int:
        return -(-num_teachers // k) * workers_per_teacher

    # distill.mixture_fraction mixes the teachers one worker hosts: it needs 2 or more (MergeConfig refuses 1)
    fewest = 2 if lay.mixture_rows else 1
    if not lay.gradient_checkpointing and fits(replace(lay, gradient_checkpointing=True)):
        out.append("distill.gradient_checkpointing: true")
    if lay.teacher_dtype == "float32" and fits(replace(lay, teacher_dtype="bfloat16")):
        out.append("distill.teacher_dtype: bfloat16")
    if not lay.offload and lay.teachers_on_worker - lay.lora_teachers > 2 and fits(replace(lay, offload=True)):
        out.append("scaling.teacher_offload: true")
    if lay.optimizer != "adamw8bit" and fits(replace(lay, optimizer="adamw8bit")):
        out.append("distill.optimizer: adamw8bit")
    k = next((k for k in range(lay.teachers_on_worker - 1, fewest - 1, -1) if fits(with_k(k))), None)
    if k:
        out.append(f"scaling.teachers_per_worker: {k} (W = {workers(k)} workers)")
    b = next((b for b in range(lay.batch_per_style - 1, 0, -1) if fits(replace(lay, batch_per_style=b))), None)
    if b:
        out.append(f"{batch_key}: {b} (per style; distill.grad_accum: {math.ceil(lay.batch_per_style / b)} keeps the samples per step)")
    if out:
        return out
    if lay.previous_model_params:  # the regulariser: its previous model is fp32 whatever distill.teacher_dtype, and never offloaded
        savings = dict(gradient_checkpointing=True, optimizer="adamw8bit")
        label = "distill.gradient_checkpointing: true + distill.optimizer: adamw8bit"
    else:
        savings = dict(
            gradient_checkpointing=True, teacher_dtype="bfloat16", optimizer="adamw8bit", offload=lay.teachers_on_worker - lay.lora_teachers > 2
        )
        label = "distill.gradient_checkpointing: true + distill.teacher_dtype: bfloat16 + distill.optimizer: adamw8bit"
        label += " + scaling.teacher_offload: true" if savings["offload"] else ""
    k = next((k for k in range(lay.teachers_on_worker, fewest - 1, -1) if fits(with_k(k, **savings))), None)
    if k:
        return [f"{label} + scaling.teachers_per_worker: {k} (W = {workers(k)} workers)"]
    k = min(fewest, lay.teachers_on_worker)
    b = next((b for b in range(lay.batch_per_style - 1, 0, -1) if fits(with_k(k, batch_per_style=b, **savings))), None)
    if b:
        return [f"{label} + scaling.teachers_per_worker: {k} (W = {workers(k)} workers) + {batch_key}: {b}"]
    hosted = "one teacher" if k == 1 else f"{k} teachers (distill.mixture_fraction mixes them)"
    return [f"nothing fits in {capacity_gb:g} GiB, even {hosted} per worker at 1 row per style with every saving: use a larger GPU"]


class MemoryPlanError(ValueError):
    """The layout does not fit `scaling.gpu_memory_gb`."""


def plan_worker(worker: WorkerLayout, capacity_gb: float | None) -> Plan:
    """`worker`'s plan (plan_fast for the few-step stage's, plan_layout for the merge's), its notes and itself attached."""
    plan = plan_fast(worker.layout, capacity_gb) if worker.kind == "fast" else plan_layout(worker.layout, capacity_gb)
    plan.notes, plan.worker = list(worker.notes), worker
    return plan


def all_plans(cfg, lora_rank: int = 64) -> list[Plan]:
    """The plan of every worker of every stage that trains: the merge's (worker_layouts) and, with
    fast.enabled, the few-step stage's (of the model the merge will save)."""
    workers = worker_layouts(cfg, lora_rank) + ([fast_worker(cfg)] if cfg.fast.enabled else [])
    return [plan_worker(w, cfg.scaling.gpu_memory_gb) for w in workers]


def largest_plans(cfg, lora_rank: int = 64) -> list[Plan]:
    """The largest plan of each kind of worker (teacher workers, the regularisation worker, the few-step
    stage's), in that order: what --dry-run prints and every run checks."""
    plans = all_plans(cfg, lora_rank)
    out = []
    for kind in ("teacher", "regularizer", "fast"):
        mine = [p for p in plans if p.worker.kind == kind]
        if mine:
            out.append(max(mine, key=lambda p: p.total))
    return out


def plan_config(cfg, lora_rank: int = 64) -> tuple[Plan, Layout | FastLayout]:
    """The plan of the worker that needs the most memory (of every worker in every stage), and its layout."""
    plan = max(all_plans(cfg, lora_rank), key=lambda p: p.total)
    return plan, plan.worker.layout


def describe(cfg, plan: Plan) -> str:
    worker = plan.worker
    if worker.kind == "fast":
        return plan.format(f"memory plan of the few-step stage (per worker; fast.num_workers = {worker.layout.workers}; {worker.describe()})")
    if worker.kind == "regularizer":
        return plan.format(
            f"memory plan of the incremental merge's regularisation worker (the largest: the {worker.stage} stage's {worker.describe()})"
        )
    return plan.format(f"memory plan (per worker; W = {cfg.num_workers}; the largest: the {worker.stage} stage's {worker.describe()})")


def describe_config(cfg, lora_rank: int = 64) -> str:
    """The plans --dry-run prints: the largest teacher worker's, the regularisation worker's, the few-step stage's."""
    return "\n".join(describe(cfg, p) for p in largest_plans(cfg, lora_rank))


def _tips(cfg, plan: Plan) -> list[str]:
    if plan.worker.kind == "fast":
        return fast_suggestions(plan.worker.layout, cfg.scaling.gpu_memory_gb)
    return suggestions(plan.worker.layout, cfg.scaling.gpu_memory_gb, len(cfg.teachers), cfg.workers_per_teacher, plan.worker.batch_key)


def refusal(cfg, plan: Plan) -> MemoryPlanError:
    """The error for a plan that does not fit: the stage, the worker, the numbers, the plan, the changes that fit."""
    return MemoryPlanError(
        f"the {plan.worker.stage} stage does not fit: {plan.worker.who} needs {plan.total / GiB:.1f} GiB but "
        f"scaling.gpu_memory_gb is {cfg.scaling.gpu_memory_gb:g} GiB\n{describe(cfg, plan)}\nit fits with any of:\n"
        + "\n".join(f"  {t}" for t in _tips(cfg, plan))
    )


def check_fits(cfg, lora_rank: int = 64) -> Plan | None:
    """Raise MemoryPlanError when scaling.gpu_memory_gb is set and a worker does not fit (the largest of those
    that do not); else the plan of the largest worker."""
    if cfg.scaling.gpu_memory_gb is None:
        return None
    plans = largest_plans(cfg, lora_rank)
    too_large = [p for p in plans if not p.fits]
    if too_large:
        raise refusal(cfg, max(too_large, key=lambda p: p.total))
    return max(plans, key=lambda p: p.total)


def check_fast_fits(cfg, model_dir: str | Path) -> Plan:
    """The few-step stage's plan of the merged model in `model_dir` (jobs/fast.py, a merge's fast stage);
    a MemoryPlanError when scaling.gpu_memory_gb is set and one of its workers does not fit."""
    plan = plan_worker(fast_worker(cfg, model_dir), cfg.scaling.gpu_memory_gb)
    if not plan.fits:
        raise refusal(cfg, plan)
    return plan


# ---- the README table ---------------------------------------------------------------------

TABLE_GPUS = (24, 48, 80)
SAVINGS = [  # tried in this order, the first that fits is reported
    ("bf16 teachers", dict(teacher_dtype="bfloat16")),
    ("bf16 teachers, checkpointing", dict(teacher_dtype="bfloat16", gradient_checkpointing=True)),
    ("bf16 teachers, checkpointing, offload", dict(teacher_dtype="bfloat16", gradient_checkpointing=True, offload=True)),
    ("bf16 teachers, checkpointing, 8-bit AdamW", dict(teacher_dtype="bfloat16", gradient_checkpointing=True, optimizer="adamw8bit")),
    (
        "bf16 teachers, checkpointing, offload, 8-bit AdamW",
        dict(teacher_dtype="bfloat16", gradient_checkpointing=True, offload=True, optimizer="adamw8bit"),
    ),
]


def best_layout(arch: str, n: int, lora: bool, gpu_gb: float, batch: int, lora_rank: int = 64) -> tuple[int, int, str, Plan] | None:
    """Fewest GPUs that fit: (k, rows per style, savings, plan). The largest k that fits with the cheapest
    savings, then k evened out to ceil(n / GPUs); with nothing at `batch` rows per style, fewer rows."""
    res = ARCHITECTURES[arch][2]
    adapter = 4 * lora_params(arch, lora_rank)

    def layout(k: int, rows: int, change: dict) -> Layout:
        nl = k if lora and k > 1 else 0
        return Layout(
            arch=arch,
            teachers_on_worker=k,
            lora_teachers=nl,
            lora_adapter_bytes=(adapter,) * nl,
            batch_per_style=rows,
            resolution=res,
            num_styles=n,
            **change,
        )

    rows = batch
    while rows >= 1:
        for k in range(n, 0, -1):
            for label, change in SAVINGS:
                if lora and change.get("offload"):
                    continue
                if plan_layout(layout(k, rows, change), gpu_gb).fits:
                    k = -(-n // -(-n // k))  # the same GPU count with the teachers spread evenly
                    return k, rows, label, plan_layout(layout(k, rows, change), gpu_gb)
        rows //= 2
    return None


def readme_table(batch: int = 4, lora_rank: int = 64) -> str:
    rows = [("SD1.5", "sd15", 8, False), ("SD1.5", "sd15", 32, True), ("SDXL", "sdxl", 8, False), ("SDXL", "sdxl", 32, True)]
    head = "| base | teachers | " + " | ".join(f"{g} GB GPU" for g in TABLE_GPUS) + " |"
    out = [head, "|---|---|" + "---|" * len(TABLE_GPUS)]
    for label, arch, n, lora in rows:
        cells = []
        for g in TABLE_GPUS:
            best = best_layout(arch, n, lora, g, batch, lora_rank)
            if best is None:
                cells.append("does not fit")
            else:
                k, per_style, saving, plan = best
                gpus = -(-n // k)
                cells.append(f"**{gpus} GPU{'s' if gpus > 1 else ''}**: k = {k}, {per_style} rows/style; {saving}; {plan.total / GiB:.0f} GiB")
        what = f"{n} LoRA (rank {lora_rank})" if lora else f"{n} full"
        out.append(f"| {label} | {what} | " + " | ".join(cells) + " |")
    return "\n".join(out)


@cli_main
def main(argv=None) -> int:
    """`python -m dmm_ray.memory_plan`: a job's command line (console.cli_main), so a config that does not load or
    validate (a missing file, a `--set` typo, bad YAML) is one `error:` line and exit 2, as in jobs/merge.py, not a
    traceback; a plan that does not fit exits 2 too."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a merge config (YAML); --set overrides as in jobs/merge.py")
    add_set_argument(parser, help="with --config: override a config value by dotted key, as in jobs/merge.py (repeatable)")
    parser.add_argument("--table", action="store_true", help="the README table: SD1.5/SDXL, 8 full / 32 LoRA teachers, 24/48/80 GB")
    parser.add_argument("--batch", type=positive_int, default=4, help="--table: rows per style per step (default: %(default)s)")
    parser.add_argument(
        "--lora-rank", type=positive_int, default=64, help="rank of LoRAs whose files are not here (and of --table; default: %(default)s)"
    )
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "config")
    if args.table and (args.config or args.overrides):  # the table plans its own fixed cases: they were ignored
        parser.error("--table plans the README's fixed cases: --config and --set do not apply to it; give --config or --table")
    if args.table:
        print(readme_table(args.batch, args.lora_rank))
        return 0
    if not args.config:
        parser.error("give --config or --table")
    if given_options(parser, args, "batch"):  # ignored with --config: its rows per style are the config's
        parser.error("--batch sizes --table's cases; --config's plan takes its rows per style from the config")
    from dmm_ray.config import load_config
    from dmm_ray.paths import expand

    cfg = load_config(expand(args.config), args.overrides)
    plans = largest_plans(cfg, args.lora_rank)
    print(describe_config(cfg, args.lora_rank))
    for plan in (p for p in plans if not p.fits):
        print(f"the {plan.worker.stage} stage fits with any of:\n" + "\n".join(f"  {t}" for t in _tips(cfg, plan)))
    return 0 if all(p.fits for p in plans) else 2


if __name__ == "__main__":
    sys.exit(main())

"""StyleUNet: a diffusers UNet2DConditionModel with DMM's style-prompt codebook (paper 3.3, A.1).

The student gets N learnable style prompts e_1..e_N (a codebook of width d = time_embed_dim,
1280 for SD1.5) and an MLP (Linear -> SiLU -> Linear, d -> d). The MLP output is added to the
timestep embedding: emb = time_embedding(t) + MLP(e~), with e~ = sum_i w_i e_i for a mixture
(paper 4.5, interpolation in codebook space *before* the MLP).

We reuse diffusers' own forward unchanged: the style module sits in the UNet's
`class_embedding` slot, whose output diffusers adds to the timestep embedding. So SD1.5 and SDXL
(whose `text_time` add-embedding is kept) both work, and so does every diffusers feature
(attention processors, LoRA, ControlNet residuals).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401  (ModelMixin: see below)
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from dmm_ray.defaults import SD_ADAPTER_TARGETS, untargetable_problem
from dmm_ray.models.style_adapters import (
    SINGLE_STYLE_TOL,
    StyleAdapter,
    adapter_key,
    codebook_pinv,
    style_runs,
    target_modules,
    weights_from_embeds,
)
from dmm_ray.styles import StyleError, style_weights  # noqa: F401  (StyleError re-exported)

# diffusers' pipeline loader looks up the loadable base classes (ModelMixin, ...) as attributes of
# the module named in model_index.json, so `DMMPipeline.from_pretrained` needs ModelMixin here.
__all__ = ["StyleUNet", "StyleEmbedding", "StyleError", "resolve_style", "ModelMixin"]

# config keys a StyleUNet adds to UNet2DConditionModel's (dropped when a plain UNet is made from one)
STYLE_CONFIG_KEYS = ("style_names", "style_film", "style_adapter_rank", "style_adapter_modules")

StyleSpec = "int | str | Mapping[str, float] | Sequence[float] | torch.Tensor"


class StyleEmbedding(nn.Module):
    """Codebook of style prompts + MLP. Input: codebook-space embeddings e~ (B, d).

    Optional extension (`film_channels`, not in the paper): one zero-initialised Linear(d, 2C) per
    ResNet block maps SiLU(MLP(e~)) to a per-channel scale and shift of that block's norm2 output,
    so each style gets its own gain and bias in every block instead of only the bias it can reach
    through the shared time embedding. At initialisation it is the identity."""

    def __init__(self, num_styles: int, dim: int, film_channels: Sequence[int] = ()):
        super().__init__()
        self.adapters = nn.ModuleDict()  # per-style low-rank deltas (style_adapters.py), filled by StyleUNet
        self.codebook = nn.Embedding(num_styles, dim)  # (N, d), PyTorch default init like the reference
        self.mlp = TimestepEmbedding(dim, dim)  # linear_1 -> SiLU -> linear_2
        self.film = nn.ModuleList(nn.Linear(dim, 2 * c) for c in film_channels)
        for layer in self.film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._current: torch.Tensor | None = None  # MLP(e~) of the forward in progress, read by the FiLM hooks
        self._fused: torch.Tensor | None = None  # (N,) style weights folded into the adapted layers (StyleUNet.fused_style)
        self._fused_embeds: torch.Tensor | None = None  # (d,) that style's e~, as the pipeline hands it to the forward
        self._adapters_on = True  # False when every row is the folded style: the hooks then add nothing
        self._pinv: tuple[torch.Tensor, torch.Tensor] | None = None  # (a copy of the codebook, its C^+)

    def codebook_pinv(self) -> torch.Tensor:
        """C^+ (d, N) of the codebook, computed again only when the codebook's values changed: the cache
        keeps a copy of the codebook (N x d: small) and compares values, so every change counts (an
        optimizer step, a load, add_styles, a move, `.data =`, and `param.data.copy_`, which diffusers'
        EMAModel.copy_to / restore use and which moves neither the version counter nor the address).
        Sampling reads the same C^+ every forward; a pseudo-inverse per forward was 0.3 ms of a 7 ms toy
        UNet call, and on a GPU an SVD per forward (the comparison is one small read)."""
        c = self.codebook.weight.detach()
        cached = self._pinv
        if cached is None or cached[0].shape != c.shape or cached[0].device != c.device or not torch.equal(cached[0], c):
            self._pinv = (c.clone(), codebook_pinv(c))
        return self._pinv[1]

    def forward(self, style_embeds: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        out = self.mlp(style_embeds)
        self._current = out
        if len(self.adapters):
            weights = weights_from_embeds(style_embeds, pinv=self.codebook_pinv())  # (B, N), read by the adapter hooks
            if self._fused is not None:  # the layers already hold the folded style's delta; the delta is linear in w
                weights = weights - self._fused.to(weights)
                # rows that hold the folded style's own e~ add nothing, exactly: least squares returns their w
                # only up to e~'s rounding (1e-4..1e-3 in float16 / bfloat16, above SINGLE_STYLE_TOL)
                weights[(style_embeds == self._fused_embeds).all(dim=1)] = 0
            self._weights = weights
            self._runs = {}  # batch size -> style_runs of the weights at that size (CFG doubles the batch)
            self._adapters_on = self._fused is None or bool((weights.abs() > SINGLE_STYLE_TOL).any())
        return out

    def adapter_weights(self, batch: int) -> torch.Tensor:
        """Style weights (B, N) of the forward in progress, repeated to the layer's batch (CFG halves)."""
        w = getattr(self, "_weights", None)
        if w is None or self._current is None:
            raise RuntimeError("style adapters used outside a StyleUNet forward")
        return w if w.shape[0] == batch else w.repeat(batch // w.shape[0], 1)

    def adapter_runs(self, batch: int) -> list[tuple[int, int, int]] | None:
        """The one-style row runs of `adapter_weights(batch)`, computed once per forward and size;
        None (the dense N-style path) when runs average under 4 rows: then the per-run small ops
        cost more than the N-fold wider dense product they save (measured at the toy size)."""
        if batch not in self._runs:
            runs = style_runs(self.adapter_weights(batch))
            self._runs[batch] = runs if 4 * len(runs) <= batch else None
        return self._runs[batch]

    def film_params(self, k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of ResNet block k, each (B, C_k, 1, 1)."""
        s = self._current
        if s is None:
            raise RuntimeError("style FiLM used outside a StyleUNet forward")
        gamma, beta = self.film[k](torch.nn.functional.silu(s)).chunk(2, dim=1)
        if gamma.shape[0] != batch:
            gamma, beta = gamma.repeat(batch // gamma.shape[0], 1), beta.repeat(batch // beta.shape[0], 1)
        return gamma[:, :, None, None], beta[:, :, None, None]


class _FilmHook:
    """norm2 output (B, C_k, h, w) -> scaled and shifted per style. A callable object, not a closure,
    so copy.deepcopy / pickle of the UNet carry hooks that point at the copy's own style module."""

    def __init__(self, style_module: StyleEmbedding, k: int):
        self.style_module, self.k = style_module, k

    def __call__(self, _module, _inputs, output):
        gamma, beta = self.style_module.film_params(self.k, output.shape[0])
        return output * (1 + gamma.to(output.dtype)) + beta.to(output.dtype)


class _AdapterHook:
    """Layer output + the sample's per-style low-rank delta (same deepcopy-safe form as _FilmHook)."""

    def __init__(self, style_module: StyleEmbedding, adapter: StyleAdapter):
        self.style_module, self.adapter = style_module, adapter

    def __call__(self, _module, inputs, output):
        style = self.style_module
        if not style._adapters_on:
            return output
        x = inputs[0]
        weights, runs = style.adapter_weights(x.shape[0]), style.adapter_runs(x.shape[0])
        if not torch.is_grad_enabled():  # sampling: into the layer's own fresh output, run by run
            return self.adapter.add_delta_(output, x, weights, runs)
        return output + self.adapter.delta(x, weights, runs)


def resolve_style(style_names: Sequence[str], style) -> torch.Tensor:
    """One style selection -> normalised weight vector (N,) float32 (`dmm_ray.styles.style_weights`:
    a name, an index, a dict name->weight, or a list/tensor of N weights)."""
    if isinstance(style, torch.Tensor):
        style = int(style) if style.ndim == 0 and not style.is_floating_point() else style.detach().flatten().tolist()
    return torch.tensor(style_weights(style_names, style), dtype=torch.float32)


def _parent_init_parameters():
    return list(inspect.signature(UNet2DConditionModel.__init__).parameters.values())


class StyleUNet(UNet2DConditionModel):
    """UNet2DConditionModel + style codebook. Config field `style_names` keeps name <-> index."""

    # diffusers' layerwise casting (`enable_layerwise_casting`) upcasts a layer's weights in its own forward;
    # the codebook is read as a tensor (style_embeds_for, the adapters' C^+), so it keeps the model's dtype
    _skip_layerwise_casting_patterns = [*UNet2DConditionModel._skip_layerwise_casting_patterns, r"class_embedding\.codebook"]

    def __init__(
        self,
        *args,
        style_names: Sequence[str] = ("style_0",),
        style_film: bool = False,
        style_adapter_rank: int = 0,
        style_adapter_modules: Sequence[str] = (),
        **kwargs,
    ):
        if kwargs.get("class_embed_type") is not None or kwargs.get("num_class_embeds") is not None:
            raise ValueError("StyleUNet uses the class-embedding slot for styles; the base UNet must have none")
        super().__init__(*args, **kwargs)
        style_names = [str(s) for s in style_names]
        _check_unique(style_names)
        style_adapter_modules = list(style_adapter_modules) if style_adapter_rank else []
        self.register_to_config(
            style_names=style_names,
            style_film=bool(style_film),
            style_adapter_rank=int(style_adapter_rank),
            style_adapter_modules=style_adapter_modules,
        )
        time_embed_dim = self.time_embedding.linear_2.out_features
        _check_adapter_styles(len(style_names), time_embed_dim, style_adapter_modules)
        resnets = [m for m in self.modules() if isinstance(m, ResnetBlock2D)] if style_film else []
        self.class_embedding = StyleEmbedding(len(style_names), time_embed_dim, [r.norm2.num_channels for r in resnets])
        for k, resnet in enumerate(resnets):
            resnet.norm2.register_forward_hook(_FilmHook(self.class_embedding, k))
        problem = untargetable_problem((name, [name]) for name in style_adapter_modules)  # a hand-written config, not from_unet
        if problem:
            raise ValueError(problem)
        modules = dict(self.named_modules())
        self._adapted_layers: list[tuple[str, nn.Module]] = []  # the layers the hooks sit on (a PEFT LoRA keeps them as base_layer)
        for name in style_adapter_modules:
            if name not in modules:
                raise ValueError(f"style adapter module {name!r} is not a module of this UNet")
            adapter = StyleAdapter(modules[name], len(style_names), int(style_adapter_rank))
            self.class_embedding.adapters[adapter_key(name)] = adapter
            modules[name].register_forward_hook(_AdapterHook(self.class_embedding, adapter))
            self._adapted_layers.append((name, modules[name]))
        self._style_context: torch.Tensor | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        style_names: Sequence[str],
        style_init: str = "random",
        style_film: bool = False,
        adapter_rank: int = 0,
        adapter_targets: Sequence[str] | None = None,
    ) -> "StyleUNet":
        """Wrap a base UNet: every base weight is copied; only the codebook and MLP are new.

        style_init="random": PyTorch's default init (the reference code); "zero": the MLP's last
        linear starts at 0, so MLP(e) = 0 and the student's output equals the base's exactly.
        adapter_rank > 0 adds per-style rank-r adapters on the `adapter_targets` layers (default: the
        merge config's, `dmm_ray.defaults.SD_ADAPTER_TARGETS`; zero delta until
        `style_adapters.init_from_teachers` sets them from the teachers)."""
        if style_init not in ("random", "zero"):
            raise ValueError(f"style_init must be 'random' or 'zero', got {style_init!r}")
        if isinstance(inner_unet(unet), StyleUNet):
            # its codebook and MLP were copied as "base" weights (same N: the old styles' rows under the new names,
            # style_init ignored) or failed with torch's size mismatch (other N), its adapters as unexpected keys
            raise ValueError(
                f"from_unet wraps a base UNet; this one is already a StyleUNet (styles {unet.style_names}): add styles "
                "with its add_styles(names) (incremental merge), or wrap the base model's UNet"
            )
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        for key in STYLE_CONFIG_KEYS:
            config.pop(key, None)
        device, dtype = unet.device, unet.dtype
        if adapter_rank and adapter_targets is not None and not list(adapter_targets):
            raise ValueError("adapter_rank > 0 needs adapter_targets (layer names); leave it out for dmm_ray.defaults.SD_ADAPTER_TARGETS")
        targets = SD_ADAPTER_TARGETS if adapter_targets is None else adapter_targets
        modules = target_modules(unet, targets) if adapter_rank else []
        student = cls(**config, style_names=list(style_names), style_film=style_film, style_adapter_rank=adapter_rank, style_adapter_modules=modules)
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        new = [k for k in missing if not k.startswith("class_embedding.")]
        if new or unexpected:
            raise ValueError(f"base UNet does not match StyleUNet: missing {new[:5]}, unexpected {unexpected[:5]}")
        if style_init == "zero":
            with torch.no_grad():
                student.class_embedding.mlp.linear_2.weight.zero_()
                student.class_embedding.mlp.linear_2.bias.zero_()
        # dtype only when it differs: diffusers warns on every dtype cast of a model with _keep_in_fp32_modules
        return student.to(device=device) if dtype == student.dtype else student.to(device=device, dtype=dtype)

    @property
    def style_names(self) -> list[str]:
        return list(self.config.style_names)

    @property
    def num_styles(self) -> int:
        return len(self.config.style_names)

    @property
    def style_dim(self) -> int:
        return self.class_embedding.codebook.embedding_dim

    def add_styles(self, names: Iterable[str], seed: int | None = None) -> list[int]:
        """Append randomly initialised codebook rows (incremental merge); old rows stay bit-identical.
        `seed`: row i is row i of one N(0, 1) stream seeded by it, so the rows an incremental merge of an
        incremental merge adds are not those the first one added (a stream started afresh for the new
        rows gave both increments the same start, which training moves little: cos 0.995 on the toy)."""
        names = [str(n) for n in names]
        _check_unique(self.style_names + names)
        _check_adapter_styles(self.num_styles + len(names), self.style_dim, self.config.style_adapter_modules)
        old = self.class_embedding.codebook
        grown = nn.Embedding(old.num_embeddings + len(names), old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            if seed is not None:
                generator = torch.Generator().manual_seed(seed)
                rows = torch.randn(grown.num_embeddings, old.embedding_dim, generator=generator)[old.num_embeddings :]
                grown.weight[old.num_embeddings :] = rows.to(grown.weight)
            grown.weight[: old.num_embeddings] = old.weight
        self.class_embedding.codebook = grown
        for adapter in self.class_embedding.adapters.values():
            adapter.grow(len(names))
        self.register_to_config(style_names=self.style_names + names)
        return list(range(old.num_embeddings, grown.num_embeddings))

    # ---- style conditioning -------------------------------------------------------------
    def style_embeds_for(
        self,
        style_ids: torch.Tensor | None = None,
        style_weights: torch.Tensor | None = None,
        style_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Codebook-space embeddings e~ (B, d) from exactly one of ids (B,), weights (B, N), embeds (B, d)."""
        given = [x is not None for x in (style_ids, style_weights, style_embeds)]
        if sum(given) != 1:
            raise StyleError("give exactly one of style_ids, style_weights, style_embeds")
        codebook = self.class_embedding.codebook.weight  # (N, d)
        if style_ids is not None:
            style_ids = torch.as_tensor(style_ids)
            # `.long()` truncated a fractional id (0.9 -> style 0) and read a bool mask as ids, silently
            fractional = style_ids.is_floating_point() and not torch.equal(style_ids, style_ids.round())
            if style_ids.dtype == torch.bool or fractional or style_ids.is_complex():
                raise StyleError(
                    f"style_ids must be whole style indices in [0, {self.num_styles}), got {style_ids.dtype} {style_ids.flatten()[:8].tolist()}; "
                    f"for a mixture pass style_weights (B, {self.num_styles}); known styles: {self.style_names}"
                )
            style_ids = style_ids.to(codebook.device).long().reshape(-1)
            if style_ids.numel() and (style_ids.min() < 0 or style_ids.max() >= self.num_styles):
                raise StyleError(f"style ids must be in [0, {self.num_styles}); known styles: {self.style_names}")
            return self.class_embedding.codebook(style_ids)
        if style_weights is not None:
            if style_weights.ndim != 2 or style_weights.shape[1] != self.num_styles:
                raise StyleError(f"style_weights must be (B, {self.num_styles}), got {tuple(style_weights.shape)}")
            # Elementwise product + sum (not a matmul) so a one-hot row reproduces the index path bit-exactly.
            return (style_weights.to(codebook)[:, :, None] * codebook[None]).sum(dim=1)
        if style_embeds.ndim != 2 or style_embeds.shape[1] != self.style_dim:
            raise StyleError(f"style_embeds must be (B, {self.style_dim}), got {tuple(style_embeds.shape)}")
        return style_embeds.to(codebook)

    @contextmanager
    def style_context(self, style_embeds: torch.Tensor):
        """Use these e~ rows (B, d) for calls that pass no style (diffusers pipelines' loops)."""
        previous, self._style_context = self._style_context, style_embeds
        try:
            yield self
        finally:
            self._style_context = previous

    def adapter_folds(self, weights: torch.Tensor):
        """(name, layer, delta W, delta b or None) of every adapted layer for one style selection (N,):
        delta W = sum_i w_i B_i A_i in float32, what `fused_style` and the export add to the layer."""
        styles = [i for i, v in enumerate(weights.tolist()) if v != 0]  # once, not per layer (a sync on a GPU)
        weights = weights.to(self.class_embedding.codebook.weight.device)  # the adapters' device
        for name, layer in self._adapted_layers:
            adapter = self.class_embedding.adapters[adapter_key(name)]
            dw, db = adapter.folded(weights, layer.weight.shape, styles)
            yield name, layer, dw, db

    @contextmanager
    def fused_style(self, rows: torch.Tensor, enabled: bool = True):
        """Fold the style adapters of one style selection into the adapted layers for the length of the
        block, when every row of `rows` (B, N) holds the same style weights w (one request's style: the
        CFG halves and every image share it): W' = W + sum_i w_i B_i A_i, b' = b + sum_i w_i c_i, the
        fold `dmm_ray.export` writes. Each forward then runs the plain layers instead of one low-rank
        product per adapted layer and step (a third to a half of a UNet call on the toy zoo). A row that differs
        from w still gets exactly its own style: its hooks add the delta of (its weights - w), the delta
        being linear in the weights. Inference only: under autograd (training) or with rows that differ,
        or `enabled=False`, nothing is folded. The layers get their own weight tensors back on exit,
        untouched (not W' - delta, which would round). Weights that accelerate or diffusers hooks move
        or cast (CPU offload, group offloading, layerwise casting) are not folded: the hooks would
        reload the stored weights over the fold."""
        style = self.class_embedding
        fold = (
            enabled
            and len(style.adapters) > 0
            and style._fused is None  # an outer block already folded: keep it
            and not torch.is_grad_enabled()
            and rows.ndim == 2
            and rows.shape[0] > 0
            and bool((rows == rows[:1]).all())
            and not self._cannot_fold()
        )
        if not fold:
            yield self
            return
        w = rows[0].detach().float()  # (N,)
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its own data) to put back
        try:
            for _name, layer, dw, db in self.adapter_folds(w):
                for param, delta in ((layer.weight, dw), (layer.bias, db)):
                    if delta is not None:
                        saved.append((param, param.data))
                        param.data = (param.data.float() + delta).to(param.dtype)
            style._fused, style._fused_embeds = w, self.style_embeds_for(style_weights=rows)[0]  # as the pipeline computes e~
            yield self
        finally:
            style._fused, style._fused_embeds, style._adapters_on = None, None, True
            for param, data in reversed(saved):
                param.data = data

    def fuse_qkv_projections(self):
        """diffusers' fused attention projections, refused when style adapters sit on to_q / to_k / to_v: the
        fused processor calls the new to_qkv / to_kv layers, which carry neither the adapters' hooks nor
        their fold, so every style's q/k/v deltas would silently drop out."""
        adapted = [name for name, _layer in self._adapted_layers if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
        if adapted:
            raise ValueError(
                f"fuse_qkv_projections() would bypass the style adapters on {len(adapted)} attention projections "
                f"({adapted[0]}, ...): the fused to_qkv / to_kv layers carry no style adapters. Leave the projections unfused."
            )
        super().fuse_qkv_projections()

    def _cannot_fold(self) -> bool:
        """True when offload or casting hooks own the weights (accelerate's `_hf_hook`, diffusers'
        `_diffusers_hook`), an adapted weight is on the meta device, or a GPU has no room for a second copy
        of the adapted layers (the fold's copy lives for the call; the originals stay)."""
        if any("_hf_hook" in m.__dict__ or "_diffusers_hook" in m.__dict__ for m in self.modules()):  # not hasattr: a miss raises inside nn.Module
            return True
        params = [p for _name, layer in self._adapted_layers for p in (layer.weight, layer.bias) if p is not None]
        return any(p.is_meta for p in params) or not _room_for_copy(params)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        style_ids: torch.Tensor | None = None,
        style_weights: torch.Tensor | None = None,
        style_embeds: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        **kwargs,
    ):
        if added_cond_kwargs and "model_ids" in added_cond_kwargs:  # the reference code's calling convention
            added_cond_kwargs = dict(added_cond_kwargs)
            style_ids = added_cond_kwargs.pop("model_ids")
        if class_labels is not None:  # explicit codebook-space embeddings
            style_embeds = class_labels
        if style_ids is None and style_weights is None and style_embeds is None:
            if self._style_context is None:
                raise StyleError(f"no style given: pass style_ids, style_weights or style_embeds; known styles: {self.style_names}")
            style_embeds = self._style_context
        embeds = self.style_embeds_for(style_ids, style_weights, style_embeds)
        if embeds.shape[0] != sample.shape[0]:
            if sample.shape[0] % embeds.shape[0]:
                raise StyleError(f"{embeds.shape[0]} style rows for a batch of {sample.shape[0]}")
            embeds = embeds.repeat(sample.shape[0] // embeds.shape[0], 1)
        # e~ in the sample's dtype, as diffusers casts its own class labels: under layerwise casting (a float32 model
        # stored in fp8, computed in bf16) the codebook keeps float32 and its rows met the MLP's bf16 weights
        # ("mat1 and mat2 must have the same dtype"), where a stock UNet runs. A no-op when the dtypes agree.
        embeds = embeds.to(sample.dtype)
        return super().forward(sample, timestep, encoder_hidden_states, class_labels=embeds, added_cond_kwargs=added_cond_kwargs or None, **kwargs)


def _room_for_copy(params: Sequence[torch.Tensor], margin: float = 2.0) -> bool:
    """Whether the device holding `params` has `margin` times their size free. Only a CUDA device is
    asked (`torch.cuda.mem_get_info`); host memory is taken to have room."""
    if not params or params[0].device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(params[0].device)
    return free >= margin * sum(p.numel() * p.element_size() for p in params)


def inner_unet(unet):
    """`unet`, or the module inside its `torch.compile` wrapper (`pipe.unet = torch.compile(pipe.unet)`,
    diffusers' documented speed-up; diffusers' `unwrap_module`): the wrapper forwards calls and attributes
    but is no StyleUNet to isinstance, so every check for a merged (unbaked) UNet reads the inner one."""
    from diffusers.utils.torch_utils import unwrap_module

    return unwrap_module(unet)


def merged_style_names(folder) -> list[str]:
    """Style names a merged model folder records in `unet/config.json`, read without loading weights.
    A folder without that file: FileNotFoundError; a plain diffusers folder (no style names): StyleError."""
    from pathlib import Path

    from dmm_ray.merged_model import model_styles

    names = model_styles(folder)
    if names is None:
        raise FileNotFoundError(f"'{folder}' is not a merged-model folder: missing unet/config.json")
    if not names:
        raise StyleError(f"'{Path(folder) / 'unet' / 'config.json'}' has no style_names; is '{folder}' a DMM merged model (StyleUNet)?")
    return names


def _check_adapter_styles(num_styles: int, dim: int, adapter_modules: Sequence[str]) -> None:
    """Style adapters read a sample's style weights back from its e~ by least squares against the codebook
    (N x d: `weights_from_embeds`), exact only while the N rows can be independent, N <= d. With more styles
    every style's adapters ran a blend of others' (130 styles at d = 128: weights off by 0.07, 200: by 0.5)."""
    if adapter_modules and num_styles > dim:
        raise ValueError(
            f"{num_styles} styles with style adapters: the adapters tell styles apart through the style codebook, whose "
            f"width ({dim}, the UNet's time-embedding width) must be at least the number of styles; merge at most {dim} "
            "styles, or leave the adapters out (adapter rank 0)"
        )


def _check_unique(names: Sequence[str]) -> None:
    seen = set()
    for name in names:
        if not name:
            raise StyleError("style names must be non-empty")
        if name in seen:
            raise StyleError(f"duplicate style name {name!r}; style names must be unique")
        seen.add(name)


# diffusers reads the constructor signature to decide which config keys to pass back on load:
# expose the parent's parameters plus ours, so from_pretrained/from_config round-trip.
StyleUNet.__init__.__signature__ = inspect.Signature(
    [p for p in _parent_init_parameters() if p.kind is not p.VAR_KEYWORD]
    + [
        inspect.Parameter("style_names", inspect.Parameter.KEYWORD_ONLY, default=("style_0",)),
        inspect.Parameter("style_film", inspect.Parameter.KEYWORD_ONLY, default=False),
        inspect.Parameter("style_adapter_rank", inspect.Parameter.KEYWORD_ONLY, default=0),
        inspect.Parameter("style_adapter_modules", inspect.Parameter.KEYWORD_ONLY, default=()),
    ]
)


def extra_parameter_count(num_styles: int, time_embed_dim: int) -> int:
    """N*d + 2(d^2 + d): the codebook and the two MLP linears (3,289,600 for N=8, d=1280)."""
    return num_styles * time_embed_dim + 2 * (time_embed_dim**2 + time_embed_dim)

"""Per-style low-rank adapters: an extension of the style codebook (not in the paper).

The paper's student separates its N styles only through one vector added to the timestep
embedding. On the toy zoo that is where most of the fidelity gap sits: styles interfere in the
shared weights (README, "Fidelity on the toy zoo"). A style adapter gives every style its own
rank-r delta on chosen Linear / Conv2d layers (the layers SD LoRAs adapt), plus its own bias:

    y = W x + b + sum_i w_i (B_i A_i x + c_i)          w = the sample's style weights (N,)

For one style w is one-hot and the layer is `W + B_i A_i`; a mixture blends the deltas with the
same weights as the codebook. The weights come from the sample's codebook-space embedding
e~ = sum_i w_i e_i by least squares against the codebook (`w = e~ C^+`), so every way of passing a
style (ids, weights, raw embeddings, a pipeline's style context) selects the same adapters.

`init="svd"` starts style i at the best rank-r approximation of teacher i's own weight delta
(Eckart-Young, as LoRA extraction does): exact for a LoRA teacher of rank <= r, and for full
fine-tunes the largest part of their change. `init="zero"` starts at the base (B = 0, c = 0).

Everything folds into a stock checkpoint (`dmm_ray.export`): `W' = W + sum_i w_i B_i A_i`.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from dmm_ray.defaults import adapter_target_matches, untargetable_problem


def adapter_key(module_name: str) -> str:
    """A UNet module name as a ModuleDict key (no dots)."""
    return module_name.replace(".", "__")


def target_modules(unet: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the Linear / Conv2d modules of `unet` whose name is a target or ends in '.' + target
    (PEFT's `target_modules` rule), outside the style module itself. A target that matches a
    timestep-embedding layer is a ValueError (`dmm_ray.defaults.untargetable_problem`)."""
    targets = list(targets)
    layers = [name for name, module in unet.named_modules() if not name.startswith("class_embedding") and isinstance(module, (nn.Linear, nn.Conv2d))]
    matched = {t: [name for name in layers if adapter_target_matches(name, t)] for t in targets}
    problem = untargetable_problem(matched.items())
    if problem:
        raise ValueError(problem)
    chosen = {name for names in matched.values() for name in names}
    names = [name for name in layers if name in chosen]  # in module order
    if targets and not names:
        raise ValueError(f"style adapter targets {targets} match no Linear/Conv2d module of the UNet")
    return names


class StyleAdapter(nn.Module):
    """The N per-style deltas of one layer, stacked: down (N r, in[, k, k]), up (out, N r), bias (N, out)."""

    def __init__(self, layer: nn.Module, num_styles: int, rank: int):
        super().__init__()
        self.num_styles, self.rank = num_styles, rank
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError("style adapters support ungrouped convolutions only")
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            shape = (num_styles * rank, layer.in_channels, *layer.kernel_size)
            out = layer.out_channels
        elif isinstance(layer, nn.Linear):
            self.conv = None
            shape, out = (num_styles * rank, layer.in_features), layer.out_features
        else:
            raise TypeError(f"style adapters wrap Linear or Conv2d layers, not {type(layer).__name__}")
        self.down = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_uniform_(self.down, a=5**0.5)  # LoRA's A init; up = 0 makes the delta 0
        self.up = nn.Parameter(torch.zeros(out, num_styles * rank))
        self.bias = nn.Parameter(torch.zeros(num_styles, out)) if layer.bias is not None else None

    def delta(self, x: torch.Tensor, weights: torch.Tensor, runs: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """sum_i w_i (B_i A_i x + c_i) for x (B, ..., in) or (B, in, H, W) and weights (B, N).

        `runs` (from `style_runs`): consecutive rows [start, end) that use one style s (s = -1: a
        mixture). A one-style run computes only its own style's rank-r factors instead of all N
        styles' (N r channels), which is the whole cost of a batch of single styles; the pieces
        are concatenated in row order. Without `runs` every row takes the dense N-style path."""
        if runs is None or len(runs) == 0:
            return self._dense(x, weights)
        if len(runs) == 1:
            return self._run(x, weights, runs[0][0])
        # k equal one-style runs (a packed worker's batch); style_runs starts the first run at row 0, so its end is the run length
        if all(s >= 0 and b - a == runs[0][2] for s, a, b in runs):
            return self._grouped(x, weights, [s for s, _, _ in runs])
        # split, not one slice per run: its backward is one cat, where k slices each zero-fill a full-size grad
        sizes = [b - a for _, a, b in runs]
        xs, ws = x.split(sizes), weights.split(sizes)
        return torch.cat([self._run(xi, wi, s) for (s, _, _), xi, wi in zip(runs, xs, ws)])

    @torch.no_grad()
    def add_delta_(
        self, output: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, runs: Sequence[tuple[int, int, int]] | None = None
    ) -> torch.Tensor:
        """Inference: `output += delta(x, weights, runs)` in place, each run with its own style's
        r-wide factors and added into its own rows, so no batch-sized delta is concatenated and no
        grouped layout copied (a 4-style regional image at batch 16: 10-15% less time on the toy,
        benchmarks/regions.py). Without autograd only: `delta` keeps the grouped path that training's
        backward wants."""
        if not runs:
            return output.add_(self._dense(x, weights))
        for s, a, b in runs:
            output[a:b].add_(self._run(x[a:b], weights[a:b], s))
        return output

    def _run(self, x: torch.Tensor, weights: torch.Tensor, s: int) -> torch.Tensor:
        """The delta of rows that share style s (only its r-wide factors), or of a mixture (s = -1: dense)."""
        return self._dense(x, weights) if s < 0 else self._one(x, weights[:, s], s)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        scale = weights.to(x.dtype).repeat_interleave(self.rank, dim=1)  # (B, N r)
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is not None:
            h = F.conv2d(x, down, None, **self.conv) * scale[:, :, None, None]  # (B, N r, H', W')
            out = F.conv2d(h, up[:, :, None, None])
            return out if self.bias is None else out + (weights.to(x.dtype) @ self.bias.to(x.dtype))[:, :, None, None]
        view = (x.shape[0],) + (1,) * (x.ndim - 2) + (-1,)
        out = F.linear(F.linear(x, down) * scale.view(view), up)
        return out if self.bias is None else out + (weights.to(x.dtype) @ self.bias.to(x.dtype)).view(view)

    def _one(self, x: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
        """w_s (B_s A_s x + c_s) for rows whose only style is s; w (B,) is the rows' weight of s (~1)."""
        rows = slice(s * self.rank, (s + 1) * self.rank)
        down, up, w = self.down[rows].to(x.dtype), self.up[:, rows].to(x.dtype), w.to(x.dtype)
        if self.conv is not None:
            out = F.conv2d(F.conv2d(x, down, None, **self.conv), up[:, :, None, None])  # (B, out, H', W')
            if self.bias is not None:
                out = out + self.bias[s].to(x.dtype)[:, None, None]
            return out * w[:, None, None, None]
        out = F.linear(F.linear(x, down), up, None if self.bias is None else self.bias[s].to(x.dtype))
        return out * w.view((x.shape[0],) + (1,) * (x.ndim - 1))

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, styles: list[int]) -> torch.Tensor:
        """`_one` for k equal runs at once: one batched product per factor instead of k small ones.
        x (k n, ...) -> (k, n, ...); run j uses style styles[j]."""
        k, r = len(styles), self.rank
        n = x.shape[0] // k
        idx = torch.tensor(styles, device=x.device)
        w = weights.view(k, n, -1).gather(2, idx.view(k, 1, 1).expand(k, n, 1)).squeeze(2).to(x.dtype)  # (k, n)
        down = self.down.view(-1, r, *self.down.shape[1:])[idx].to(x.dtype)  # (k, r, in[, kh, kw])
        up = self.up.view(self.up.shape[0], -1, r).permute(1, 2, 0)[idx].to(x.dtype)  # (k, r, out)
        bias = None if self.bias is None else self.bias[idx].to(x.dtype)  # (k, out)
        if self.conv is not None:
            _, c, hgt, wid = x.shape
            xg = x.view(k, n, c, hgt, wid).transpose(0, 1).reshape(n, k * c, hgt, wid)  # runs as channel groups
            h = F.conv2d(xg, down.reshape(k * r, *down.shape[2:]), None, groups=k, **self.conv)  # (n, k r, H', W')
            hp, wp = h.shape[-2:]
            h = h.view(n, k, r, hp * wp).transpose(0, 1)  # (k, n, r, H' W')
            out = torch.einsum("knrp,kro->knop", h, up)  # (k, n, out, H' W')
            if bias is not None:
                out = out + bias[:, None, :, None]
            out = out * w[:, :, None, None]
            return out.reshape(k * n, up.shape[-1], hp, wp)
        xs = x.reshape(k, -1, x.shape[-1])  # (k, n L, in)
        out = torch.bmm(torch.bmm(xs, down.transpose(1, 2)), up)  # (k, n L, out)
        if bias is not None:
            out = out + bias[:, None, :]
        out = out.view(k, n, -1, out.shape[-1]) * w[:, :, None, None]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @torch.no_grad()
    def folded(self, weights: torch.Tensor, weight_shape: torch.Size, styles: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(delta W, delta b) in float32 for one weight vector (N,): what `bake` adds to the layer.
        `styles`: the indices whose weight is nonzero (`StyleUNet.adapter_folds` finds them once for
        all layers); only their factors enter the product, so one style is an r-wide product, not N r."""
        w = weights.float()
        r = self.rank
        if styles:
            ups = [self.up[:, i * r : (i + 1) * r].float() * w[i] for i in styles]  # (out, r) each, scaled
            downs = [self.down[i * r : (i + 1) * r].float().flatten(1) for i in styles]  # (r, in[*k*k]) each
            dw = torch.cat(ups, dim=1) @ torch.cat(downs)  # (out, in[*k*k])
        else:
            dw = self.up.new_zeros(self.up.shape[0], self.down[0].numel(), dtype=torch.float32)
        db = None if self.bias is None else w @ self.bias.float()
        return dw.reshape(weight_shape), db

    @torch.no_grad()
    def set_style(self, i: int, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Style i's factors: up (out, r), down (r, in[, k, k]), bias (out,) or None."""
        rows = slice(i * self.rank, (i + 1) * self.rank)
        self.up[:, rows] = up.to(self.up)
        self.down[rows] = down.reshape(self.down[rows].shape).to(self.down)
        if self.bias is not None and bias is not None:
            self.bias[i] = bias.to(self.bias)

    @torch.no_grad()
    def grow(self, k: int) -> None:
        """Append k styles at zero delta (incremental merge); the old styles stay bit-identical."""
        down = torch.empty(k * self.rank, *self.down.shape[1:], dtype=self.down.dtype, device=self.down.device)
        nn.init.kaiming_uniform_(down, a=5**0.5)
        self.down = nn.Parameter(torch.cat([self.down.data, down]))
        self.up = nn.Parameter(torch.cat([self.up.data, self.up.new_zeros(self.up.shape[0], k * self.rank)], dim=1))
        if self.bias is not None:
            self.bias = nn.Parameter(torch.cat([self.bias.data, self.bias.new_zeros(k, self.bias.shape[1])]))
        self.num_styles += k


def codebook_pinv(codebook: torch.Tensor) -> torch.Tensor:
    """C^+ (d, N), float32, of the codebook C (N, d); no gradient."""
    with torch.no_grad(), torch.autocast(codebook.device.type, enabled=False):
        return torch.linalg.pinv(codebook.detach().float())


def weights_from_embeds(style_embeds: torch.Tensor, codebook: torch.Tensor | None = None, pinv: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares style weights (B, N) of codebook-space embeddings (B, d): e~ C^+ (float32,
    no gradient: the adapters are selected by the style, not trained through the selection).
    `pinv`: C^+ when the caller has it (`StyleEmbedding` keeps it between forwards)."""
    pinv = codebook_pinv(codebook) if pinv is None else pinv  # (d, N)
    with torch.no_grad(), torch.autocast(style_embeds.device.type, enabled=False):
        return style_embeds.detach().float() @ pinv  # (B, N)


SINGLE_STYLE_TOL = 1e-5  # |weight| below this counts as absent (least squares leaves ~1e-7 on a codebook row)


def style_runs(weights: torch.Tensor, tol: float = SINGLE_STYLE_TOL) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive rows of `weights` (B, N) that select one style: [(s, start, end)],
    s = -1 for rows that mix styles. Batches are laid out by style (a teacher's sub-batch, the CFG
    halves, a region's latents), so there are few runs and each is a view, not a gather."""
    active = weights.detach().abs() > tol  # (B, N)
    single = active.sum(dim=1) == 1
    style = torch.where(single, active.float().argmax(dim=1), torch.full_like(single, -1, dtype=torch.long)).tolist()
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(style):
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1], i + 1)
        else:
            runs.append((s, i, i + 1))
    return runs


@torch.no_grad()
def low_rank_delta(base: torch.Tensor, tuned: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (up (out, r), down (r, in...)) of tuned - base (Eckart-Young, split as
    U sqrt(S), sqrt(S) V^T so both factors share the scale)."""
    delta = (tuned.float() - base.float()).flatten(1)  # (out, in[*k*k])
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = torch.zeros(delta.shape[0], rank)
    down = torch.zeros(rank, delta.shape[1])
    up[:, :r] = u[:, :r] * root
    down[:r] = root[:, None] * vh[:r]
    return up, down.reshape(rank, *base.shape[1:])


@torch.no_grad()
def init_from_teachers(
    student, base_state: Mapping[str, torch.Tensor], teacher_states: Sequence[Mapping[str, torch.Tensor] | None], first_style: int = 0
) -> dict[str, float]:
    """Set styles first_style.. of `student`'s adapters to their teachers' low-rank deltas.

    teacher_states[j]: teacher j's UNet state dict (None: leave that style at zero delta).
    Returns the fraction of each teacher's adapted-layer delta energy (squared Frobenius) the
    rank-r factors keep, keyed by style name, for the logs."""
    adapters = student.class_embedding.adapters
    kept: dict[str, float] = {}
    for j, state in enumerate(teacher_states):
        if state is None:
            continue
        total = captured = 0.0
        _check_teacher_layers(student, base_state, state, student.style_names[first_style + j])
        for name in student.config.style_adapter_modules:
            adapter = adapters[adapter_key(name)]
            w0, wt = base_state[name + ".weight"], state[name + ".weight"]
            up, down = low_rank_delta(w0, wt, adapter.rank)
            bias = None
            if adapter.bias is not None:
                bias = state[name + ".bias"].float() - base_state[name + ".bias"].float()
            adapter.set_style(first_style + j, up, down, bias)
            full = (wt.float() - w0.float()).pow(2).sum().item()
            total += full
            captured += full - ((wt.float() - w0.float()).flatten(1) - up @ down.flatten(1)).pow(2).sum().item()
        kept[student.style_names[first_style + j]] = captured / total if total else 1.0
    return kept


def _check_teacher_layers(student, base_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], style: str) -> None:
    """Every adapted layer's weight and bias in the teacher's state dict, shaped as the base's: a teacher of
    another architecture failed with torch's "size of tensor a (16) must match ..." (or a bare KeyError),
    naming neither the teacher nor the layer."""
    for name in student.config.style_adapter_modules:
        for key in (name + ".weight", name + ".bias"):
            if key not in base_state:
                continue  # a layer without bias
            if key not in state:
                raise ValueError(
                    f"teacher of style {style!r} has no {key}, which the style adapters adapt: it is not a UNet of the base's architecture"
                )
            if tuple(state[key].shape) != tuple(base_state[key].shape):
                raise ValueError(
                    f"teacher of style {style!r}: {key} is {tuple(state[key].shape)}, the base's is {tuple(base_state[key].shape)}: "
                    "a teacher must share the base's UNet architecture (dmm_ray.teachers.validate_teachers checks it)"
                )

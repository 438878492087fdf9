"""The zoo feature net: a small CNN trained on the generator's ground truth.

It is the zoo's offline stand-in for Inception in FID (`.features(images) -> (B, D)`, with a
`name` for cache keys) and, through its classifier heads, the prompt-following checker.
Heads: shape, object colour, background colour, count, position and style (base + every zoo
style), so its features move with content *and* style. It is trained on clean renders and on
their VAE reconstructions, so generated (VAE-decoded) images are in its training distribution.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tqdm.auto import tqdm

from .scenes import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, Scene

# label name -> class names; "position" uses the scene's `position` field (pairs: "left"/"top").
HEADS = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "background": list(BACKGROUNDS),
    "count": list(COUNTS),
    "position": list(POSITIONS),
}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class ZooFeatureNet(ModelMixin, ConfigMixin):
    """CNN on (B, 3, 32, 32) images in [0, 1]; `features` is the (B, feature_dim) embedding."""

    @register_to_config
    def __init__(self, style_names: list[str] = (), image_size: int = 32, width: int = 32, feature_dim: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(_block(3, w, 1), _block(w, 2 * w, 2), _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 2))
        side = image_size // 8
        self.proj = nn.Linear(4 * w * side * side, feature_dim)
        heads = {k: len(v) for k, v in HEADS.items()} | {"style": 1 + len(style_names)}
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in heads.items()})

    @property
    def label_names(self) -> dict[str, list[str]]:
        return HEADS | {"style": ["none", *self.config.style_names]}

    @property
    def name(self) -> str:
        """Stable id of these weights (FID cache keys change when the net changes)."""
        h = hashlib.sha1()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        return f"zoo-feature-net-{h.hexdigest()[:12]}"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1  # (B, 3, H, W) in [-1, 1]
        return self.proj(self.body(x).flatten(1))  # (B, D)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = F.silu(self.embed(images))
        return {k: head(f) for k, head in self.heads.items()}  # name -> (B, classes) logits

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, D) float32 features (the FID embedding)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"features expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        was_training = self.training
        self.eval()
        out = torch.cat([self.embed(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)])
        self.train(was_training)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, list[str]]:
        """Label name -> predicted class name per image."""
        self.eval()
        logits = [self(images[i : i + batch_size].float()) for i in range(0, len(images), batch_size)]
        names = self.label_names
        return {k: [names[k][j] for j in torch.cat([lg[k] for lg in logits]).argmax(1).tolist()] for k in names}


class FeatureExtractor:
    """The FID-extractor protocol around a feature net: `extractor(images) -> (B, D)`, `.name`."""

    def __init__(self, net: ZooFeatureNet):
        self.net = net.eval()
        self.name = net.name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)


def scene_labels(scenes: list[Scene], style_index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ground-truth class indices per head, (B,) int64 each."""
    labels = {k: torch.tensor([names.index(getattr(s, k)) for s in scenes]) for k, names in HEADS.items()}
    labels["style"] = style_index.long()
    return labels


def train_feature_net(
    net: ZooFeatureNet,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    colour_known: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Multi-head cross-entropy. images: (N, 3, H, W) in [0, 1]; colour_known: (N,) bool, False
    where the style erased colour (noir, sketch...), which masks the colour/background losses.
    Returns the final training accuracy per head (last 20 steps)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    acc_hist: dict[str, list[float]] = {k: [] for k in net.heads}
    for _ in tqdm(range(steps), desc="feature net", disable=not progress, leave=False, dynamic_ncols=True):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        logits = net(images[idx])
        known = colour_known[idx]
        loss = torch.zeros(())
        for k, lg in logits.items():
            y = labels[k][idx]
            if k in ("colour", "background"):
                if known.any():
                    loss = loss + F.cross_entropy(lg[known], y[known])
                    acc_hist[k].append(float((lg[known].argmax(1) == y[known]).float().mean()))
            else:
                loss = loss + F.cross_entropy(lg, y)
                acc_hist[k].append(float((lg.argmax(1) == y).float().mean()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return {k: sum(v[-20:]) / max(1, len(v[-20:])) for k, v in acc_hist.items()}


def fit_style_classifier(
    net: ZooFeatureNet, images: torch.Tensor, style_index: torch.Tensor, steps: int = 600, batch_size: int = 128, lr: float = 1e-3, seed: int = 0
) -> ZooFeatureNet:
    """A copy of `net` fine-tuned (whole net, style head's loss only, random horizontal flips) to
    classify `images` by `style_index` (0 = none, i = style i: the head's own label space). `net`
    itself is untouched (it stays the FID extractor); the copy is only a classifier.

    Why: the zoo's head learned each style from the generator's ground truth (`styles.apply_style`),
    and a small teacher renders its style only approximately: on whole teacher images the head
    finds neon 7% of the time. To ask "does this image look like what teacher A renders", the
    classifier is fit to teacher renders. The body is fine-tuned too: a linear head on the frozen
    features recognised far fewer held-out teacher renders (README "Regional styles")."""
    import copy

    if images.ndim != 4 or len(images) != len(style_index):
        raise ValueError(f"fit_style_classifier expects (N, 3, H, W) images and N labels, got {tuple(images.shape)} and {len(style_index)}")
    classes = len(net.label_names["style"])
    if int(style_index.min()) < 0 or int(style_index.max()) >= classes:
        raise ValueError(f"style_index must lie in 0..{classes - 1} (none + {classes - 1} styles), got {style_index.unique().tolist()}")
    clf = copy.deepcopy(net).train()
    for p in clf.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    y = style_index.long()
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(len(images), (batch_size,), generator=gen)
            x = images[idx].float()  # (b, 3, H, W)
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)  # styles are mirror-invariant
            loss = F.cross_entropy(clf(x)["style"], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf


def describe(net: ZooFeatureNet) -> str:
    return json.dumps({"name": net.name, **{k: v for k, v in net.config.items() if not k.startswith("_")}})

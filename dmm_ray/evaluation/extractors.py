"""FID feature extractors.

Protocol: any callable `extractor(images) -> features` with images float (B, 3, H, W) in [0, 1]
and features (B, D), plus a string attribute `name` that identifies the network *and its
weights* (it is part of the teacher-statistics cache key, so two different networks must
never share a name).

Built in (EvalConfig.extractor.kind):
- `ZooFeatureExtractor`: the toy zoo's feature net (`dmm_ray.zoo.feature_net.ZooFeatureNet`),
  trained on the zoo's ground truth (shape, colour, style transform) — the offline default;
  InceptionV3 features say little about 32 px procedural shapes.
- `InceptionFeatureExtractor`: the standard FID InceptionV3 (`pt_inception-2015-12-05`
  weights, the ones pytorch-fid / torch-fidelity use) read from a local file the user names,
  through torchmetrics' `NoTrainInceptionV3` (needs the `torch-fidelity` package). Never
  downloads: a missing file is an error naming the path.
- kind "import": `extractor.path = "package.module:factory"`, any factory returning an extractor
  (e.g. CLIP or DINOv2 features you load yourself).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from dmm_ray.devices import resolve_device
from dmm_ray.evaluation.config import check_extractor


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(path).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")


class InceptionFeatureExtractor:
    """Pool3 (2048-d) features of the TF-ported FID InceptionV3, weights from a local file."""

    def __init__(self, weights_path: str | Path, device: str = "auto"):
        check_extractor("inception", weights_path)  # the weights file is there, torch-fidelity installed
        path = Path(weights_path).expanduser()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:  # pragma: no cover - torchmetrics is a hard dependency
            raise ImportError("the Inception extractor needs torchmetrics") from e
        self.device = resolve_device(device)
        # antialias=False: TF1-style bilinear resize to 299 px, as in the reference FID implementation.
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path), antialias=False
        ).to(self.device)
        self.name = f"inception-v3-fid:{file_digest(path)[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8).to(self.device)  # (B, 3, H, W) uint8, as the net expects
        return self.net(x).reshape(x.shape[0], -1).float().cpu()  # (B, 2048)


class ZooFeatureExtractor:
    """The toy zoo's feature net, `ZooFeatureNet.from_pretrained(dir).features(images)`."""

    def __init__(self, net_dir: str | Path, device: str = "auto"):
        check_extractor("zoo", net_dir)  # the folder is there
        path = Path(net_dir).expanduser()
        from dmm_ray.zoo.feature_net import ZooFeatureNet

        self.device = resolve_device(device)
        self.net = ZooFeatureNet.from_pretrained(str(path))
        if isinstance(self.net, torch.nn.Module):
            self.net = self.net.to(self.device).eval()
        self.name = f"zoo-feature-net:{dir_digest(path)[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.net.features(images.float().to(self.device)).reshape(images.shape[0], -1).float().cpu()  # (B, D)


def import_extractor(spec: str) -> FeatureExtractor:
    """`package.module:factory` -> factory() (any callable returning an extractor, e.g. a class)."""
    import importlib

    check_extractor("import", spec)  # the form 'package.module:factory', and the module there
    module, _, attr = str(spec).partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import extractor factory '{spec}': {e}") from e
    extractor = factory()
    if not isinstance(getattr(extractor, "name", None), str) or not callable(extractor):
        raise TypeError(f"'{spec}' returned {type(extractor).__name__}, which lacks a str `name` or is not callable")
    return extractor


def build_extractor(kind: str, path: str | Path | None, device: str = "auto") -> FeatureExtractor:
    if kind == "zoo":
        return ZooFeatureExtractor(path, device)
    if kind == "inception":
        return InceptionFeatureExtractor(path, device)
    check_extractor(kind, path)  # import: a path given; any other kind: unknown
    return import_extractor(str(path))


class ExtractorFactory:
    """Picklable recipe that builds the extractor inside each generation worker.

    `.name` is computed from the weights on disk without building the network, so the driver
    can form cache keys cheaply.
    """

    def __init__(self, kind: str, path: str | Path | None, device: str = "auto"):
        self.kind, self.path, self.device = kind, path, device

    @functools.cached_property
    def name(self) -> str:
        """Cache-key name; hashes the weights, so it is computed once per factory."""
        if self.path is None:
            check_extractor(self.kind, self.path)  # raises: no path
        path = Path(str(self.path)).expanduser()
        if self.kind == "inception" and path.is_file():
            return f"inception-v3-fid:{file_digest(path)[:16]}"
        if self.kind == "zoo" and path.is_dir():
            return f"zoo-feature-net:{dir_digest(path)[:16]}"
        if self.kind == "import":
            return import_extractor(str(self.path)).name
        return build_extractor(self.kind, self.path, "cpu").name  # raises the clear not-found error

    def __call__(self) -> FeatureExtractor:
        return build_extractor(self.kind, self.path, self.device)


def extractor_name(extractor) -> str:
    """The cache-key name of an extractor instance or factory."""
    name = getattr(extractor, "name", None)
    if isinstance(name, str):
        return name
    return extractor().name


def as_factory(extractor) -> Callable[[], FeatureExtractor]:
    """Accept an extractor instance, or a zero-argument factory returning one."""
    if isinstance(extractor, ExtractorFactory):  # checked first: reading .name would hash the weights
        return extractor
    if isinstance(getattr(extractor, "name", None), str) and callable(extractor):
        return lambda: extractor
    if callable(extractor):
        return extractor
    raise TypeError(f"expected a feature extractor (callable with .name) or a factory, got {type(extractor).__name__}")

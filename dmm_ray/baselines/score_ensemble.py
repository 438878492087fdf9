"""Score-ensemble reference for style mixing: what `distill.mixture_fraction` distils into one network.

Every denoising step runs each teacher's UNet on the same input and uses the weighted sum of their
noise predictions, eps = sum_k w_k eps_k(x_t, t, c), inside the first teacher's pipeline (its sampler,
VAE and text encoder). It costs K UNet passes per step and K UNets in memory, so it is a yardstick,
not a product: a DMM mixture trained towards this target can at best match it. The prompt is encoded
once, so the teachers must share one text encoder (the toy zoo's colour grades do).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dmm_ray.baselines.weighted_merge import validate_weights


class _EnsembleForward:
    """Replaces the first UNet's forward: sum_k w_k * forward_k(...) (diffusers' calling convention)."""

    def __init__(self, forwards, weights):
        self.forwards, self.weights = list(forwards), list(weights)

    def __call__(self, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        eps = sum(w * f(*args, return_dict=False, **kwargs)[0] for w, f in zip(self.weights, self.forwards))
        return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _check_text_encoder(first_name: str, first: Any, name: str, pipe: Any) -> None:
    """A ValueError when `pipe` (teacher `name`) has a text encoder other than `first`'s (teacher `first_name`)."""
    for part in TEXT_ENCODERS:
        a, b = getattr(first, part, None), getattr(pipe, part, None)
        if (a is None) != (b is None) or (a is not None and not _same_weights(a, b)):
            raise ValueError(
                f"score ensemble: teacher {name!r} has its own {part} (not {first_name!r}'s); the ensemble encodes the "
                "prompt once, so its teachers must share one text encoder"
            )


def check_shared_text_encoder(specs: Sequence[Any]) -> None:
    """What `score_ensemble_pipeline` refuses (teachers that do not share one text encoder), before any
    image is made (jobs/style_mixing.py --score-ensemble): refused only where the ensemble's worker built
    it, the group's weighted merge was built and every other row sampled first. Loads the text encoders of
    one teacher at a time, keeping the first's: the ensemble loads the teachers whole when it is sampled, and
    loading them whole here too loaded each UNet and VAE twice."""
    from types import SimpleNamespace

    from dmm_ray.teachers import load_teacher_pipeline

    first_pipe = load_teacher_pipeline(specs[0], text_encoders_only=True)
    first = SimpleNamespace(**{part: getattr(first_pipe, part, None) for part in TEXT_ENCODERS})
    del first_pipe
    for spec in specs[1:]:
        _check_text_encoder(specs[0].name, first, spec.name, load_teacher_pipeline(spec, text_encoders_only=True))


def score_ensemble_pipeline(specs: Sequence[Any], weights: Sequence[float] | None = None, torch_dtype=None):
    """The first teacher's pipeline whose UNet returns the weighted sum of all teachers' predictions."""
    from dmm_ray.teachers import load_teacher_pipeline

    names = [s.name for s in specs]
    w = validate_weights(weights, names)
    if len(specs) < 2:
        raise ValueError(f"a score ensemble needs >= 2 teachers, got {names}")
    pipes = [load_teacher_pipeline(s, torch_dtype=torch_dtype) for s in specs]
    for name, pipe in zip(names[1:], pipes[1:]):
        _check_text_encoder(names[0], pipes[0], name, pipe)
    ensemble = pipes[0]
    ensemble.unet.forward = _EnsembleForward([p.unet.forward for p in pipes], w)
    # the other UNets as a submodule of the first: `ensemble.to(device / dtype)` moves them too
    ensemble.unet.add_module("ensemble_members", torch.nn.ModuleList([p.unet for p in pipes[1:]]))
    return ensemble

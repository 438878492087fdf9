"""Per-style low-rank adapters (student.style_adapters): the student starts at the base, SVD
init reproduces a low-rank teacher exactly, mixtures blend the deltas, and the adapters survive
save/load, deepcopy, incremental growth and the bake to a stock checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from dmm_ray.models.style_adapters import StyleAdapter, init_from_teachers, low_rank_delta, target_modules, weights_from_embeds
from dmm_ray.models.style_unet import StyleUNet

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_in", "conv_out", "time_emb_proj", "ff.net.2"]
STYLES = ["ink", "neon", "pixel"]


@pytest.fixture(scope="module")
def base():
    from dmm_ray.tiny import tiny_sd_components

    torch.manual_seed(0)
    return tiny_sd_components(seed=0)["unet"].eval()


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]), torch.randn(batch, 77, 32, generator=g)


def low_rank_teacher(base, modules, rank: int, seed: int):
    """The base plus a rank-`rank` delta (and a bias shift) on every adapted layer: a LoRA-like teacher."""
    teacher, g = copy.deepcopy(base), torch.Generator().manual_seed(seed)
    state = teacher.state_dict()
    for name in modules:
        w = state[name + ".weight"]
        state[name + ".weight"] = w + (torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w[0].numel(), generator=g) * 0.05).reshape(
            w.shape
        )
        if name + ".bias" in state:
            state[name + ".bias"] = state[name + ".bias"] + 0.1 * torch.randn(w.shape[0], generator=g)
    teacher.load_state_dict(state)
    return teacher


def distinct_styles(base, seed: int, **kwargs):
    """A rank-2 adapter student whose every style has a different nonzero delta, and the generator
    that drew them (for the test's next draws)."""
    student = StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=TARGETS, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in student.class_embedding.adapters.values():
            adapter.up.normal_(0, 0.05, generator=g)
            if adapter.bias is not None:
                adapter.bias.normal_(0, 0.05, generator=g)
    return student, g


def without_style_mlp(student):
    """The student with MLP(e) = 0, so only the adapters tell the styles apart."""
    s = copy.deepcopy(student)
    with torch.no_grad():
        s.class_embedding.mlp.linear_2.weight.zero_()
        s.class_embedding.mlp.linear_2.bias.zero_()
    return s


@torch.no_grad()
def test_adapters_start_at_zero_delta_and_svd_init_reproduces_a_low_rank_teacher(base):
    student = StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=TARGETS)
    modules = student.config.style_adapter_modules
    assert len(modules) == len(target_modules(base, TARGETS)) > 20
    x, t, ehs = inputs()
    plain = without_style_mlp(student)  # deepcopy: its hooks must use the copy's own adapters
    ref = base(x, t, ehs).sample
    assert torch.allclose(plain(x, t, ehs, style_ids=torch.tensor([0, 2])).sample, ref, atol=1e-5)  # zero delta: the base

    teacher = low_rank_teacher(base, modules, rank=2, seed=1)
    kept = init_from_teachers(student, base.state_dict(), [None, teacher.state_dict()])
    assert kept == {"neon": pytest.approx(1.0, abs=1e-6)}  # rank 2 holds a rank-2 delta exactly
    plain = without_style_mlp(student)
    out_t = teacher(x, t, ehs).sample
    assert (out_t - ref).abs().max() > 0.05  # not vacuous: the teacher is far from the base
    assert torch.allclose(plain(x, t, ehs, style_ids=torch.tensor([1, 1])).sample, out_t, atol=1e-4)
    assert torch.allclose(plain(x, t, ehs, style_ids=torch.tensor([0, 0])).sample, ref, atol=1e-5)  # other styles untouched
    # per-sample: one batch carries both styles
    mixed = plain(x, t, ehs, style_ids=torch.tensor([1, 0])).sample
    assert torch.allclose(mixed[0], out_t[0], atol=1e-4) and torch.allclose(mixed[1], ref[1], atol=1e-5)

    # a rank-1 student keeps only part of the rank-2 teacher, and says how much
    small = StyleUNet.from_unet(base, STYLES, adapter_rank=1, adapter_targets=TARGETS)
    part = init_from_teachers(small, base.state_dict(), [None, teacher.state_dict()])["neon"]
    assert 0.3 < part < 0.999


@torch.no_grad()
def test_mixture_blends_the_deltas_linearly_and_every_style_input_selects_the_same_adapters(base):
    student = StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=TARGETS)
    modules = student.config.style_adapter_modules
    init_from_teachers(student, base.state_dict(), [low_rank_teacher(base, modules, 2, s).state_dict() for s in (1, 2, 3)])
    plain = without_style_mlp(student)
    x, t, ehs = inputs()
    w = torch.tensor([[0.25, 0.75, 0.0]] * 2)
    by_weights = plain(x, t, ehs, style_weights=w).sample
    by_embeds = plain(x, t, ehs, style_embeds=plain.style_embeds_for(style_weights=w)).sample
    assert torch.allclose(by_weights, by_embeds, atol=1e-6)
    # the least-squares weights of a codebook mixture are the mixture's weights
    got = weights_from_embeds(plain.style_embeds_for(style_weights=w), plain.class_embedding.codebook.weight)
    assert torch.allclose(got, w, atol=1e-5)
    # a layer's delta is linear in the weights: the mixed model differs from both pure styles
    a = plain(x, t, ehs, style_ids=torch.tensor([0, 0])).sample
    b = plain(x, t, ehs, style_ids=torch.tensor([1, 1])).sample
    assert (by_weights - a).abs().max() > 1e-3 and (by_weights - b).abs().max() > 1e-3


@torch.no_grad()
def test_adapters_round_trip_through_save_load_and_incremental_growth(base, tmp_path):
    student = StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=TARGETS)
    modules = student.config.style_adapter_modules
    init_from_teachers(student, base.state_dict(), [low_rank_teacher(base, modules, 2, s).state_dict() for s in (1, 2, 3)])
    x, t, ehs = inputs()
    ids = torch.tensor([1, 2])
    ref = student(x, t, ehs, style_ids=ids).sample
    student.save_pretrained(tmp_path / "unet")
    loaded = StyleUNet.from_pretrained(tmp_path / "unet")
    assert loaded.config.style_adapter_rank == 2 and loaded.config.style_adapter_modules == modules
    assert torch.equal(loaded(x, t, ehs, style_ids=ids).sample, ref)
    new = loaded.add_styles(["sketch"], seed=0)
    assert new == [3]
    assert torch.allclose(loaded(x, t, ehs, style_ids=ids).sample, ref, atol=1e-5)  # old styles keep their adapters
    grown = loaded.class_embedding.adapters[next(iter(loaded.class_embedding.adapters))]
    assert grown.up.shape[1] == 4 * 2 and torch.count_nonzero(grown.up[:, 6:]) == 0  # the new style starts at zero delta


def test_low_rank_delta_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    base, tuned = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    up, down = low_rank_delta(base, tuned, 2)
    u, s, vh = torch.linalg.svd(tuned - base)
    assert torch.allclose(up @ down, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)
    conv_up, conv_down = low_rank_delta(torch.zeros(3, 2, 3, 3), torch.randn(3, 2, 3, 3, generator=g), 8)  # rank > min dim
    assert conv_down.shape == (8, 2, 3, 3) and torch.count_nonzero(conv_up[:, 3:]) == 0


def test_unknown_targets_and_bad_config_fail_clearly(base):
    with pytest.raises(ValueError, match="match no Linear/Conv2d"):
        StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=["no_such_layer"])
    from pydantic import ValidationError

    from dmm_ray.config import StudentConfig

    with pytest.raises(ValidationError, match="rank"):
        StudentConfig(style_adapters={"rank": -1})
    with pytest.raises(ValidationError, match="init"):
        StudentConfig(style_adapters={"rank": 2, "init": "pca"})


def test_timestep_embedding_layers_are_refused_as_targets_before_any_forward(base):
    """diffusers runs time_embedding (linear_1, linear_2) before the class-embedding slot where the style
    weights are computed: adapters there failed every forward ("style adapters used outside a StyleUNet
    forward"), and neither the config nor the construction said so. Now the config, from_unet and a
    StyleUNet built from a config naming such layers refuse them, naming the layer and what can be targeted."""
    from pydantic import ValidationError

    from dmm_ray.config import StudentConfig

    why = (
        r"runs its timestep embedding .* before the style module computes the sample's style weights.*every other Linear/Conv2d layer can be targeted"
    )
    for targets, layer in (
        (["time_embedding.linear_2"], "time_embedding.linear_2"),
        (["to_q", "linear_2"], "time_embedding.linear_2"),
        (["linear_1"], "time_embedding.linear_1"),
    ):
        with pytest.raises(ValidationError, match=rf"'{targets[-1]}' matches {layer}\. The UNet {why}"):
            StudentConfig(style_adapters={"rank": 2, "targets": targets})
        with pytest.raises(ValueError, match=rf"'{targets[-1]}' matches {layer}\. The UNet {why}"):
            StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=targets)
    config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    with pytest.raises(ValueError, match=rf"'time_embedding.linear_2' matches time_embedding.linear_2\. The UNet {why}"):
        StyleUNet(**config, style_names=STYLES, style_adapter_rank=2, style_adapter_modules=["conv_in", "time_embedding.linear_2"])
    # a bare suffix that also matches layers after the style (SDXL's add_embedding.linear_2) says to name those in full
    from dmm_ray.defaults import untargetable_problem

    assert "name the other layers it matches in full: add_embedding.linear_2" in untargetable_problem(
        [("linear_2", ["time_embedding.linear_2", "add_embedding.linear_2"])]
    )
    # names that only look alike stay targetable, and every other layer still runs
    assert StudentConfig(style_adapters={"rank": 2, "targets": ["embedding.linear_2", "time_emb_proj"]}).style_adapters.targets
    student = StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=["time_emb_proj", "conv_in"])
    x, t, h = inputs()
    assert student(x, t, h, style_ids=torch.tensor([0, 1])).sample.shape == x.shape


def test_adapter_rank_without_targets_takes_the_default_targets(base):
    """from_unet(adapter_rank=r) alone adapts the merge config's default layers (it used to add none)."""
    from dmm_ray.defaults import SD_ADAPTER_TARGETS

    default = StyleUNet.from_unet(base, STYLES, adapter_rank=2)
    explicit = StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=SD_ADAPTER_TARGETS)
    assert default.config.style_adapter_modules == explicit.config.style_adapter_modules != []
    with pytest.raises(ValueError, match="needs adapter_targets"):
        StyleUNet.from_unet(base, STYLES, adapter_rank=2, adapter_targets=[])


def test_one_style_runs_compute_only_their_own_factors_and_match_the_dense_path(base, monkeypatch):
    """A batch laid out by style (a packed worker's sub-batches, CFG halves) takes the per-run path,
    which must equal the dense N-style path in outputs and gradients; mixtures and fragmented
    batches keep the dense path."""
    from dmm_ray.models.style_adapters import style_runs
    from dmm_ray.models.style_unet import StyleEmbedding

    student, g = distinct_styles(base, seed=3)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    weights = torch.eye(3)[ids]
    assert style_runs(weights) == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
    assert style_runs(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1.0, 1e-7, 0.0]])) == [(-1, 0, 1), (0, 1, 3)]

    x = torch.randn(12, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (12,), generator=g)
    ehs = torch.randn(12, 77, 32, generator=g)
    calls = []
    routed = StyleEmbedding.adapter_runs

    def forward(dense: bool):
        monkeypatch.setattr(
            StyleEmbedding, "adapter_runs", (lambda self, b: None) if dense else (lambda self, b: calls.append(routed(self, b)) or calls[-1])
        )
        student.zero_grad(set_to_none=True)
        out = student(x, t, ehs, style_ids=ids).sample
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    # equal runs take the grouped path (one batched product per factor), unequal ones one product per run
    grouped = StyleAdapter._grouped
    for layout, runs, path in (
        (ids, [(0, 0, 4), (1, 4, 8), (2, 8, 12)], "grouped"),
        (torch.tensor([2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 1, 1]), [(2, 0, 6), (0, 6, 10), (1, 10, 12)], "per run"),
    ):
        ids = layout
        taken = []
        monkeypatch.setattr(StyleAdapter, "_grouped", lambda self, *a: taken.append("grouped") or grouped(self, *a))
        out_dense, grad_dense = forward(True)
        calls.clear()
        out_routed, grad_routed = forward(False)
        assert calls and all(c == runs for c in calls)  # the routed path really ran
        assert bool(taken) == (path == "grouped"), path
        torch.testing.assert_close(out_routed, out_dense, rtol=1e-5, atol=1e-5)
        assert grad_routed.keys() == grad_dense.keys()
        for name in grad_dense:
            torch.testing.assert_close(grad_routed[name], grad_dense[name], rtol=1e-4, atol=1e-6, msg=f"{path}: {name}")
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    # only style s's factors of a run get gradients from it: style 2 absent -> its factors get none
    forward(False)
    x2 = student(x[:8], t[:8], ehs[:8], style_ids=ids[:8]).sample
    student.zero_grad(set_to_none=True)
    x2.pow(2).mean().backward()
    up = next(iter(student.class_embedding.adapters.values())).up.grad  # (out, N r)
    assert up[:, 4:].abs().sum() == 0 and up[:, :4].abs().sum() > 0
    # fragmented batches (runs under 4 rows on average) fall back to the dense path
    student.zero_grad(set_to_none=True)
    monkeypatch.setattr(StyleEmbedding, "adapter_runs", routed)
    student(x[:6], t[:6], ehs[:6], style_ids=torch.tensor([0, 1, 2, 0, 1, 2]))
    assert student.class_embedding.adapter_runs(6) is None


def test_fused_style_folds_one_style_into_the_layers_and_gives_every_row_its_own_style(base, monkeypatch):
    """`StyleUNet.fused_style(rows)`: rows that all hold one style (or one mixture) run the plain layers
    with that style folded in, with the per-sample adapters' output; a row of another style still gets
    its own; the layers get their own weight tensors back, also after an error; autograd, rows that
    differ and enabled=False fold nothing."""
    student, _ = distinct_styles(base, seed=4, style_film=True)
    computed = []
    for path in ("delta", "add_delta_"):  # autograd's and sampling's per-sample paths
        monkeypatch.setattr(StyleAdapter, path, lambda self, *a, f=getattr(StyleAdapter, path): computed.append(1) or f(self, *a))
    x, t, ehs = inputs(batch=2, seed=5)
    originals = {n: (p, p.data_ptr()) for n, p in student.named_parameters()}  # the parameter and its storage
    snapshot = {n: p.detach().clone() for n, p in student.named_parameters()}

    def rows(w):
        return torch.tensor(w, dtype=torch.float32)[None].repeat(2, 1)  # (2, N): one style for both rows

    with torch.no_grad():
        for w in ([0.0, 1.0, 0.0], [0.25, 0.0, 0.75]):  # one style; one mixture
            ref = student(x, t, ehs, style_weights=rows(w)).sample
            computed.clear()
            with student.fused_style(rows(w)):
                assert student.class_embedding._fused is not None
                out = student(x, t, ehs, style_weights=rows(w)).sample
                assert not computed  # the folded layers did the work: no per-sample delta
                other = student(x, t, ehs, style_weights=torch.tensor([w, [1.0, 0.0, 0.0]])).sample
                assert computed  # a row of another style: its residual delta was added
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            assert (out - student(x, t, ehs, style_ids=torch.tensor([2, 2])).sample).abs().max() > 1e-3  # not vacuous: styles differ
            unfused_other = student(x, t, ehs, style_weights=torch.tensor([w, [1.0, 0.0, 0.0]])).sample
            torch.testing.assert_close(other, unfused_other, rtol=1e-5, atol=1e-5)
        # the layers' own tensors are back, unrounded
        assert all(p is originals[n][0] and p.data_ptr() == originals[n][1] and torch.equal(p, snapshot[n]) for n, p in student.named_parameters())
        with pytest.raises(RuntimeError, match="boom"), student.fused_style(rows([1.0, 0.0, 0.0])):
            raise RuntimeError("boom")
        assert student.class_embedding._fused is None
        assert all(torch.equal(p, snapshot[n]) and p.data_ptr() == originals[n][1] for n, p in student.named_parameters())
        for kwargs, r in (({"enabled": False}, rows([1.0, 0.0, 0.0])), ({}, torch.eye(3)[:2])):  # switched off; rows differ
            with student.fused_style(r, **kwargs):
                assert student.class_embedding._fused is None
    with student.fused_style(rows([1.0, 0.0, 0.0])):  # autograd on (training): nothing folded
        assert student.class_embedding._fused is None
    twin = copy.deepcopy(student)  # a copy (or a Ray worker's unpickled model) folds into its own layers
    twin_modules = dict(twin.named_modules())
    assert all(layer is twin_modules[name] for name, layer in twin._adapted_layers)
    with torch.no_grad(), twin.fused_style(rows([0.0, 1.0, 0.0])):
        torch.testing.assert_close(twin(x, t, ehs, style_ids=torch.tensor([1, 1])).sample, student(x, t, ehs, style_ids=torch.tensor([1, 1])).sample)
    assert all(torch.equal(p, snapshot[n]) for n, p in student.named_parameters())
    layer = dict(student.named_modules())[student.config.style_adapter_modules[0]]
    for hook in ("_hf_hook", "_diffusers_hook"):  # offload / casting hooks own the weights: nothing folded
        setattr(layer, hook, object())
        with torch.no_grad(), student.fused_style(rows([1.0, 0.0, 0.0])):
            assert student.class_embedding._fused is None
        delattr(layer, hook)


def test_a_gpu_without_room_for_the_folded_copy_keeps_the_per_sample_path(monkeypatch):
    """The fold holds a second copy of the adapted layers for the call: on a GPU it needs twice their
    size free (asked of torch.cuda.mem_get_info); host memory is not asked."""
    from dmm_ray.models.style_unet import _room_for_copy

    class OnGpu:  # a 4000-byte weight on a GPU, without needing one
        device = torch.device("cuda", 0)

        def numel(self):
            return 1000

        def element_size(self):
            return 4

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (free, 10**9))
    free = 7999
    assert not _room_for_copy([OnGpu()])
    free = 8000
    assert _room_for_copy([OnGpu()])
    assert asked == [torch.device("cuda", 0)] * 2
    assert _room_for_copy([torch.zeros(10**6)]) and len(asked) == 2  # host memory: not asked


def test_sampling_adds_each_runs_delta_in_place_and_matches_the_training_path(base, monkeypatch):
    """Without autograd the hooks add each run's delta into the layer's own output (`add_delta_`),
    for every batch layout: equal one-style runs (training's grouped path), unequal runs, a mixture
    run, and a fragmented batch (the dense path); the UNet's output equals the autograd path's."""
    student, g = distinct_styles(base, seed=5)
    x = torch.randn(12, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (12,), generator=g)
    ehs = torch.randn(12, 77, 32, generator=g)
    in_place = []
    add = StyleAdapter.add_delta_
    monkeypatch.setattr(StyleAdapter, "add_delta_", lambda self, *a: in_place.append(1) or add(self, *a))
    eye = torch.eye(3)
    layouts = {
        "equal runs": eye[[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]],
        "unequal runs": eye[[2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 1, 1]],
        "a mixture run": torch.cat([eye[[1] * 4], torch.tensor([[0.3, 0.0, 0.7]]).repeat(4, 1), eye[[0] * 4]]),
        "fragmented": eye[[0, 1, 2] * 4],
    }
    for name, weights in layouts.items():
        with torch.enable_grad():
            reference = student(x, t, ehs, style_weights=weights).sample.detach()
        assert not in_place
        with torch.no_grad():
            sampled = student(x, t, ehs, style_weights=weights).sample
        assert in_place, name
        in_place.clear()
        torch.testing.assert_close(sampled, reference, rtol=1e-5, atol=1e-5, msg=name)


def test_the_codebooks_pseudo_inverse_is_kept_between_forwards_and_follows_every_change(base, monkeypatch):
    """Sampling computes C^+ once, not per UNet forward; an optimizer step, a load, add_styles, a move and
    a `.data.copy_` each give the weights of the codebook as it is then (a stale C^+ would select the old styles)."""
    student, _ = distinct_styles(base, seed=5)
    x, t, ehs = inputs()
    calls = []
    real = torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda a, *args, **kw: (calls.append(1), real(a, *args, **kw))[1])
    style = student.class_embedding

    def weights_now(w):  # the weights a forward hands the adapter hooks, and the ones a fresh C^+ gives
        with torch.no_grad():
            student(x.to(w.dtype), t, ehs.to(w.dtype), style_weights=w)
        return style._weights.clone(), weights_from_embeds(student.style_embeds_for(style_weights=w), style.codebook.weight)

    w = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    with torch.no_grad():
        for _ in range(3):
            student(x, t, ehs, style_weights=w)
    assert len(calls) == 1  # three forwards, one pseudo-inverse
    # an optimizer step (in place: the codebook's version moves)
    opt = torch.optim.SGD([style.codebook.weight], lr=1.0)
    student(x, t, ehs, style_weights=w).sample.square().mean().backward()
    opt.step()
    got, fresh = weights_now(w)
    assert torch.equal(got, fresh) and torch.allclose(got, w, atol=1e-5)
    # a load of other weights
    other, _ = distinct_styles(base, seed=6)
    student.load_state_dict(other.state_dict())
    got, fresh = weights_now(w)
    assert torch.equal(got, fresh)
    # a new codebook tensor: add_styles (the new row gets its own weight column)
    student.add_styles(["sepia"], seed=1)
    w4 = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * 2)
    got, fresh = weights_now(w4)
    assert torch.equal(got, fresh) and torch.allclose(got, w4, atol=1e-5)
    # the data swapped under the same parameter (as a move does; the version counter stays), twice
    # between forwards: the second swap must not find the first C^+ at a reused address
    for _ in range(3):
        cb = style.codebook.weight
        cb.data = torch.randn_like(cb)
        cb.data = torch.randn_like(cb)
        got, fresh = weights_now(w4)
        assert torch.equal(got, fresh)
    # the values overwritten in place through .data (diffusers' EMAModel.copy_to / restore): neither the
    # version counter nor the address moves
    style.codebook.weight.data.copy_(torch.randn_like(style.codebook.weight))
    got, fresh = weights_now(w4)
    assert torch.equal(got, fresh)


def test_init_from_teachers_names_a_teacher_of_another_architecture():
    """A teacher whose adapted layers are shaped otherwise than the base's failed with torch's "The size of tensor
    a (16) must match the size of tensor b (32)", and one missing a layer with a bare KeyError, naming neither the
    teacher nor the layer."""
    from diffusers import UNet2DConditionModel

    from dmm_ray import StyleUNet
    from dmm_ray.models.style_adapters import init_from_teachers
    from dmm_ray.tiny import tiny_unet_config

    base = UNet2DConditionModel(**tiny_unet_config())
    student = StyleUNet.from_unet(base, ["a", "b"], adapter_rank=2)
    other = UNet2DConditionModel(**tiny_unet_config(block_out_channels=(16, 32)))
    with pytest.raises(ValueError, match=r"style 'b': conv_in.weight is \(16, 4, 3, 3\), the base's is \(32, 4, 3, 3\)"):
        init_from_teachers(student, base.state_dict(), [None, other.state_dict()])
    missing = {k: v for k, v in base.state_dict().items() if not k.startswith("conv_out.")}
    with pytest.raises(ValueError, match="style 'a' has no conv_out.weight"):
        init_from_teachers(student, base.state_dict(), [missing])

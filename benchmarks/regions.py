"""Regional styles on the toy zoo: does each region get its style, how visible is the seam, what does it cost.

  python benchmarks/regions.py --model /path/to/merged --zoo .zoo --out outputs/regions

1. Two-region test. For every ordered pair (A, B) of the zoo's 4 *distinct* styles (noir, neon,
   pixel, sketch: zoo.yaml group "distinct"), 64 seeds: a 64x32 image (two native 32 px squares
   side by side) with `regions=[left half: A, right half: B]`; the zoo feature net's style head
   classifies the left 32x32 crop and the right one. Success = left is A and right is B.
   Ceiling: the same crops of whole images of A and of B generated normally at the same size and
   seed (left crop of the A image is A and right crop of the B image is B). --modes renders the
   regions in each layout named: `canvas` (every region view is the whole canvas, the default) and
   `windows` (`region_window="native"`: each view a native-size window around its region) and
   `decode` (windows, and each region's window of the final latent decoded alone: `region_decode=True`). Both as the 9-way
   argmax (none + 8 styles) and as the 2-way choice between A and B (logit_A vs logit_B).
   Two style heads read the crops: the zoo feature net's (learned from the generator's ground-truth
   styles) and a copy of the net fit to the teachers' own renders (`fit_style_classifier`: the base
   and every teacher render --probe-images training captions of the zoo's dataset at 64x32, seeds
   10000+, both crops labelled with the teacher; disjoint from the test's held-out prompts and
   seeds). The zoo head asks "is this the generator's style A", the fitted one "does this look like
   what teacher A renders", which is what a merged model can be expected to match. Both heads are also scored on
   the teachers' own 64x32 renders of the test prompts and seeds ("teachers" rate per style).
2. Seam: mean |column 32 - column 31| over mean |column j+1 - column j| of the same image (1 = no
   seam). Also for plain images and for the naive paste (left half of plain A + right half of plain B).
3. Cost: seconds per image, 64x32, for plain generation, K = 2 and 4 regions (one batched UNet call
   per step, in each of --modes), and the only route without DMM: K teacher pipelines, each step running every
   teacher's UNet on the latent and blending, either (a) all K teachers resident, or (b) one UNet
   whose weights are switched to the next teacher before each call (what K full checkpoints that
   do not fit together must do). Batch 1 (latency) and batch 16 (throughput); median of --reps,
   the variants interleaved; wall seconds and CPU seconds of this process (one torch thread).
4. Grid PNG: 8 two-region images and a 4-style panorama (style map, tiled windows, max_batch).

Sampler: the zoo's (DPM-Solver++ 15 steps, guidance 5, empty negative prompt). Prompt i of the
zoo's held-out prompts with seed i. Writes <out>/regions.json and <out>/regions_grid.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

STEPS, GUIDANCE, NEGATIVE = 15, 5.0, ""
H, W = 32, 64


def _load(model: str, zoo: Path):
    from dmm_ray.pipeline import load_dmm_pipeline
    from dmm_ray.zoo.feature_net import ZooFeatureNet
    from dmm_ray.zoo.manifest import load_zoo_manifest

    pipe = load_dmm_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    manifest = load_zoo_manifest(zoo)  # its paths by the jobs' rule (`~`, `$DMM_HOME`), not joined to --zoo as written
    net = ZooFeatureNet.from_pretrained(str(manifest.feature_net)).eval()
    prompts = [line.strip() for line in manifest.eval_prompts.read_text().splitlines() if line.strip()]
    distinct = [t["name"] for t in manifest.raw["teachers"] if t.get("group") == "distinct"]
    return pipe, net, prompts, distinct, manifest


def _generate(pipe, prompts, seeds, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        negative_prompt=[NEGATIVE] * len(prompts),
        height=H,
        width=W,
        generator=gens,
        output_type="pt",
        **kw,
    ).images


def _halves(pipe):
    from dmm_ray.regions import Region

    return lambda a, b: [Region(box=(0, 0, 0.5, 1), style=a), Region(box=(0.5, 0, 1, 1), style=b)]


@torch.no_grad()
def _style_logits(net, images):
    return net(images.float())["style"]  # (B, 1 + N): none, styles...


def _crops(images):
    return images[..., : W // 2], images[..., W // 2 :]  # (B, 3, 32, 32) each


def _render_all(pipe, prompts, seeds, batch, **kw):
    return torch.cat([_generate(pipe, prompts[k : k + batch], seeds[k : k + batch], **kw) for k in range(0, len(seeds), batch)])


def teacher_renders(zoo: Path, names: list[str], prompts, seeds, batch) -> dict[str, torch.Tensor]:
    """name -> (len(seeds), 3, H, W) renders of that teacher ("none": the zoo's base model)."""
    from dmm_ray.teachers import load_teacher_pipeline
    from dmm_ray.zoo.report import load_base_pipeline, teacher_specs

    specs = {s.name: s for s in teacher_specs(zoo)}
    out = {}
    for name in names:
        t0 = time.time()
        pipe = load_base_pipeline(zoo) if name == "none" else load_teacher_pipeline(specs[name])
        pipe.set_progress_bar_config(disable=True)
        out[name] = _render_all(pipe, prompts, seeds, batch)
        print(f"  rendered {len(seeds)} images of {name} in {time.time() - t0:.0f}s", flush=True)
        del pipe
    return out


def teacher_head(net, zoo: Path, manifest, n_images: int, batch: int):
    """The zoo feature net fit to classify the teachers' renders of training captions (seeds 10000+), both crops."""
    from dmm_ray.zoo.feature_net import fit_style_classifier

    rows = [json.loads(line) for line in (manifest.dataset / "manifest.jsonl").read_text().splitlines() if line.strip()]
    captions = list(dict.fromkeys(r["caption"] for r in rows))[:n_images]  # training captions, never the held-out ones
    seeds = [10_000 + i for i in range(len(captions))]
    names = net.label_names["style"]  # none + every zoo style: the head's own label space
    renders = teacher_renders(zoo, names, captions, seeds, batch)
    images = torch.cat([c for name in names for c in _crops(renders[name])])  # (2 * classes * n, 3, 32, 32)
    labels = torch.cat([torch.full((2 * len(seeds),), i) for i in range(len(names))])
    probe = fit_style_classifier(net, images, labels)
    fit_acc = float((_style_logits(probe, images).argmax(1) == labels).float().mean())
    return probe, {"images_per_class": len(seeds), "crops": len(images), "fit_accuracy": fit_acc}


def seam_ratio(images: torch.Tensor, column: int) -> list[float]:
    """Per image: mean |I[..., column] - I[..., column-1]| / mean over j of |I[..., j+1] - I[..., j]|."""
    diffs = (images[..., 1:] - images[..., :-1]).abs()  # (B, 3, H, W-1)
    seam = diffs[..., column - 1].mean(dim=(1, 2))
    mean = diffs.mean(dim=(1, 2, 3))
    return (seam / mean).tolist()


MODES = {"canvas": {}, "windows": {"region_window": "native"}, "decode": {"region_window": "native", "region_decode": True}}  # --modes


def _prefix(mode: str) -> str:
    """Result-key prefix of a region layout: `regions_*` for the default (canvas), `<mode>_*` for the others."""
    return "regions" if mode == "canvas" else mode


def _cell(mode: str) -> str:
    """Cost-cell name of a region layout: `dmm` for the default (canvas), `dmm_<mode>` for the others."""
    return "dmm" if mode == "canvas" else f"dmm_{mode}"


def _scores(net, imgs, plain, a, b, prefix: str = "regions") -> dict:
    """One head's rates for pair (a, b): regions (keys `<prefix>_*`) vs the whole-image ceiling, 9-way and A-vs-B."""
    names = net.label_names["style"]
    ia, ib = names.index(a), names.index(b)
    left, right = (_style_logits(net, c) for c in _crops(imgs))
    cl, cr = _style_logits(net, _crops(plain[a])[0]), _style_logits(net, _crops(plain[b])[1])
    argmax = lambda lg, i: lg.argmax(1) == i  # noqa: E731
    pair = lambda lg, i, j: lg[:, i] > lg[:, j]  # noqa: E731
    return {
        f"{prefix}_9way": float((argmax(left, ia) & argmax(right, ib)).float().mean()),
        "ceiling_9way": float((argmax(cl, ia) & argmax(cr, ib)).float().mean()),
        f"{prefix}_2way": float((pair(left, ia, ib) & pair(right, ib, ia)).float().mean()),
        "ceiling_2way": float((pair(cl, ia, ib) & pair(cr, ib, ia)).float().mean()),
        f"{prefix}_left_is_a": float(argmax(left, ia).float().mean()),
        f"{prefix}_right_is_b": float(argmax(right, ib).float().mean()),
    }


def _per_style(net, images: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per style and side: the fraction of crops the head classifies (9-way) as that style."""
    names = net.label_names["style"]
    return {
        f"{s}_{side}_9way": float((_style_logits(net, crop).argmax(1) == names.index(s)).float().mean())
        for s, imgs in images.items()
        for side, crop in zip(("left", "right"), _crops(imgs))
    }


def two_region_test(pipe, heads: dict, prompts, styles, seeds, batch, teachers: dict | None = None, modes=("canvas",), feather=None):
    """heads: name -> feature net whose style head scores the crops (every head sees the same images).
    modes: the region layouts rendered (MODES); the first one's images go to the grid."""
    ps = [prompts[i % len(prompts)] for i in seeds]
    plain = {s: _render_all(pipe, ps, seeds, batch, style=s) for s in styles}  # the ceiling: whole images, same seeds
    halves = _halves(pipe)
    out = {h: {"pairs": {}} for h in heads}
    seams = {_prefix(m): [] for m in modes} | {"plain": [], "paste": []}
    examples = {}
    for s in styles:
        seams["plain"] += seam_ratio(plain[s], W // 2)
    for a, b in itertools.permutations(styles, 2):
        row = {h: {} for h in heads}
        for m in modes:
            t0 = time.time()
            imgs = _render_all(pipe, ps, seeds, batch, regions=halves(a, b), feather=feather, **MODES[m])
            if m == modes[0]:
                examples[(a, b)] = imgs[len(examples) % len(imgs)]  # a different seed per pair in the grid
            for h, net in heads.items():
                row[h] |= _scores(net, imgs, plain, a, b, _prefix(m)) | {f"{_prefix(m)}_seconds": time.time() - t0}
            seams[_prefix(m)] += seam_ratio(imgs, W // 2)
        for h in heads:
            out[h]["pairs"][f"{a}|{b}"] = row[h]
            print(f"  {h:>8} {a:>6} | {b:<6} " + " ".join(f"{k}={v:.3f}" for k, v in row[h].items()), flush=True)
        paste = torch.cat([_crops(plain[a])[0], _crops(plain[b])[1]], dim=-1)
        seams["paste"] += seam_ratio(paste, W // 2)
    keys = [f"{_prefix(m)}_{k}" for m in modes for k in ("9way", "2way")] + ["ceiling_9way", "ceiling_2way"]
    for h, net in heads.items():
        rows = out[h]["pairs"].values()
        out[h]["mean"] = {k: statistics.mean(r[k] for r in rows) for k in keys}
        out[h]["min"] = {k: min(r[k] for r in rows) for k in keys}
        out[h]["ceiling"] = _per_style(net, plain)
        for m in modes:  # per style: the share of that style's region crops (left as A, right as B) the head calls that style
            p = _prefix(m)
            out[h][f"{p}_per_style"] = {
                s: statistics.mean(
                    [r[f"{p}_left_is_a"] for k, r in out[h]["pairs"].items() if k.split("|")[0] == s]
                    + [r[f"{p}_right_is_b"] for k, r in out[h]["pairs"].items() if k.split("|")[1] == s]
                )
                for s in styles
            }
        if teachers is not None:  # the teachers' own renders of the same prompts and seeds
            out[h]["teachers"] = _per_style(net, teachers)
    out["seam"] = {k: {"mean": statistics.mean(v), "median": statistics.median(v)} for k, v in seams.items()}
    return out, examples, plain


# ---- cost -------------------------------------------------------------------------------------
class TeacherRegions:
    """The route without DMM: K teacher pipelines (own UNet + own text encoder), one call per teacher
    per step on the shared latent, noise predictions blended with the same normalised masks."""

    def __init__(self, teachers: list, pipe, switch: bool):
        self.teachers, self.switch = teachers, switch
        self.vae, self.scheduler = pipe.vae, type(pipe.scheduler).from_config(pipe.scheduler.config)
        if switch:  # ONE resident UNet; each teacher's weights sit in host memory and are copied in per call
            import copy

            self.unet = copy.deepcopy(teachers[0].unet)
            self.states = [{k: v.clone() for k, v in t.unet.state_dict().items()} for t in teachers]

    def _embeds(self, teacher, prompts):
        pos, neg = teacher.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[NEGATIVE] * len(prompts))
        return torch.cat([neg, pos])

    @torch.no_grad()
    def __call__(self, prompts, seeds, weights):
        embeds = [self._embeds(t, prompts) for t in self.teachers]
        f = self.teachers[0].vae_scale_factor
        latents = torch.cat([torch.randn((1, 4, H // f, W // f), generator=torch.Generator().manual_seed(s)) for s in seeds])
        sched = self.scheduler
        sched.set_timesteps(STEPS)
        latents = latents * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps = torch.zeros_like(x)
            for k, teacher in enumerate(self.teachers):
                if self.switch:
                    self.unet.load_state_dict(self.states[k])
                    unet = self.unet
                else:
                    unet = teacher.unet
                eps += unet(x, t, encoder_hidden_states=embeds[k], return_dict=False)[0] * weights[k]
            u, c = eps.chunk(2)
            latents = sched.step(u + GUIDANCE * (c - u), t, latents, return_dict=False)[0]
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)


def _timed(cells: dict, reps: int) -> dict:
    """Median wall and CPU seconds per cell; the cells run round-robin (rep by rep) so that load from
    other processes on a shared machine falls on every cell alike. CPU time (this process, one torch
    thread) is the robust number on a busy machine; wall time is what a user waits."""
    for fn in cells.values():
        fn()  # warm-up
    wall, cpu = {k: [] for k in cells}, {k: [] for k in cells}
    for _ in range(reps):
        for k, fn in cells.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in cells}


def _per_sample(pipe, prompts, seeds, style):
    """A plain image with the per-sample style adapters (the path before a one-style call folded its
    style into the layers): what a plain image cost before, in the same run."""
    pipe.fuse_styles = False
    try:
        return _generate(pipe, prompts, seeds, style=style)
    finally:
        pipe.fuse_styles = True


def cost(pipe, zoo: Path, prompts, styles, reps: int, batches=(1, 16), modes=("canvas",), feather=None):
    """feather: the regions' sigma in image pixels (None: the pipeline's default), for the DMM cells and the
    teacher route's blend alike: it sets the windows' size, so what the cells cost."""
    from dmm_ray.regions import Region, build_region_views
    from dmm_ray.teachers import load_teacher_pipeline
    from dmm_ray.zoo.report import teacher_specs

    specs = {s.name: s for s in teacher_specs(zoo)}
    teachers = {}
    for name in styles:
        t = load_teacher_pipeline(specs[name])
        t.set_progress_bar_config(disable=True)
        teachers[name] = t
    res = {}
    for B in batches:
        ps, seeds = [prompts[i] for i in range(B)], list(range(B))
        cells = {"plain": lambda: _generate(pipe, ps, seeds, style=styles[0]), "plain_per_sample": lambda: _per_sample(pipe, ps, seeds, styles[0])}
        for K in (2, 4):
            regs = [Region(box=(k / K, 0, (k + 1) / K, 1), style=styles[k % len(styles)]) for k in range(K)]
            for m in modes:
                cells[f"{_cell(m)}_k{K}"] = lambda regs=regs, m=m: _generate(pipe, ps, seeds, regions=regs, feather=feather, **MODES[m])
            views, _ = build_region_views(regs, pipe.styles, (H, W), pipe.vae_scale_factor, feather=feather)
            weights = [v.weight for v in views]
            ts = [teachers[styles[k % len(styles)]] for k in range(K)]
            for mode, switch in (("teachers_resident", False), ("teachers_switching", True)):
                runner = TeacherRegions(ts, pipe, switch)
                cells[f"{mode}_k{K}"] = lambda runner=runner, weights=weights: runner(ps, seeds, weights)
        timed = _timed(cells, reps)
        row = {}
        for unit, j in (("wall", 0), ("cpu", 1)):
            r = {k: v[j] / B for k, v in timed.items()}
            for K, m in itertools.product((2, 4), modes):
                c = _cell(m)
                r[f"ratio_{c}_k{K}_vs_plain"] = r[f"{c}_k{K}"] / r["plain"]
                r[f"ratio_{c}_k{K}_vs_plain_per_sample"] = r[f"{c}_k{K}"] / r["plain_per_sample"]
                for route in ("teachers_resident", "teachers_switching"):
                    r[f"ratio_{route}_k{K}_vs_{c}"] = r[f"{route}_k{K}"] / r[f"{c}_k{K}"]
            row[unit] = r
            print(f"  batch {B} {unit}: " + " ".join(f"{k}={v:.4f}" for k, v in r.items()), flush=True)
        res[f"batch_{B}"] = row
    return res


# ---- grid -------------------------------------------------------------------------------------
def grid(pipe, examples, styles, prompts, out: Path, scale: int = 4) -> dict:
    from PIL import Image, ImageDraw

    from dmm_ray.regions import sweep  # noqa: F401  (documented alternative style map)

    pairs = list(examples)[:8]
    tiles = [(f"{a} | {b}", examples[(a, b)]) for a, b in pairs]
    pano_w = 256
    style_map = [(i / 4, (i + 1) / 4, s) for i, s in enumerate(styles)]
    t0 = time.time()
    pano = pipe(
        [prompts[3]],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        negative_prompt=[NEGATIVE],
        height=H,
        width=pano_w,
        style_map=style_map,
        window_stride=16,
        max_batch=8,
        generator=[torch.Generator().manual_seed(3)],
        output_type="pt",
    ).images[0]
    pano_s = time.time() - t0
    to_pil = lambda t: Image.fromarray((t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8"))  # noqa: E731
    tw, th, label = W * scale, H * scale, 14
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (tw + 8) + 8, rows * (th + label + 8) + th + 2 * label + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (name, img) in enumerate(tiles):
        x, y = 8 + (k % cols) * (tw + 8), 8 + (k // cols) * (th + label + 8)
        draw.text((x, y), name, fill="black")
        canvas.paste(to_pil(img).resize((tw, th), Image.NEAREST), (x, y + label))
    y = 8 + rows * (th + label + 8)
    draw.text((8, y), "panorama 256x32: " + " | ".join(styles) + " (style map, 15 windows, max_batch 8)", fill="black")
    pano_img = to_pil(pano).resize((pano_w * 2, H * 2), Image.NEAREST)
    canvas.paste(pano_img.resize((cols * (tw + 8) - 8, int(H * (cols * (tw + 8) - 8) / pano_w)), Image.NEAREST), (8, y + label))
    canvas = canvas.crop((0, 0, canvas.width, y + label + int(H * (cols * (tw + 8) - 8) / pano_w) + 8))
    canvas.save(out / "regions_grid.png")
    return {"panorama_seconds": pano_s, "grid": str(out / "regions_grid.png")}


def main(argv=None):
    from dmm_ray.console import positive_int, refuse_models_being_replaced

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="merged-model folder (the toy zoo's merge)")
    ap.add_argument("--zoo", default=".zoo", help="the zoo the model was merged from (feature net, prompts, teachers)")
    ap.add_argument("--out", default="outputs/regions")
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=positive_int, default=5, help="timed repetitions per cost cell (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe-images", type=int, default=256, help="renders per class (base + each teacher) the teacher-fit classifier learns from")
    ap.add_argument(
        "--feather",
        type=float,
        default=None,
        help="the regions' feather sigma in image pixels, for the two-region test and the cost (default: the pipeline's, 4 px here)",
    )
    ap.add_argument("--skip-cost", action="store_true", help="only the two-region test (with the teacher-fit classifier) and the grid")
    ap.add_argument("--cost-only", action="store_true", help="only the cost table (seconds per image), no two-region test or grid")
    ap.add_argument(
        "--modes",
        default="canvas",
        help="comma-separated region layouts to render and time: canvas (whole-canvas views, the default), windows (region_window='native'), decode (windows + region_decode=True)",
    )
    args = ap.parse_args(argv)
    if args.cost_only and args.skip_cost:
        ap.error("--cost-only and --skip-cost leave nothing to run: give one")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: a comma-separated list of {', '.join(MODES)}, got {args.modes!r}")
    refuse_models_being_replaced(ap, args, "model")  # refused while a running job's save may replace it
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zoo = Path(args.zoo)
    pipe, net, prompts, distinct, manifest = _load(args.model, zoo)
    settings = dict(
        model=args.model,
        zoo=str(zoo),
        size=[H, W],
        steps=STEPS,
        guidance=GUIDANCE,
        negative_prompt=NEGATIVE,
        seeds=args.seeds,
        styles=distinct,
        threads=args.threads,
        feather_px=max(pipe.vae_scale_factor, min(H, W) / 16) if args.feather is None else args.feather,
        modes=list(modes),
    )
    print("settings:", json.dumps(settings), flush=True)
    result = {"settings": settings}
    if not args.skip_cost:
        print("cost (seconds per image):", flush=True)
        result["cost"] = cost(pipe, zoo, prompts, distinct, args.reps, modes=modes, feather=args.feather)
        (out / "regions.json").write_text(json.dumps(result, indent=1))
    if args.cost_only:
        print(f"wrote {out / 'regions.json'}")
        return
    print("fitting a style classifier to the teachers' renders:", flush=True)
    probe, result["teacher_head"] = teacher_head(net, zoo, manifest, args.probe_images, args.batch)
    seeds = list(range(args.seeds))
    print("the teachers' own renders of the test prompts and seeds:", flush=True)
    own = teacher_renders(zoo, distinct, [prompts[i % len(prompts)] for i in seeds], seeds, args.batch)
    print("two-region test:", flush=True)
    t0 = time.time()
    heads = {"zoo": net, "fitted": probe}  # the zoo head; the classifier fit to teacher renders
    result["two_region"], examples, _ = two_region_test(
        pipe, heads, prompts, distinct, seeds, args.batch, teachers=own, modes=modes, feather=args.feather
    )
    result["two_region"]["seconds"] = time.time() - t0
    (out / "regions.json").write_text(json.dumps(result, indent=1))
    result["grid"] = grid(pipe, examples, distinct, prompts, out)
    (out / "regions.json").write_text(json.dumps(result, indent=1))
    summary = {h: {k: v for k, v in result["two_region"][h].items() if k != "pairs"} for h in heads}
    print(json.dumps(summary | {"seam": result["two_region"]["seam"], "teacher_head": result["teacher_head"]}, indent=1))
    print(f"wrote {out / 'regions.json'} and {out / 'regions_grid.png'}")


if __name__ == "__main__":
    main()

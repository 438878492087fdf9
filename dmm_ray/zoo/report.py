"""Quality report of a built zoo: prompt following, the teacher reference matrix M_ref, a sample grid.

- Prompt following: the base samples every held-out eval prompt; the feature net's classifier
  heads (trained on the generator's ground truth) read back colour, shape, background and count,
  and the rate is the fraction that matches the caption (`scenes.parse_caption`).
- M_ref(i, j) = Fréchet distance on zoo-feature-net features between teacher i's samples with
  seed set A and teacher j's with seed set B (same prompts, different noise). A clear diagonal
  means each teacher's style is recognisable and reproducible.
- Grid: rows = base + teachers, columns = eval prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from dmm_ray.data.readers import read_prompts
from dmm_ray.evaluation.fid import fid_from_features as frechet_distance  # one FID implementation project-wide

from .feature_net import ZooFeatureNet
from .manifest import ZooManifest, load_zoo_manifest, manifest_path, read_manifest
from .scenes import parse_caption, to_uint8

SEED_SET_A = 1000
SEED_SET_B = 2000


def load_manifest(root: str | Path) -> dict:
    return read_manifest(root)


def teacher_specs(root: str | Path):
    """The manifest's teachers as `dmm_ray.teachers.TeacherSpec`s with absolute paths."""
    return load_zoo_manifest(root).teachers


def zoo_path(root: str | Path, key: str, zoo: ZooManifest | None = None) -> Path:
    """The zoo.yaml's `key` (base, eval_prompts, feature_net, dataset) as an absolute path, by the one rule of
    its paths (load_zoo_manifest: relative to its folder, `~` and `$DMM_HOME` expanded); root: the zoo folder or
    its zoo.yaml. Joined to the folder as written, `$DMM_HOME/zoo/full/base` became <zoo>/$DMM_HOME/zoo/full/base.
    `zoo`: load_zoo_manifest(root), when the caller has read it already."""
    path = getattr(zoo or load_zoo_manifest(root), key)
    if path is None:
        raise ValueError(f"'{manifest_path(root)}' names no {key}: the zoo report needs its base, eval_prompts and feature_net")
    return path


def load_base_pipeline(root: str | Path, zoo: ZooManifest | None = None):
    """The zoo's base model (`zoo`: load_zoo_manifest(root), when the caller has read it already)."""
    from diffusers import StableDiffusionPipeline

    base = zoo_path(root, "base", zoo)
    return StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False, local_files_only=True)


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, steps: int = 15, guidance: float = 5.0, batch_size: int = 128) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]; batch k uses generator seed `seed + k` (reproducible, order-independent)."""
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for k, lo in enumerate(range(0, len(prompts), batch_size)):
        gen = torch.Generator().manual_seed(seed + k)
        res = pipe(
            prompts[lo : lo + batch_size],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="pt",
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)


def prompt_following(
    net: ZooFeatureNet, images: torch.Tensor, prompts: list[str], heads=("colour", "shape", "background", "count"), pred: dict | None = None
) -> dict:
    """Fraction of images whose feature-net prediction matches the caption, per attribute
    (`pred`: `net.predict(images)` when the caller already has it)."""
    pred = net.predict(images) if pred is None else pred
    truth = [parse_caption(p) for p in prompts]
    return {h: float(np.mean([p == t[h] for p, t in zip(pred[h], truth)])) for h in heads}


def grid_png(rows: dict[str, torch.Tensor], prompts: list[str], path: Path, scale: int = 3) -> Path:
    """rows: name -> (C, 3, H, W) images for the same C prompts."""
    names = list(rows)
    h = next(iter(rows.values())).shape[-1] * scale
    label_w, header_h = 70, 14
    canvas = Image.new("RGB", (label_w + h * len(prompts), header_h + h * len(names)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        gt = parse_caption(prompt)
        draw.text((label_w + j * h + 2, 1), f"{gt['colour']} {gt['shape']}", fill="black")
    for i, name in enumerate(names):
        draw.text((2, header_h + i * h + h // 2 - 5), name, fill="black")
        for j, px in enumerate(to_uint8(rows[name])):
            canvas.paste(Image.fromarray(px).resize((h, h), Image.NEAREST), (label_w + j * h, header_h + i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def pick_grid_prompts(prompts: list[str], n: int = 8) -> list[str]:
    """`n` prompts with pairwise different colours and, as far as possible, different shapes."""
    picked, colours, shapes = [], set(), set()
    for p in prompts:
        gt = parse_caption(p)
        if gt["colour"] not in colours and gt["shape"] not in shapes:
            picked.append(p)
            colours.add(gt["colour"])
            shapes.add(gt["shape"])
    for p in prompts:  # fewer shapes than colours: fill up with unseen colours
        gt = parse_caption(p)
        if len(picked) < n and gt["colour"] not in colours:
            picked.append(p)
            colours.add(gt["colour"])
    return picked[:n]


def run_report(root: str | Path, n_per_set: int = 256, steps: int = 15, guidance: float = 5.0, progress: bool = True, force: bool = False) -> dict:
    """Compute (or read back, if cached with the same settings) the zoo's quality report."""
    import pyarrow.fs as pafs

    from dmm_ray.data.fs import write_bytes_atomic
    from dmm_ray.teachers import load_teacher_pipeline

    root = manifest_path(root).resolve().parent  # the zoo folder, also when given its zoo.yaml
    out_dir = root / "report"
    settings = {"n_per_set": n_per_set, "steps": steps, "guidance": guidance, "seed_sets": [SEED_SET_A, SEED_SET_B]}
    cached = out_dir / "report.json"
    if cached.is_file() and not force:
        try:
            report = json.loads(cached.read_text())
        except (OSError, ValueError):  # one a write cut short left (a full disk): no report, made again
            report = {}
        if isinstance(report, dict) and report.get("settings") == settings:
            return report | {"grid_png": str(out_dir / "grid.png")}  # where it is now: the zoo folder may have moved
    zoo = load_zoo_manifest(root)  # read once: its paths, teachers and groups
    net = ZooFeatureNet.from_pretrained(zoo_path(root, "feature_net", zoo)).eval()
    eval_prompts = read_prompts(str(zoo_path(root, "eval_prompts", zoo)))
    prompts = [eval_prompts[i % len(eval_prompts)] for i in range(n_per_set)]
    grid_prompts = pick_grid_prompts(eval_prompts)

    base = load_base_pipeline(root, zoo)
    base_a = sample_images(base, prompts, SEED_SET_A, steps, guidance)
    report = {"settings": settings, "feature_net": net.name, "frechet": "dmm_ray.evaluation.fid.fid_from_features"}
    report["base_prompt_following"] = prompt_following(net, base_a, prompts)
    grid = {"base": sample_images(base, grid_prompts, 7, steps, guidance)}

    names, feats_a, feats_b, per_teacher = [], [], [], {}
    specs = zoo.teachers
    for spec in tqdm(specs, desc="teachers", disable=not progress, leave=False):
        pipe = load_teacher_pipeline(spec)
        a = sample_images(pipe, prompts, SEED_SET_A, steps, guidance)
        b = sample_images(pipe, prompts, SEED_SET_B, steps, guidance)
        grid[spec.name] = sample_images(pipe, grid_prompts, 7, steps, guidance)
        names.append(spec.name)
        feats_a.append(net.features(a))
        feats_b.append(net.features(b))
        pred = net.predict(a)  # once: prompt following and style recognition read the same predictions
        pf = prompt_following(net, a, prompts, heads=("shape", "colour", "count"), pred=pred)
        pf["style_recognised"] = float(np.mean([s == spec.name for s in pred["style"]]))
        per_teacher[spec.name] = pf
        del pipe
    m = np.array([[frechet_distance(fa, fb) for fb in feats_b] for fa in feats_a])
    report["teachers"] = names
    report["groups"] = {t["name"]: t.get("group") for t in zoo.raw["teachers"]}
    report["m_ref"] = m.round(3).tolist()
    report["teacher_checks"] = per_teacher
    report["diagonal"] = diagonal_checks(names, m, report["groups"])
    report["grid_png"] = str(grid_png(grid, grid_prompts, out_dir / "grid.png"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # moved into place whole: written in place, a write cut short left a torn report.json that stopped every later
    # report (a bare JSONDecodeError) until --force
    write_bytes_atomic(pafs.LocalFileSystem(), str(cached), json.dumps(report, indent=2).encode())
    return report


def diagonal_checks(names: list[str], m: np.ndarray, groups: dict[str, str]) -> dict:
    """Per row: is the diagonal the row minimum; diagonal / smallest off-diagonal (want < 0.5 for distinct styles)."""
    out = {}
    for i, name in enumerate(names):
        off = np.delete(m[i], i)
        out[name] = {
            "diag_is_row_min": bool(m[i, i] < off.min()) if len(off) else True,
            "diag_over_min_offdiag": round(float(m[i, i] / off.min()), 3) if len(off) else 0.0,
            "group": groups.get(name),
        }
    return out


def format_report(report: dict) -> str:
    names = report["teachers"]
    m = np.array(report["m_ref"])
    w = max(8, max(len(n) for n in names) + 1)
    lines = [
        f"M_ref: Fréchet distance on {report['feature_net']} features ({report['frechet']});",
        f"row = teacher i with seed set A, column = teacher j with seed set B; {report['settings']}",
        " " * w + "".join(f"{n:>{w}}" for n in names),
    ]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}" + "".join(f"{v:>{w}.2f}" for v in m[i]))
    lines.append("")
    lines.append("row checks (diag < every off-diagonal; distinct styles want diag/min_offdiag < 0.5):")
    for n, d in report["diagonal"].items():  # a zoo.yaml teacher's group is optional (a hand-written one): "-"
        lines.append(f"  {n:<{w}} group={d['group'] or '-':<9} diag_is_row_min={d['diag_is_row_min']}  diag/min_offdiag={d['diag_over_min_offdiag']}")
    lines.append("")
    pf = report["base_prompt_following"]
    lines.append("base prompt following (feature-net heads vs held-out caption): " + ", ".join(f"{k} {v:.1%}" for k, v in pf.items()))
    lines.append("teachers (shape/colour/count followed, own style recognised by the feature net):")
    for n, d in report["teacher_checks"].items():
        lines.append(f"  {n:<{w}} " + ", ".join(f"{k} {v:.1%}" for k, v in d.items()))
    lines.append(f"grid: {report['grid_png']}")
    return "\n".join(lines)

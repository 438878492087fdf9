"""Build the toy zoo: image set -> VAE -> base UNet + text encoder -> feature net -> teachers.

Cached and atomic: everything is written to a sibling `DIR.partial-<pid>` folder, the
completion marker is written last, and the folder is renamed to `DIR` only then, so a crashed
or interrupted build is never mistaken for a zoo; a forced rebuild moves the old zoo aside in one rename
before the new one takes its place. A second build with the same config returns at once.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from dmm_ray.console import interrupt_note

from . import scenes as S
from .components import tokenize, zoo_components
from .config import MARKER, ZOO_THREADS, ZooConfig, built_threads, is_complete, outdated_preset
from .dataset import write_eval_prompts, write_image_set
from .feature_net import ZooFeatureNet, scene_labels, train_feature_net
from .formats import LORA_TARGETS, save_teacher
from .manifest import MANIFEST
from .styles import apply_style, get_style
from .train import calibrate_scaling_factor, decode_latents, encode_latents, psnr, train_denoiser, train_vae


class ZooBuildError(RuntimeError):
    pass


def default_threads() -> int:
    """The zoo build's torch threads: `ZOO_THREADS` (dmm_ray.zoo.config), whatever the machine's cores or load. The weights
    are bit-identical only for one thread count (another one sums floats in another order), so a
    count that followed the load (it was 1 on a busy machine) gave `make demo` run right after
    `make test` another zoo and other FIDs (ratio 1.117 instead of 1.085). On a busy machine 1
    thread is cheaper (tiny models spend most of an oversubscribed step in OpenMP synchronisation):
    `python jobs/build_zoo.py --threads 1` builds that other zoo on purpose."""
    return ZOO_THREADS


def build_zoo(out: str | Path, config: ZooConfig, progress: bool = True, force: bool = False) -> Path:
    """Build (or reuse) the zoo at `out` with torch's current thread count; returns `out`. A finished zoo
    is reused only when built from the same config with as many threads (each count gives other weights)."""
    out = Path(out).resolve()
    done = is_complete(out)
    if done is not None and not force:
        if done.get("fingerprint") != config.fingerprint():
            if (done.get("size"), done.get("seed")) == (config.size, config.seed):  # same name, other settings: the preset changed
                raise ZooBuildError(
                    f"{out} holds a zoo built from an older version of the {config.size!r} preset (seed {config.seed}). "
                    f"Use another --out or --force to rebuild (`python jobs/build_zoo.py --out {out} --size {config.size} --force`)."
                )
            raise ZooBuildError(
                f"{out} holds a zoo built with a different config (size {done.get('size')!r}, seed {done.get('seed')}); "
                f"requested size {config.size!r}, seed {config.seed}. Use another --out or --force to rebuild."
            )
        threads, built = torch.get_num_threads(), built_threads(out, done)
        if built is not None and built != threads:
            raise ZooBuildError(
                f"{out} holds this zoo built with {built} torch thread(s), but this build runs {threads}, which gives other "
                f"weights (float sums in another order). To use it, build with --threads {built} (torch.set_num_threads({built})); "
                f"to replace it, --force; or use another --out."
            )
        _remove_stale_partials(out)  # a killed --force rebuild's leftovers: a cached call is "the next one" too
        return out
    if out.exists() and done is None and any(out.iterdir()):
        raise ZooBuildError(f"{out} exists, is not empty and is not a finished zoo; remove it or choose another --out")
    _remove_stale_partials(out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    old = out.with_name(f"{out.name}.partial-old-{os.getpid()}")  # a stale one is removed like a partial build
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, config, progress)
        if out.exists():  # only a finished zoo (force) or an empty folder reaches here
            os.replace(out, old)  # moved aside in one step: deleting it in place could be stopped half-way, marker kept
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # stopped between the two renames: the previous zoo goes back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def ensure_zoo_preset(size: str, out: str | Path, progress: bool = True) -> Path:
    """The preset zoo `size` at `out`, built first if missing (the merge job's `zoo: <preset>`).

    `zoo_lock` makes concurrent first uses (two jobs, or a job while `jobs/build_zoo.py` builds the
    same folder) wait for one build instead of racing; torch runs on `default_threads()` threads
    during the build."""
    from .config import preset

    config = preset(size)  # ValueError naming the known sizes
    out = Path(out)
    with zoo_lock(out):
        if is_complete(out) is None:
            print(f"building the toy zoo preset {size!r} in {out} (first use; cached for later runs)", flush=True)
        outdated = outdated_preset(size, out)
        if outdated:
            raise ZooBuildError(outdated)
        threads = torch.get_num_threads()
        torch.set_num_threads(default_threads())
        note = f"the toy zoo's build was stopped: nothing was written to {out} (the unfinished build is removed by the next one); the same command builds it again"
        try:
            with interrupt_note(note):
                return build_zoo(out, config, progress=progress)
        finally:
            torch.set_num_threads(threads)


@contextmanager
def zoo_lock(out: str | Path):
    """Held while a zoo is built at `out` (`jobs/build_zoo.py` and a merge's first use): the lock file
    beside it makes a second build of the same folder wait for the first, then find it finished,
    instead of building it again and swapping the folder under the first one's users."""
    import fcntl

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process is building the toy zoo at {out}; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_stale_partials(out: Path) -> None:
    """Delete `DIR.partial-<pid>` folders of builds that were killed (their pid no longer runs)."""
    # escaped: in `zoo[v2]` the brackets are a character class, which matched other zoos' partials, never its own
    for stale in out.parent.glob(f"{glob.escape(out.name)}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def _style_pool(config: ZooConfig, styles: list[str]) -> tuple[list[S.Scene], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scenes, clean renders (N, 3, H, W), style index per image (0 = none) and the restyled images."""
    scenes = S.sample_scenes(config.pool_images, config.seed, "feature")
    clean = S.render(scenes, config.image_size)
    style_idx = torch.arange(len(scenes)) % (1 + len(styles))  # balanced: none + every style
    images = clean.clone()
    for k, name in enumerate(styles, start=1):
        sel = style_idx == k
        images[sel] = apply_style(name, clean[sel])
    return scenes, clean, style_idx, images


def _build(root: Path, config: ZooConfig, progress: bool) -> None:
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    metrics: dict = {}
    t_start = time.perf_counter()
    styles = [t.style for t in config.teachers]
    stages = tqdm(total=5 + len(styles), desc="zoo", disable=not progress, dynamic_ncols=True)

    cpu = {"last": time.process_time()}
    cpu_times: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)
        now = time.process_time()
        cpu_times[name] = round(now - cpu["last"], 1)  # CPU seconds, all threads (contention-independent)
        cpu["last"] = now
        stages.set_postfix_str(f"{name} {timings[name]:.0f}s")
        stages.update()

    # 1. the captioned image set + held-out eval prompts --------------------------------------
    t0 = time.perf_counter()
    write_image_set(root / "images", config.disk_images, config.seed, config.image_size, progress=progress)
    write_eval_prompts(root / "eval_prompts.txt")
    stage("image_set", t0)

    # 2. VAE on clean + restyled images (one latent space for every teacher) -------------------
    t0 = time.perf_counter()
    c = zoo_components(config.seed, config.image_size)
    vae, tokenizer, text_encoder, unet = c["vae"], c["tokenizer"], c["text_encoder"], c["unet"]
    pool_scenes, pool_clean, pool_style, pool = _style_pool(config, styles)
    with torch.no_grad():  # start with a near-deterministic posterior (std ~3e-4) so early decoder
        # inputs are not drowned in sampling noise; the KL term is free to widen it
        moments = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out  # -> (mean, logvar)
        moments.bias[vae.config.latent_channels :] = -16.0
    metrics["vae_loss"] = train_vae(
        vae,
        pool,
        config.vae_steps,
        config.vae_batch_size,
        config.vae_lr,
        object_weight=config.vae_object_weight,
        seed=config.seed + 11,
        progress=progress,
    )[-1]
    metrics["vae_scaling_factor"] = calibrate_scaling_factor(vae, pool[:2048])
    vae.requires_grad_(False)
    held_scenes = S.sample_scenes(min(512, config.pool_images), config.seed, "eval")
    held = S.render(held_scenes, config.image_size)
    metrics["vae_psnr_db"] = {"clean": round(psnr(vae, held), 2)}
    for name in styles:
        metrics["vae_psnr_db"][name] = round(psnr(vae, apply_style(name, held)), 2)
    tqdm.write(f"VAE PSNR (dB): {metrics['vae_psnr_db']}")
    stage("vae", t0)

    # 3. base UNet + text encoder on clean captioned latents -----------------------------------
    t0 = time.perf_counter()
    base_scenes = S.sample_scenes(config.base_scenes, config.seed, "train")
    base_clean = S.render(base_scenes, config.image_size)
    base_latents = encode_latents(vae, base_clean)  # (N, 4, 8, 8)
    base_ids = tokenize(tokenizer, [s.caption for s in base_scenes])  # (N, L)
    empty_ids = tokenize(tokenizer, [""])[0]
    losses = train_denoiser(
        unet,
        text_encoder,
        base_latents,
        base_ids,
        empty_ids,
        config.base_steps,
        config.batch_size,
        config.base_lr,
        train_text_encoder=True,
        ema_decay=config.base_ema,
        seed=config.seed + 21,
        desc="base unet",
        progress=progress,
    )
    metrics["base_loss_last100"] = sum(losses[-100:]) / len(losses[-100:])
    base_pipe = StableDiffusionPipeline(**c)
    base_pipe.save_pretrained(root / "base", safe_serialization=True)
    stage("base", t0)

    # 4. feature net on clean/restyled renders and their VAE reconstructions -------------------
    t0 = time.perf_counter()
    net = ZooFeatureNet(style_names=styles, image_size=config.image_size)
    recon = decode_latents(vae, encode_latents(vae, pool))
    labels = scene_labels(pool_scenes, pool_style)
    colour_known = torch.tensor([True] + [get_style(n).keeps_colour for n in styles])[pool_style]
    both = torch.cat([pool, recon])
    labels2 = {k: torch.cat([v, v]) for k, v in labels.items()}
    torch.manual_seed(config.seed + 31)
    metrics["feature_net_train_accuracy"] = train_feature_net(
        net, both, labels2, torch.cat([colour_known, colour_known]), config.feature_steps, seed=config.seed + 31, progress=progress
    )
    net.save_pretrained(root / "feature_net")
    stage("feature_net", t0)

    # 5. teachers: the base fine-tuned on each restyled image set ----------------------------
    entries = []
    teacher_scenes = base_scenes[: config.teacher_scenes]
    teacher_clean = base_clean[: config.teacher_scenes]
    teacher_ids = base_ids[: config.teacher_scenes]
    for k, plan in enumerate(config.teachers):
        t0 = time.perf_counter()
        latents = encode_latents(vae, apply_style(plan.style, teacher_clean))
        t_unet = copy.deepcopy(unet)
        t_text = copy.deepcopy(text_encoder) if plan.train_text_encoder else text_encoder
        lora_state = None
        if plan.format == "lora":
            t_unet.requires_grad_(False)
            t_unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
            steps, lr = config.lora_steps, config.lora_lr
        else:
            t_unet.requires_grad_(True)
            steps, lr = config.teacher_steps, config.teacher_lr
        losses = train_denoiser(
            t_unet,
            t_text,
            latents,
            teacher_ids,
            empty_ids,
            steps,
            config.batch_size,
            lr,
            train_text_encoder=plan.train_text_encoder,
            seed=config.seed + 100 + k,
            desc=f"teacher {plan.style}",
            progress=progress,
        )
        if plan.format == "lora":
            lora_state = get_peft_model_state_dict(t_unet)
        pipe = StableDiffusionPipeline(**(c | {"unet": t_unet, "text_encoder": t_text}))
        entry = save_teacher(pipe, plan.format, root / "teachers", plan.style, lora_state)
        entries.append(
            {
                "name": plan.style,
                "description": get_style(plan.style).description,
                **entry,
                "group": get_style(plan.style).group,
                "own_text_encoder": plan.train_text_encoder,
            }
        )
        metrics.setdefault("teacher_loss_last20", {})[plan.style] = sum(losses[-20:]) / len(losses[-20:])
        stage(f"teacher_{plan.style}", t0)
    stages.close()
    del teacher_scenes

    manifest = {
        "base": "base",
        "dataset": "images",
        "eval_prompts": "eval_prompts.txt",
        "feature_net": "feature_net",
        "image_size": config.image_size,
        "seed": config.seed,
        "size": config.size,
        "teachers": entries,
    }
    (root / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    (root / "config.json").write_text(config.model_dump_json(indent=2))
    timings["total"] = round(time.perf_counter() - t_start, 2)
    metrics["timings_s"] = timings
    metrics["cpu_time_s"] = round(time.process_time(), 1)
    metrics["cpu_time_per_stage_s"] = cpu_times
    metrics["torch_threads"] = torch.get_num_threads()
    metrics["machine"] = f"{platform.machine()} x{os.cpu_count()} cpus"
    (root / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # last: the marker that makes this folder a finished zoo
    marker = {"fingerprint": config.fingerprint(), "size": config.size, "seed": config.seed, "threads": torch.get_num_threads()}
    (root / MARKER).write_text(json.dumps(marker))

"""Packed distillation on one GPU: samples/s and peak memory for k = 1, 4, 8 teachers per worker.

  python benchmarks/gpu_distill.py                      # one H100/H200: SD1.5-size UNets, random weights, bf16, < 8 min
  python benchmarks/gpu_distill.py --tiny               # the same code on CPU with tiny UNets (the test suite runs this)
  python benchmarks/gpu_distill.py --json out.json --gradient-checkpointing --rows-per-style 4

Nothing is downloaded: the UNets (SD1.5 architecture, 859.5M parameters) and text encoders (CLIP-L)
are randomly initialised, which costs the same FLOPs and bytes as real weights. Each k builds a
fresh worker: a StyleUNet student (fp32 master weights, bf16 autocast), the multi-class
discriminator on the base, k frozen teachers in --teacher-dtype (each with its own text encoder;
`--lora-ks`: k rank-64 LoRA adapters on ONE shared base and text encoder; `--offload-ks`: k full
teachers in pinned CPU RAM, copied to two device slots with side-stream prefetch),
and runs the real DistillStep (score + feature + adversarial losses, discriminator update) on
`--batch` rows per step split evenly among the k teachers (or `--rows-per-style` rows each).
Printed per k: samples/s, peak allocated memory, and the memory planner's prediction for the same
layout (dmm_ray.memory_plan), so one run also checks the planner.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dmm_ray.console import int_list, int_list_or_none, positive_int  # noqa: E402


def build(
    k: int,
    rows_per_style: int,
    device: torch.device,
    tiny: bool,
    teacher_dtype: torch.dtype,
    checkpointing: bool,
    optimizer: str,
    latent: int,
    kind: str = "full",
    lora_rank: int = 64,
):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dmm_ray.distill.loop import make_adamw
    from dmm_ray.distill.step import DistillStep, LossSettings, concat_batches
    from dmm_ray.distill.teacher_bank import TeacherBank
    from dmm_ray.memory_plan import CLIP_L, SD15_UNET
    from dmm_ray.models.discriminator import MultiClassDiscriminator
    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.tiny import tiny_text_encoder_config, tiny_unet_config

    torch.manual_seed(0)
    unet_cfg = tiny_unet_config() if tiny else SD15_UNET
    text_cfg = tiny_text_encoder_config(vocab_size=1000) if tiny else CLIPTextConfig(**CLIP_L)
    with torch.device(device):  # initialise on the device: fast, and no CPU copy of 6 x 3.4 GB
        base = UNet2DConditionModel(**unet_cfg)
        text = CLIPTextModel(text_cfg).requires_grad_(False).eval()
        if kind == "lora":  # k LoRA teachers: ONE base in teacher dtype + k named PEFT adapters (rank lora_rank)
            from peft import LoraConfig

            from dmm_ray.memory_plan import COMMON_LORA_TARGETS

            shared = copy.deepcopy(base).to(teacher_dtype).requires_grad_(False).eval()
            names = [f"teacher_{j}" for j in range(k)]
            for name in names:
                shared.add_adapter(
                    LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(COMMON_LORA_TARGETS), init_lora_weights="gaussian"),
                    adapter_name=name,
                )
            shared.to(device=device, dtype=teacher_dtype).requires_grad_(False)
            shared_text = copy.deepcopy(text).to(teacher_dtype)
            bank = TeacherBank.adapters(shared, names, [shared_text] * k)
        elif kind == "offload":  # full teachers in (pinned) CPU RAM, two device slots
            cpu = [copy.deepcopy(base).to(teacher_dtype).requires_grad_(False).eval().to("cpu") for _ in range(k)]
            bank = TeacherBank.offloaded(cpu, [copy.deepcopy(text).to(teacher_dtype) for _ in range(k)], device)
            del cpu
        else:
            teachers = [copy.deepcopy(base).to(teacher_dtype).requires_grad_(False).eval() for _ in range(k)]
            bank = TeacherBank.resident(teachers, [copy.deepcopy(text).to(teacher_dtype) for _ in range(k)])
    student = StyleUNet.from_unet(base, [f"s{i}" for i in range(k)]).to(device).train()
    if checkpointing:
        student.enable_gradient_checkpointing()
    disc = MultiClassDiscriminator(base, k).to(device)
    del base
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    step = DistillStep(student, text, bank, None, sched, LossSettings(), k, disc, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    opt_s = make_adamw(student.parameters(), 1e-5, 1e-2, optimizer)
    opt_d = make_adamw(disc.head.parameters(), 1e-5, 1e-2, optimizer)
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = text_cfg.vocab_size

    def batch():
        subs = []
        for _ in range(k):
            x0 = torch.randn(rows_per_style, 4, latent, latent, generator=g)
            eps = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, 1000, (rows_per_style,), generator=g)
            subs.append(
                {
                    "noisy_latents": sched.add_noise(x0, eps, t).to(device),
                    "timesteps": t.to(device),
                    "input_ids": torch.randint(0, vocab - 2, (rows_per_style, 77), generator=g).to(device),
                }
            )
        ids = torch.arange(k, device=device).repeat_interleave(rows_per_style)
        return concat_batches(subs), ids

    return step, opt_s, opt_d, batch


def measure(k: int, args, device: torch.device, kind: str = "full") -> dict:
    from dmm_ray.process_memory import peak_rss_bytes, reset_peak_rss

    rows = args.rows_per_style or max(1, args.batch // k)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.teacher_dtype]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:  # each k's own peak, from the RSS the earlier k's left (freed tensors return their pages)
        gc.collect()
        reset_peak_rss()
    started = time.time()
    step, opt_s, opt_d, batch = build(
        k, rows, device, args.tiny, dtype, args.gradient_checkpointing, args.optimizer, args.latent, kind, args.lora_rank
    )
    built = time.time() - started
    gen = torch.Generator(device=device).manual_seed(0)

    def one(step=step, opt_s=opt_s, opt_d=opt_d, batch=batch):  # bound now: the names are deleted below
        b, ids = batch()
        step.run([b], [ids], opt_s, opt_d, generator=gen)

    for _ in range(args.warmup):
        one()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.time()
    for _ in range(args.steps):
        one()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
    result = {
        "k": k,
        "teachers": kind,
        "rows_per_style": rows,
        "rows_per_step": rows * k,
        "steps": args.steps,
        "samples_per_s": rows * k * args.steps / seconds,
        "s_per_step": seconds / args.steps,
        "peak_gib": peak / 2**30,
        "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "build_s": built,
    }
    if not args.tiny:
        from dmm_ray.memory_plan import Layout, lora_params, plan_layout

        n_lora = k if kind == "lora" else 0
        plan = plan_layout(
            Layout(
                arch="sd15",
                teachers_on_worker=k,
                batch_per_style=rows,
                resolution=args.latent * 8,
                num_styles=k,
                teacher_dtype=args.teacher_dtype,
                gradient_checkpointing=args.gradient_checkpointing,
                optimizer=args.optimizer,
                gpu=cuda,
                offload=kind == "offload",
                lora_teachers=n_lora,
                lora_adapter_bytes=(4 * lora_params("sd15", args.lora_rank),) * n_lora,
            )
        )
        overhead = sum(b for n, b, _ in plan.lines if "CUDA context" in n)
        result["planned_gib"] = (plan.total - overhead) / 2**30  # allocated memory: without context/slack
    del step, opt_s, opt_d, batch, one
    gc.collect()
    return result


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["k"] == 1), results[0])
    lines = ["| k teachers | held as | rows/step | samples/s | vs k=1 | peak memory | planner (no context/slack) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        planned = f"{r['planned_gib']:.1f} GiB" if "planned_gib" in r else "-"
        lines.append(
            f"| {r['k']} | {r.get('teachers', 'full')} | {r['rows_per_step']} ({r['rows_per_style']}/style) | {r['samples_per_s']:.2f} | "
            f"{r['samples_per_s'] / base['samples_per_s']:.2f}x | {r['peak_gib']:.2f} GiB | {planned} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny UNets on CPU (seconds): the test suite's check that this runs")
    # parsed here, so a bad entry (`--ks 1,x`, `--ks 0`) is a usage error before anything is built
    parser.add_argument("--ks", type=int_list, default="1,4,8", help="teachers per worker to measure (full teachers)")
    parser.add_argument("--lora-ks", type=int_list_or_none, default="4,8", help="also: k LoRA teachers as adapters on one shared base ('' to skip)")
    parser.add_argument("--offload-ks", type=int_list_or_none, default="8", help="also: k full teachers offloaded to CPU RAM ('' to skip)")
    parser.add_argument("--lora-rank", type=int, default=64)
    # counts are positive integers: `--steps 0` timed the default 10 steps (0 or 10), `--steps -3` none and
    # printed negative samples/s; `--batch 0` / `--rows-per-style 0` meant 1 row / the --batch split
    parser.add_argument("--batch", type=positive_int, default=8, help="rows per step, split evenly among the k teachers")
    parser.add_argument("--rows-per-style", type=positive_int, default=None, help="instead: rows per teacher (rows per step = k x this)")
    parser.add_argument("--steps", type=positive_int, default=None, help="timed steps per k (default 10; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    parser.add_argument("--teacher-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_fused", "adamw8bit"])
    parser.add_argument("--latent", type=positive_int, default=None, help="latent side (default 64 = 512 px; --tiny 8)")
    parser.add_argument("--device", default=None, help="default: cuda if available (--tiny: cpu)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.latent = args.latent or (8 if args.tiny else 64)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    elif not args.tiny:
        print("warning: no GPU; SD1.5-size UNets on CPU are very slow (use --tiny for a quick check)", flush=True)
    results = []
    runs = [(k, "full") for k in args.ks] + [(k, "lora") for k in args.lora_ks] + [(k, "offload") for k in args.offload_ks]
    for k, kind in runs:
        r = measure(k, args, device, kind)
        print(
            f"k={k} {kind}: {r['samples_per_s']:.2f} samples/s, {r['s_per_step']:.3f} s/step, peak {r['peak_gib']:.2f} GiB "
            f"(built in {r['build_s']:.0f} s)",
            flush=True,
        )
        results.append(r)
    print(table(results))
    if args.json:  # a folder not there yet is made: writing into it failed after every k was measured
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": str(device), "args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

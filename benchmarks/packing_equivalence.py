"""Is packing teachers equivalent to one teacher per worker? (issue 18's closing-note numbers)

  python benchmarks/packing_equivalence.py --out /work/exps18/eq                   # the toy preset's budget (180 steps)
  python benchmarks/packing_equivalence.py --out /tmp/eq --steps 4 --quick          # plumbing check: minutes
  python benchmarks/packing_equivalence.py --lora-memory                           # 4 LoRA teachers: adapters vs fused
  python benchmarks/packing_equivalence.py --lora-memory --lora-arch sd15 --lora-work /tmp/sd15  # the same at SD1.5 size

Equivalence: the toy preset (jobs/configs/toy.yaml, the zoo's 8 teachers) merged three times with
the same seed and the same rows per style per step, as k = 8 teachers on W = 1 worker, k = 4 on
W = 2, k = 1 on W = 8 (each in its own process and output_dir, `--restart`). Reported: the distill
loss curves (per step, MLflow) and how far each is from the k = 8 curve compared with the curve's
own step-to-step noise; FIDt / FIDt_ref of each result and its difference from k = 8 (target
within 5 %); samples/s (all workers) and rank 0's peak RSS; the k = 8 vs k = 1 throughput ratio.
Results go to <out>/equivalence.json and a markdown table on stdout.

LoRA memory: one process loads 4 LoRA teachers of the zoo's base (the zoo's two LoRAs, each twice
under two names) as adapters on one shared base, another as 4 fused copies; reported: the bytes of
the teachers' tensors (unique storages) and the process peak-RSS growth of each (over a process that has loaded the base pipeline once, as a worker has its student), and their ratios
(target <= 0.4), beside the memory planner's prediction for SD1.5 at rank 64. `--lora-arch sd15`
measures that prediction: the same two loads through the same loader, on 4 rank-64 LoRAs (the
planner's COMMON_LORA_TARGETS: attention and feed-forward) of a randomly initialised SD1.5-architecture base (UNet, CLIP ViT-L, VAE; nothing is downloaded;
random weights take the bytes trained ones do), teachers in bf16 as in the planner's row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmm_ray.console import int_list  # noqa: E402

TEACHERS = 8  # the zoo's: k teachers per worker on W = 8 / k workers
SD15_LORA_RANK = 64  # the planner's README row: 4 LoRA teachers of SD1.5 at rank 64
QUICK = ["synthesis.images_per_teacher=32", "evaluation.num_prompts=4", "evaluation.images_per_prompt=2"]


def run_one(k: int, out: Path, steps: int | None, extra: list[str]) -> dict:
    """One layout's merge in this process; returns its numbers."""
    from mlflow.tracking import MlflowClient

    from dmm_ray.config import load_config
    from dmm_ray.merge import run_merge
    from dmm_ray.tracking import make_tracker

    folder = out / f"k{k}"
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    overrides = [
        f"name=dmm-eq-k{k}",
        f"output_dir={folder}",
        f"scaling.teachers_per_worker={k}",
        "distill.log_every=1",
        f"tracking.uri={uri}",
        "tracking.registered_model_name=null",
        f"data.shards={out / 'latents'}",
    ]  # encoded once, read by every layout
    if steps is not None:
        overrides += [f"distill.steps={steps}", f"distill.checkpoint_every={steps}"]
    cfg = load_config(ROOT / "jobs" / "configs" / "toy.yaml", overrides + extra, build_zoo=True)
    started = time.time()
    result = run_merge(cfg, tracker=make_tracker(cfg), restart=True)
    seconds = time.time() - started
    client = MlflowClient(uri)
    curves: dict[str, list[float]] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            for key in ("distill/loss_total", "distill/loss_score", "distill/loss_disc"):
                history = client.get_metric_history(run.info.run_id, key)
                steps = {m.step: m.value for m in history if m.step >= 1}  # step 0: the stage summary, logged at the end
                if steps and key not in curves:
                    curves[key] = [steps[i] for i in sorted(steps)]
    distill = result.stage_metrics.get("distill", {})
    evaluation = result.evaluation.to_dict() if result.evaluation is not None else {}
    return {
        "k": k,
        "workers": cfg.num_workers,
        "steps": cfg.distill.steps,
        "seconds": seconds,
        "distill_seconds": distill.get("seconds"),
        "samples_per_s": distill.get("samples_per_s"),
        "peak_rss_mb_rank0": distill.get("peak_rss_mb"),
        "curves": curves,
        "FIDt": evaluation.get("FIDt"),
        "FIDt_ref": evaluation.get("FIDt_ref"),
        "ratio": evaluation.get("ratio"),
        "diagonal": evaluation.get("diagonal"),
    }


def _noise(curve: list[float], window: int = 5) -> float:
    """Step-to-step noise: std of the curve around its centred moving average."""
    import numpy as np

    c = np.asarray(curve)
    if len(c) < 3:
        return float("nan")
    w = min(window, len(c))
    smooth = np.convolve(c, np.ones(w) / w, mode="same")
    return float(np.std((c - smooth)[w // 2 : len(c) - w // 2] if len(c) > w else c - smooth))


def compare(results: list[dict]) -> dict:
    import numpy as np

    ref = next(r for r in results if r["k"] == max(r["k"] for r in results))
    summary = {"reference_k": ref["k"], "layouts": []}
    key = "distill/loss_total"

    def curve_of(r):
        c = list(r["curves"].get(key, []))
        return np.asarray(c[1:] if len(c) == r["steps"] + 1 else c)  # a run recorded with the stage summary first

    ref_curve = curve_of(ref)
    for r in results:
        curve = curve_of(r)
        n = min(len(curve), len(ref_curve))
        rss = r["peak_rss_mb_rank0"]
        row = {
            "k": r["k"],
            "W": r["workers"],
            "samples_per_s": r["samples_per_s"],
            "peak_rss_mb_rank0": rss,
            "peak_rss_mb_all_workers_est": None if rss is None else rss * r["workers"],  # symmetric layouts: W x rank 0's
            "FIDt": r["FIDt"],
            "ratio": r["ratio"],
            "distill_seconds": r["distill_seconds"],
        }
        if n:
            tail = max(1, n // 5)
            row.update(
                {
                    "loss_mean_last_20pct": float(curve[n - tail : n].mean()),
                    "loss_mean_abs_diff_vs_ref": float(np.abs(curve[:n] - ref_curve[:n]).mean()),
                    "loss_noise": _noise(list(curve[:n])),
                }
            )
        if r["FIDt"] is not None and ref["FIDt"]:
            row["FIDt_rel_diff_vs_ref"] = r["FIDt"] / ref["FIDt"] - 1
        summary["layouts"].append(row)
    by_k = {r["k"]: r for r in results}
    if 1 in by_k and max(by_k) in by_k and by_k[1]["samples_per_s"]:
        summary["throughput_ratio_kmax_vs_k1"] = by_k[max(by_k)]["samples_per_s"] / by_k[1]["samples_per_s"]
    return summary


def table(summary: dict) -> str:
    ref = summary["reference_k"]
    lines = [
        f"| k | W | samples/s | peak RSS: rank 0 (x W) | loss (last 20 %) | mean abs diff vs k={ref} | loss noise | FIDt | ratio | FIDt vs k={ref} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in summary["layouts"]:
        lines.append(
            f"| {r['k']} | {r['W']} | {f(r['samples_per_s'], '.2f')} | {f(r['peak_rss_mb_rank0'], '.0f')} MB ({f(r['peak_rss_mb_all_workers_est'], '.0f')} MB) | "
            f"{f(r.get('loss_mean_last_20pct'), '.4f')} | {f(r.get('loss_mean_abs_diff_vs_ref'), '.4f')} | "
            f"{f(r.get('loss_noise'), '.4f')} | {f(r['FIDt'], '.1f')} | {f(r['ratio'], '.3f')} | "
            f"{f(r.get('FIDt_rel_diff_vs_ref'), '+.1%')} |"
        )
    if "throughput_ratio_kmax_vs_k1" in summary:
        workers = {r["k"]: r["W"] for r in summary["layouts"]}  # each run's own W (--ks 4,1: k = 4 ran on 2, not 1)
        lines.append(f"\nthroughput k={ref} (W={workers[ref]}) / k=1 (W={workers[1]}): {summary['throughput_ratio_kmax_vs_k1']:.2f}x")
    return "\n".join(lines)


# ---- LoRA teachers: adapters on one base vs fused copies ----------------------------------------


def _lora_specs() -> list[dict]:
    from dmm_ray import paths
    from dmm_ray.zoo.manifest import load_zoo_manifest

    loras = [t for t in load_zoo_manifest(paths.zoo_dir("full")).teachers if t.format == "lora"]
    return [t.model_copy(update={"name": f"{t.name}{copy}"}).model_dump() for copy in range(2) for t in loras][:4]


def _sd15_lora_specs(work: Path, rank: int = SD15_LORA_RANK) -> list[dict]:
    """4 rank-`rank` LoRA teachers of one SD1.5-architecture base with random weights (saved in bf16;
    the LoRAs on the planner's `COMMON_LORA_TARGETS`, in diffusers' format), built under `work`
    once and reused."""
    from dmm_ray.memory_plan import COMMON_LORA_TARGETS

    base = work / "base"
    if not (base / "model_index.json").is_file():
        import torch
        from diffusers import StableDiffusionPipeline

        from dmm_ray.random_weights import random_sd15_components
        from dmm_ray.tiny_plugins import make_lora

        print(f"building a random SD1.5-architecture base and 4 rank-{rank} LoRAs in {work} ...", file=sys.stderr, flush=True)
        pipe = StableDiffusionPipeline(**random_sd15_components())
        for j in range(4):
            make_lora(pipe.unet, work / f"lora_{j}", rank=rank, seed=j, scale=0.01, targets=COMMON_LORA_TARGETS)
        pipe.to(torch.bfloat16).save_pretrained(base.with_suffix(".tmp"), safe_serialization=True)
        base.with_suffix(".tmp").rename(base)  # a half-written base is never reused
    return [
        {"name": f"sd15_lora_{j}", "source": str(work / f"lora_{j}" / "pytorch_lora_weights.safetensors"), "format": "lora", "base": str(base)}
        for j in range(4)
    ]


def lora_memory_one(shared: bool, specs: list[dict], dtype: str | None = None) -> dict:
    import torch

    from dmm_ray.distill.conditioning import conditioner_for
    from dmm_ray.distill.teacher_bank import load_teacher_bank
    from dmm_ray.process_memory import peak_rss_bytes
    from dmm_ray.teachers import TeacherSpec

    specs = [TeacherSpec(**spec) for spec in specs]
    import peft  # noqa: F401  (libraries imported before the baseline: only the teachers' memory is counted)
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders import peft as _  # noqa: F401

    torch_dtype = getattr(torch, dtype) if dtype else None
    # The base pipeline, loaded, read and kept before the baseline: the first load of each model class
    # costs memory of its own (lazy imports, first allocations: about 30 MB, 8x the toy UNet), which a
    # training worker has paid for its student before any teacher, so it is not the teachers' memory.
    warm = StableDiffusionPipeline.from_pretrained(specs[0].base, safety_checker=None, torch_dtype=torch_dtype)
    for m in (warm.unet, warm.text_encoder, warm.vae):
        for t in m.parameters():
            t.detach().sum()
    before = peak_rss_bytes() // 1024
    bank = load_teacher_bank(specs, "cpu", lambda parts: conditioner_for(parts, 4), dtype=torch_dtype, share_lora_base=shared)
    seen, tensor_bytes = set(), 0
    for j in range(len(bank)):
        modules = [bank.activate(j), bank.conditioner(j).text_encoder]
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    tensor_bytes += t.untyped_storage().nbytes()
                    t.detach().sum()  # read every page: weights loaded from safetensors are mapped lazily, a training worker reads them all
    after = peak_rss_bytes() // 1024
    del warm
    return {"shared": shared, "describe": bank.describe(), "tensor_bytes": tensor_bytes, "rss_growth_kib": after - before}


def lora_memory(arch: str = "toy", work: Path | None = None) -> dict:
    """arch "toy": the zoo's LoRA teachers in fp32; "sd15": 4 rank-64 LoRAs of a random SD1.5-size base
    (built in `work`), loaded in bf16 as the planner's layout assumes. Each side in its own process."""
    specs = _lora_specs() if arch == "toy" else _sd15_lora_specs(work)
    dtype = ["--lora-dtype", "bfloat16"] if arch == "sd15" else []
    runs = {}
    for shared in (True, False):
        proc = subprocess.run(
            [sys.executable, __file__, "--lora-memory-one", "shared" if shared else "fused", "--lora-specs", json.dumps(specs), *dtype],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode:
            raise RuntimeError(f"the {'adapters' if shared else 'fused'} run failed:\n{proc.stderr[-3000:]}")
        runs["adapters" if shared else "fused"] = json.loads(proc.stdout.strip().splitlines()[-1])
    from dmm_ray.memory_plan import GiB, Layout, lora_params, plan_layout

    adapter = 4 * lora_params("sd15", SD15_LORA_RANK)

    def teacher_bytes(plan):
        return sum(b for n, b, _ in plan.lines if ("teacher" in n or "LoRA" in n) and "forward" not in n)

    fused = plan_layout(Layout(arch="sd15", teachers_on_worker=4, teacher_dtype="bfloat16"))
    shared = plan_layout(Layout(arch="sd15", teachers_on_worker=4, lora_teachers=4, lora_adapter_bytes=(adapter,) * 4, teacher_dtype="bfloat16"))
    return {
        "arch": arch,
        **runs,
        "tensor_ratio": runs["adapters"]["tensor_bytes"] / runs["fused"]["tensor_bytes"],
        "rss_growth_ratio": runs["adapters"]["rss_growth_kib"] / max(1, runs["fused"]["rss_growth_kib"]),
        "planner_sd15_rank64": {
            "teachers_adapters_gib": teacher_bytes(shared) / GiB,
            "teachers_fused_gib": teacher_bytes(fused) / GiB,
            "teacher_ratio": teacher_bytes(shared) / teacher_bytes(fused),
            "worker_total_ratio": shared.total / fused.total,
            "worker_adapters_gib": shared.total / GiB,
            "worker_fused_gib": fused.total / GiB,
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for the three merges and equivalence.json")
    parser.add_argument("--ks", type=int_list, default="8,4,1", help="teachers per worker to compare (W = 8 / k)")
    parser.add_argument("--steps", type=int, default=None, help="distill steps (default: the toy preset's 180)")
    parser.add_argument("--quick", action="store_true", help="small synthesis and evaluation sets (a plumbing check)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides for every layout")
    parser.add_argument("--lora-memory", action="store_true", help="only the LoRA memory comparison")
    parser.add_argument("--compare-only", action="store_true", help="only compare the k<K>.json results already in --out")
    parser.add_argument(
        "--lora-arch",
        choices=["toy", "sd15"],
        default="toy",
        help="--lora-memory on the zoo's LoRAs (toy) or on 4 rank-64 LoRAs of a random SD1.5-size base in bf16 (sd15: 2.4 GB on disk, about 9 GB of RAM)",
    )
    parser.add_argument("--lora-work", default=None, help="folder for the sd15 base and LoRAs (default: <--out>/sd15_loras); reused when there")
    parser.add_argument("--lora-memory-one", choices=["shared", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--lora-specs", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--lora-dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lora_memory_one:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(lora_memory_one(args.lora_memory_one == "shared", json.loads(args.lora_specs), args.lora_dtype)))
        return 0
    if args.lora_memory:
        work = None
        if args.lora_arch == "sd15":
            if not (args.lora_work or args.out):
                parser.error("--lora-arch sd15 needs --lora-work DIR (or --out DIR) for its base and LoRAs")
            work = Path(args.lora_work or Path(args.out) / "sd15_loras").resolve()
        result = lora_memory(args.lora_arch, work)
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "lora_memory.json").write_text(json.dumps(result, indent=2))
        return 0
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out).resolve()
    extra = (QUICK if args.quick else []) + args.overrides
    if args.one is not None:
        result = run_one(args.one, out, args.steps, extra)
        (out / f"k{args.one}.json").write_text(json.dumps(result, indent=2))
        return 0
    uneven = [k for k in args.ks if TEACHERS % k]
    if uneven and not args.compare_only:  # refused before the first merge, not after the ones listed before it ran
        parser.error(f"--ks: {', '.join(map(str, uneven))} does not divide the zoo's {TEACHERS} teachers into equal groups (use 8, 4, 2 or 1)")
    results = []
    for k in args.ks:
        if args.compare_only:
            results.append(json.loads((out / f"k{k}.json").read_text()))
            continue
        cmd = [sys.executable, __file__, "--out", str(out), "--one", str(k)] + (["--steps", str(args.steps)] if args.steps else [])
        cmd += (["--quick"] if args.quick else []) + [x for o in args.overrides for x in ("--set", o)]
        print(f"== k = {k} (W = {TEACHERS // k}): {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results.append(json.loads((out / f"k{k}.json").read_text()))
    summary = compare(results)
    (out / "equivalence.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Serving N styles: one merged DMM model (shared batches) vs one teacher per style (multiplexing).

Same machine, same request stream (a uniformly random style per request, fixed seed),
same concurrency (16), same replica count, one deployment at a time:
  (a) merged   - this project's app: style router -> StyleModel with @serve.batch; a batch
                 mixes styles because the style is a per-sample embedding;
  (a1) merged, unbatched (max_batch_size=1) - separates the batching gain from the switch cost;
  (b) multiplexed teachers - the usual alternative: one checkpoint per style loaded on demand
                 with @serve.multiplexed, at most --max-models per replica (the same memory
                 budget as one merged model, up to 2x), one forward at a time per replica.
Reports throughput, p50/p99 latency, the cost of a style switch (embedding change vs checkpoint
load) and memory per replica, and the ratios merged / multiplexed.

    python benchmarks/serve_styles.py                          # 8 tiny styles built in code
    python benchmarks/serve_styles.py --zoo $DMM_HOME/zoo/full --merged $DMM_HOME/outputs/dmm-toy/merged
    python benchmarks/serve_styles.py --requests 320 --steps 4 --out outputs/bench/serve_styles.json
    python benchmarks/serve_styles.py --lora-fractions 0,0.25,0.5   # the cost of per-request LoRA adapters

With --lora-fractions, only the merged deployment runs, with one preloaded LoRA adapter (a tiny random
one built in code for the model), once per fraction f: a share f of the requests carries
`"lora": {"subject": 1.0}`. Requests with different adapter sets never share a forward, so a shared
batch splits into (up to) two forwards; the report gives throughput and latency per fraction and the
throughput relative to f = 0.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmm_ray.console import positive_int, refuse_models_being_replaced  # noqa: E402
from serve.loadgen import Call, dumps, latency_summary, run_calls, style_stream  # noqa: E402

MUX_HEADER = "serve_multiplexed_model_id"  # Ray Serve routes HTTP requests by this header


# ---- models -----------------------------------------------------------------------------------


def build_tiny_world(root: Path, num_styles: int) -> tuple[Path, dict[str, dict]]:
    """A merged tiny model with `num_styles` styles and one tiny teacher folder per style (same architecture)."""
    from diffusers import StableDiffusionPipeline

    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.pipeline import DMMPipeline
    from dmm_ray.tiny import tiny_sd_components

    names = [f"style{i}" for i in range(num_styles)]
    teachers = {}
    for i, name in enumerate(names):
        folder = root / "teachers" / name
        if not (folder / "model_index.json").is_file():
            StableDiffusionPipeline(**tiny_sd_components(seed=100 + i)).save_pretrained(str(folder))
        teachers[name] = {"name": name, "source": str(folder), "format": "diffusers"}
    merged = root / "merged"
    if not (merged / "model_index.json").is_file():
        c = tiny_sd_components(seed=0)
        student = StyleUNet.from_unet(c["unet"], names)
        DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(str(merged))
    return merged, teachers


def zoo_teachers(zoo: Path) -> dict[str, dict]:
    """The zoo's teachers by name, read as every job reads zoo.yaml (its paths expand `~` and `$DMM_HOME`;
    a file teacher without its own base takes the zoo's): joined to the zoo folder here, they did not."""
    from dmm_ray.zoo.manifest import load_zoo_manifest

    return {s.name: s.model_dump() for s in load_zoo_manifest(zoo).teachers}


# ---- the multiplexed alternative ------------------------------------------------------------


def make_teacher_mux(max_models: int):
    """Deployment serving one teacher checkpoint per style; models are loaded on demand (LRU)."""
    from fastapi import Request
    from fastapi.responses import Response
    from ray import serve

    @serve.deployment(name="TeacherMux", max_ongoing_requests=32)
    class TeacherMux:
        def __init__(self, teachers: dict[str, dict], device: str = "cpu"):
            self.teachers = teachers
            self.device = device
            self.load_s: list[float] = []
            self.forward_s: list[float] = []
            self.model_bytes: dict[str, int] = {}  # no references kept: the multiplex LRU owns the models
            self._gpu = asyncio.Lock()  # one forward at a time per replica, like one accelerator

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            import torch
            from diffusers import DPMSolverMultistepScheduler

            from dmm_ray.teachers import TeacherSpec, load_teacher_pipeline

            if model_id not in self.teachers:
                raise KeyError(f"unknown style {model_id!r}; known: {sorted(self.teachers)}")
            t0 = time.perf_counter()
            pipe = await asyncio.to_thread(load_teacher_pipeline, TeacherSpec(**self.teachers[model_id]), torch.float32)
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self.load_s.append(time.perf_counter() - t0)
            from serve.model import pipeline_param_bytes

            self.model_bytes[model_id] = pipeline_param_bytes(pipe)
            return pipe

        async def __call__(self, request: Request):
            import numpy as np
            import torch
            from PIL import Image

            from dmm_ray.defaults import PAPER_NEGATIVE_PROMPT

            body = await request.json()
            pipe = await self.get_model(serve.get_multiplexed_model_id())
            async with self._gpu:
                t0 = time.perf_counter()
                out = await asyncio.to_thread(
                    pipe,
                    prompt=body["prompt"],
                    negative_prompt=PAPER_NEGATIVE_PROMPT,
                    num_inference_steps=body["steps"],
                    guidance_scale=7.0,
                    width=body["width"],
                    height=body["height"],
                    generator=torch.Generator("cpu").manual_seed(body["seed"]),
                    output_type="np",
                )
                self.forward_s.append(time.perf_counter() - t0)
            buf = io.BytesIO()
            Image.fromarray((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
            return Response(buf.getvalue(), media_type="image/png")

        def stats(self) -> dict:
            from serve.deployments import rss_bytes

            # Weights resident once the LRU is full: the max_models largest checkpoints.
            held = sorted(self.model_bytes.values(), reverse=True)[:max_models]
            return {"load_s": self.load_s, "forward_s": self.forward_s, "rss_bytes": rss_bytes(), "param_bytes": sum(held)}

    return TeacherMux


# ---- measurement ----------------------------------------------------------------------------


def replica_stats(app: str, deployment: str, method: str, replicas: int) -> list[dict]:
    """Ask each replica (the handle spreads calls; collect distinct pids/objects)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    return [getattr(handle, method).remote().result() for _ in range(max(1, replicas))]


def embedding_switch_cost(merged: Path, style_names: list[str], repeats: int = 50) -> float:
    """In process: what a style switch costs the merged model - a new codebook mixture + MLP, (1, d)."""
    import torch

    from serve.model import StyleModelBackend

    backend = StyleModelBackend(str(merged), device="cpu")
    unet = backend.pipe.unet
    n = len(style_names)
    switch = []
    with torch.no_grad():
        for r in range(repeats):
            w = torch.zeros(1, n)
            w[0, r % n] = 1.0
            t0 = time.perf_counter()
            unet.class_embedding(unet.style_embeds_for(style_weights=w))  # (1, d): all a switch changes
            switch.append(time.perf_counter() - t0)
    return statistics.median(switch)


def run_stream(url: str, calls: list[Call], concurrency: int) -> dict:
    results = asyncio.run(run_calls(url, calls, concurrency))
    failed = [r for r in results if r.status != 200]
    summary = latency_summary(results)
    summary["failed"] = len(failed)
    if failed:
        summary["failed_sample"] = [(r.status, r.error[:200]) for r in failed[:3]]
    return summary


def lora_forward_cost(merged: Path, lora: Path, steps: int, size: int, repeats: int = 20) -> dict:
    """In process, one image per forward: seconds per image with no adapter loaded, adapter loaded but
    off, adapter on, and alternating on/off every image (each alternation is a set_adapters switch)."""
    from serve.model import StyleModelBackend
    from serve.schemas import Sample

    cpu: dict[str, float] = {}

    def per_image(backend, seq, key: str) -> float:
        """Wall seconds per image; CPU seconds per image (all threads of this process) go to cpu[key],
        which a busy shared machine disturbs far less than wall time."""
        for _ in range(3):  # warm-up
            backend.generate([sample(seq[0])])
        t0, c0 = time.perf_counter(), time.process_time()
        for lo in seq:
            backend.generate([sample(lo)])
        cpu[key] = (time.process_time() - c0) / len(seq)
        return (time.perf_counter() - t0) / len(seq)

    names = None

    def sample(lo):
        return Sample("a red circle", None, tuple(1.0 if i == 0 else 0.0 for i in range(len(names))), steps, 7.0, size, size, 1, lora=lo)

    on = (("subject", 1.0),)
    bare = StyleModelBackend(str(merged), device="cpu")
    names = bare.style_names
    out = {"no_adapter_loaded_s": per_image(bare, [()] * repeats, "no_adapter_loaded_cpu_s")}
    del bare
    backend = StyleModelBackend(str(merged), device="cpu", lora_adapters={"subject": str(lora)})
    out["adapter_off_s"] = per_image(backend, [()] * repeats, "adapter_off_cpu_s")
    out["adapter_on_s"] = per_image(backend, [on] * repeats, "adapter_on_cpu_s")
    switches = backend.lora_switches
    out["alternating_s"] = per_image(backend, [(), on] * (repeats // 2), "alternating_cpu_s")
    out["alternating_switches"] = backend.lora_switches - switches
    t0 = time.perf_counter()
    for _ in range(repeats):
        backend._set_lora(on)
        backend._set_lora(())
    out["switch_s"] = (time.perf_counter() - t0) / (2 * repeats)
    out.update(cpu)
    return out


def lora_cost(args, merged: Path) -> dict:
    """Throughput of the merged deployment when a share of requests names a preloaded LoRA adapter."""
    import random

    import httpx
    from ray import serve
    from serve_helpers import free_port

    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.tiny_plugins import make_lora
    from serve.app import build_app

    # the adapter went to a mkdtemp folder that stayed in /tmp after every run: removed at the end, on failure too
    with tempfile.TemporaryDirectory(prefix="dmm-bench-lora-") as folder:
        lora = make_lora(StyleUNet.from_pretrained(Path(merged) / "unet"), Path(folder), seed=1)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        out: dict = {"adapter": str(lora)}
        fractions = args.lora_fractions
        for rep, frac in [(r, f) for r in range(args.lora_repeats) for f in fractions]:  # interleaved: load drifts hit all
            name = f"lora{int(round(frac * 100))}r{rep}"
            serve.run(
                build_app(
                    {
                        "model": str(merged),
                        "num_replicas": args.replicas,
                        "max_batch_size": args.max_batch_size,
                        "batch_wait_timeout_s": 0.01,
                        "limits": {"max_width": max(768, args.size)},
                        "lora_adapters": {"subject": str(lora)},
                    }
                ),
                name=name,
                route_prefix=f"/{name}",
            )
            style_names = [s["name"] for s in httpx.get(f"{base}/{name}/styles").json()["styles"]]
            calls = style_stream(style_names, args.requests, seed=0, steps=args.steps, size=args.size)
            rng = random.Random(1)
            for c in calls:
                c.path = f"/{name}/generate"
                if rng.random() < frac:
                    c.body = {**c.body, "lora": {"subject": 1.0}}
            asyncio.run(run_calls(base, calls[:4], 4))  # warm-up, not counted
            key = f"{frac}#{rep}"
            out[key] = run_stream(base, calls, args.concurrency)
            stats = replica_stats(name, "StyleModel", "info", args.replicas)[0]
            out[key].update(
                batch_sizes=stats["batch_sizes"],
                lora_split_batches=stats["lora_split_batches"],
                lora_requests=sum(1 for c in calls if "lora" in c.body),
            )
            print(f"lora fraction {frac} (run {rep}): {dumps(out[key])}", flush=True)
            serve.delete(name)
        out["in_process"] = lora_forward_cost(merged, lora, args.steps, args.size)
        print(f"lora in process: {dumps(out['in_process'])}", flush=True)
    out["throughput_rps_median"] = {str(f): statistics.median(out[f"{f}#{r}"]["throughput_rps"] for r in range(args.lora_repeats)) for f in fractions}
    ref = out["throughput_rps_median"].get("0.0")
    if ref:
        out["throughput_relative_to_no_lora"] = {k: v / ref for k, v in out["throughput_rps_median"].items()}
    return out


def fraction_list(text: str) -> list[float]:
    """argparse `type=` for --lora-fractions (`0,0.5,1`): shares of requests, each in [0, 1]. Parsed with the
    other options, so a bad entry is a usage error before Ray starts, not a ValueError traceback after."""
    from dmm_ray.console import fraction

    try:
        values = [fraction(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares of requests between 0 and 1, e.g. 0,0.5,1; got {text!r}")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, help="toy zoo folder with zoo.yaml (teachers); default: tiny models built in code")
    p.add_argument("--merged", type=Path, help="merged model folder (with --zoo; default: the demo's, $DMM_HOME/outputs/dmm-toy/merged)")
    p.add_argument("--num-styles", type=positive_int, default=8, help="styles when building the tiny world")
    p.add_argument("--requests", type=positive_int, default=160)
    p.add_argument("--concurrency", type=positive_int, default=16)
    p.add_argument("--replicas", type=positive_int, default=1, help="replicas of each deployment")
    p.add_argument("--max-models", type=positive_int, default=2, help="teachers held per multiplexed replica")
    p.add_argument("--max-batch-size", type=positive_int, default=16)
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--size", type=positive_int, default=32)
    p.add_argument("--num-cpus", type=positive_int, default=4, help="CPUs of the local Ray instance")
    p.add_argument("--skip-unbatched", action="store_true")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument(
        "--lora-fractions",
        type=fraction_list,
        help="comma-separated shares of requests that name a preloaded LoRA adapter (e.g. 0,0.5): measure only the merged deployment at each",
    )
    p.add_argument(
        "--lora-repeats",
        type=positive_int,
        default=1,
        help="with --lora-fractions: run the fractions this many times, interleaved, and report medians",
    )
    args = p.parse_args(argv)
    if args.merged and not args.zoo:  # it was ignored: the tiny world built in code was measured instead
        p.error("--merged needs --zoo (the teachers it was merged from, for the multiplexed deployment); without both, tiny models are built in code")
    if args.zoo:
        from dmm_ray.paths import outputs_dir

        args.merged = args.merged or outputs_dir("dmm-toy") / "merged"
        if not (args.merged / "model_index.json").is_file():
            p.error(f"--merged {args.merged} is not a merged model folder (no model_index.json); run `make demo` or give --merged")
        refuse_models_being_replaced(p, args, "merged")  # refused while a running job's save may replace it

    import httpx
    import ray
    from ray import serve

    from serve.app import build_app

    sys.path.insert(0, str(REPO / "tests"))
    from serve_helpers import free_port

    if args.zoo:
        teachers, merged = zoo_teachers(args.zoo), args.merged
    else:
        root = Path(tempfile.gettempdir()) / f"dmm-bench-tiny-{args.num_styles}"
        merged, teachers = build_tiny_world(root, args.num_styles)

    ray.init(
        address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
    )  # a private cluster, never one left by `ray start`
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "merged": str(merged), "teachers": sorted(teachers)}
    if args.lora_fractions:
        try:
            report["lora"] = lora_cost(args, merged)
        finally:
            serve.shutdown()
            ray.shutdown()
        print(dumps(report))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(dumps(report))
        return 0
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"

        variants = [("merged", args.max_batch_size)] + ([] if args.skip_unbatched else [("merged_unbatched", 1)])
        style_names = None
        for name, batch in variants:
            serve.run(
                build_app(
                    {
                        "model": str(merged),
                        "num_replicas": args.replicas,
                        "max_batch_size": batch,
                        "batch_wait_timeout_s": 0.01,
                        "limits": {"max_width": max(768, args.size)},
                    }
                ),
                name=name,
                route_prefix=f"/{name}",
            )
            style_names = [s["name"] for s in httpx.get(f"{base}/{name}/styles").json()["styles"]]
            missing = set(style_names) ^ set(teachers)
            if missing:
                raise SystemExit(f"merged styles and teachers differ: {sorted(missing)}")
            calls = style_stream(style_names, args.requests, seed=0, steps=args.steps, size=args.size)
            for c in calls:
                c.path = f"/{name}/generate"
            asyncio.run(run_calls(base, calls[:4], 4))  # warm-up, not counted
            report[name] = run_stream(base, calls, args.concurrency)
            stats = replica_stats(name, "StyleModel", "info", args.replicas)
            report[name]["rss_bytes"] = max(s["rss_bytes"] for s in stats)
            report[name]["param_bytes"] = max(s["param_bytes"] for s in stats)
            report[name]["batch_sizes"] = stats[0]["batch_sizes"]
            report[name]["mixed_style_batches"] = stats[0]["mixed_style_batches"]
            one = stats[0]["forward_s"].get("1") or stats[0]["forward_s"].get(1) or []
            report[name]["forward_s_median_batch1"] = statistics.median(one) if one else float("nan")
            serve.delete(name)

        mux = make_teacher_mux(args.max_models)
        serve.run(mux.options(num_replicas=args.replicas).bind(teachers), name="mux", route_prefix="/mux")
        calls = style_stream(style_names, args.requests, seed=0, steps=args.steps, size=args.size)
        for c in calls:
            c.path, c.headers = "/mux", {MUX_HEADER: c.style}
        asyncio.run(run_calls(base, calls[:4], 4))
        report["multiplexed"] = run_stream(base, calls, args.concurrency)
        stats = replica_stats("mux", "TeacherMux", "stats", args.replicas)
        loads = [x for s in stats[:1] for x in s["load_s"]]
        fwds = [x for s in stats[:1] for x in s["forward_s"]]
        report["multiplexed"].update(
            rss_bytes=max(s["rss_bytes"] for s in stats),
            param_bytes=max(s["param_bytes"] for s in stats),
            checkpoint_loads=sum(len(s["load_s"]) for s in stats[:1]),
            load_s_median=statistics.median(loads) if loads else float("nan"),
            forward_s_median=statistics.median(fwds) if fwds else float("nan"),
        )
        serve.delete("mux")
    finally:
        serve.shutdown()
        ray.shutdown()

    a, b = report["merged"], report["multiplexed"]
    # Forward time of one image in a merged replica: from the unbatched run when there is one.
    fwd = report.get("merged_unbatched", a)["forward_s_median_batch1"]
    sw = report["merged_switch"] = {"switch_s": embedding_switch_cost(merged, style_names), "forward_s": fwd}
    report["ratios_merged_over_multiplexed"] = {
        "throughput": a["throughput_rps"] / b["throughput_rps"],
        "p50_latency": a["p50_s"] / b["p50_s"],
        "p99_latency": a["p99_s"] / b["p99_s"],
        "style_switch_cost": sw["switch_s"] / b["load_s_median"],
        "rss_per_replica": a["rss_bytes"] / b["rss_bytes"],
        "weights_per_replica": a["param_bytes"] / b["param_bytes"],
    }
    report["switch_cost_over_forward"] = {
        "merged_embedding_change": sw["switch_s"] / sw["forward_s"],
        "multiplexed_checkpoint_load": b["load_s_median"] / b["forward_s_median"],
    }
    print(dumps(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

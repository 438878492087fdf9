#!/usr/bin/env python
"""Bake one style (or a mixture of styles) of a merged model into a stock SD1.5 / SDXL checkpoint.

  python jobs/export.py --model $DMM_HOME/outputs/dmm-toy/merged --style noir --out noir.safetensors
  python jobs/export.py --model models:/dmm-toy/3 --weights noir=0.5,neon=0.5 --out noir-neon --format diffusers
  python jobs/export.py --model outputs/sdxl/merged --style anime --out anime.safetensors --dtype fp16

The style is folded exactly into the UNet (`time_embedding.linear_2.bias`, and each ResNet norm2's
affine when the model uses style FiLM): the result is a plain UNet2DConditionModel whose output equals
the merged model's with that style to float rounding. Load it anywhere:

  StableDiffusionPipeline.from_single_file("noir.safetensors", config="noir.config")     # SDXL: StableDiffusionXLPipeline
  StableDiffusionPipeline.from_pretrained("noir-neon")                                   # --format diffusers
  ComfyUI / A1111: copy noir.safetensors into models/checkpoints (models/Stable-diffusion)

Every export carries its provenance in the safetensors metadata (merged model, style or weights,
teachers with checksums, the model's sampler, dmm-ray version; `dmm_ray.export.read_metadata(path)`), and is logged as an
artifact (`exports/`) of the MLflow run of the merge it came from: the run recorded in the merged
folder's dmm_merge.json, the run of a `models:/name/version`, or --run-id.

Exit status: 0 written (and logged), 1 --verify found a difference (the export is not moved into place: an
earlier export at --out stays as it was), 2 bad input (a --model that does
not exist or is not a merged model, a merge's <output_dir>/merged while that merge runs (a few-step model's folder while
its few-step job runs), an unknown style, bad weights, an --out or config folder that is
not an earlier export's, or a URI (local paths only), --config-dir with a diffusers export or one to an --out named .safetensors/.ckpt, a tracking store MLflow cannot open or a run it does not hold; all checked
before anything is loaded, nothing written), 3 written but MLflow logging failed, 130 interrupted
(nothing half-written left).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from dmm_ray.console import add_verbose_argument, cli_main, expand_path_args, refuse_empty, refuse_uris, set_verbosity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="the merged model: a DMMPipeline / DMMXLPipeline folder (jobs/merge.py's <output_dir>/merged), that folder on "
        "object storage (s3://, gs://, file://, as Serve reads it) or an MLflow model URI models:/<name>/<version> "
        "(a URI is downloaded into a temporary folder, removed when the job ends)",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--style", help="one style, by name (or index) as the merged model lists them")
    which.add_argument(
        "--weights",
        help="a mixture: name=weight pairs separated by commas, e.g. noir=0.5,neon=0.5 (weights >= 0, normalised to sum 1; unnamed styles get 0)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="where to write: a .safetensors file (--format single_file) or a folder (--format diffusers); an existing one is replaced only if it is an earlier dmm-ray export",
    )
    p.add_argument(
        "--format",
        choices=["diffusers", "single_file"],
        default=None,
        help="single_file: one original-layout (LDM / SDXL) .safetensors with UNet, VAE and text encoder(s), "
        "as ComfyUI, A1111 and from_single_file read it; diffusers: a StableDiffusion(XL)Pipeline folder. "
        "Default: single_file when --out ends in .safetensors, else diffusers",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="precision of the written weights (the fold itself is always computed in float32); default fp32",
    )
    p.add_argument(
        "--config-dir",
        default=None,
        help="single_file only (an error with a diffusers export, which carries its own configs): where to write the pipeline's configs (no weights), the `config=` that "
        "from_single_file needs for a model that is not a stock SD1.5/SDXL shape; "
        "default: --out with the suffix .config; 'none' to skip. Written only where nothing is, or over an earlier "
        "export's config folder (it holds dmm_export_config.json): never into a folder of yours",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="after writing, reload the export and check it against the merged model: the UNet's output with "
        "this style on random inputs, the VAE's and text encoders' weights (relative error <= 1e-5 in float32, "
        "1e-2 for fp16/bf16), the scheduler's config and the tokenizers (the same); exits 1 otherwise",
    )
    p.add_argument("--device", default="cpu", help="device to bake on (cpu or cuda); default cpu")
    p.add_argument(
        "--run-id",
        default=None,
        help="MLflow run to log the export to; default: the merge run recorded in the model's dmm_merge.json (or the run of a models:/ URI); "
        "checked before anything is written (unless --no-track). Another run is recorded as dmm.export_run_id, "
        "the model's own as dmm.merge_run_id",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store; default: the one recorded with the merge, else sqlite:///$DMM_HOME/mlflow.db; checked before anything is written (unless --no-track)",
    )
    p.add_argument("--no-track", action="store_true", help="do not log the export to MLflow")
    add_verbose_argument(p)
    return p


@cli_main(
    interrupted="nothing half-written was left (a partial export, its staged config folder and any models:/ download "
    "are removed; an export already in place stays, its MLflow logging possibly incomplete): run the same command again to redo it"
)
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "model", "style", "weights", "out", "config_dir", "run_id", "tracking_uri")
    expand_path_args(args, "model", "out", "config_dir")
    refuse_uris(parser, args, out="path", config_dir="folder")
    args.format = args.format or ("single_file" if Path(args.out).suffix.lower() == ".safetensors" else "diffusers")
    if args.format == "diffusers" and (args.config_dir or "none").lower() != "none":
        parser.error(
            "--config-dir applies to --format single_file only (a diffusers folder carries its own configs); "
            "drop it or use --format single_file with an --out ending in .safetensors"
        )
    if args.format == "diffusers" and Path(args.out).suffix.lower() in (".safetensors", ".ckpt"):
        parser.error(
            f"--out {args.out} names a checkpoint file, but a diffusers export (--format diffusers, the default unless "
            "--out ends in .safetensors) is a folder; give a folder path, or --format single_file with an --out ending in .safetensors"
        )
    set_verbosity(args.verbose)
    with contextlib.ExitStack() as stack:  # holds a downloaded models:/ copy until the export is done
        return _export(args, stack)


def _export(args, stack: contextlib.ExitStack) -> int:
    from dmm_ray.export import (
        ExportError,
        VerifyFailed,
        bake,
        check_device,
        check_replaceable,
        check_selection,
        export_config_dir,
        export_pipeline,
        move_into_place,
        provenance,
        staged_config_folder,
        verify,
        verify_staging,
        write_config_folder,
    )
    from dmm_ray.export_tracking import export_target, log_export, resolve_model
    from dmm_ray.models.style_unet import StyleError, merged_style_names
    from dmm_ray.output_lock import check_not_being_replaced
    from dmm_ray.paths import check_writable_folder
    from dmm_ray.pipeline import load_dmm_pipeline
    from dmm_ray.styles import parse_weights
    from dmm_ray.tracking import TrackingError, check_tracking_store, is_mlflow_uri

    # 1. check inputs, before loading anything: where the export and its configs go and what they
    # would replace, the style selection, the device, the MLflow store
    out, fmt = Path(args.out).expanduser(), args.format
    if fmt == "single_file" and out.suffix.lower() != ".safetensors":
        print(f"error: --format single_file writes a .safetensors file; --out {out} has no .safetensors suffix", file=sys.stderr)
        return 2
    check_writable_folder(out.parent, "--out's folder")
    check_replaceable(out, fmt)
    config_dir = export_config_dir(out, fmt, args.config_dir)
    weights = parse_weights(args.weights) if args.weights is not None else None
    check_device(args.device)
    if args.tracking_uri and not args.no_track:
        check_tracking_store(args.tracking_uri, "--tracking-uri")

    # 2. resolve the model (a models:/ URI: downloaded for the length of `stack`), its styles, and the
    # run the export is logged to (checked now, unless --no-track). A local merge's <output_dir>/merged (or a
    # few-step <folder>/model) that a running job may be replacing is refused first: read half-way, the export
    # would bake half of one model and half of the other
    check_not_being_replaced(args.model)
    try:
        folder, model_run_id, model_uri = stack.enter_context(resolve_model(args.model, args.tracking_uri))
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        names = merged_style_names(folder)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}; give jobs/merge.py's <output_dir>/merged", file=sys.stderr)
        return 2
    check_selection(names, args.style, weights)
    target = export_target(args.model, folder, model_run_id, model_uri, run_id=args.run_id, tracking_uri=args.tracking_uri)
    unanswered = None if args.no_track else target.check()
    if unanswered:
        print(f"warning: {unanswered}", file=sys.stderr)
    if args.run_id and model_run_id and args.run_id != model_run_id and not args.no_track:
        # --run-id names where the export is logged, any run; the model's own run stays its merge run in the metadata
        made_by = f"the run that registered {args.model}" if is_mlflow_uri(args.model) else f"recorded in {folder / 'dmm_merge.json'}"
        print(
            f"note: --run-id {args.run_id} is not the merge run {model_run_id} ({made_by}): the export is logged to "
            f"{args.run_id} (dmm.export_run_id) and its metadata keeps {model_run_id} as dmm.merge_run_id"
        )

    # 3. load and bake
    t0 = time.perf_counter()
    pipe = load_dmm_pipeline(folder).to(args.device)
    load_s = time.perf_counter() - t0
    try:
        style = args.style
        if style is not None and style not in pipe.styles and style.isdigit():
            style = int(style)
        t1 = time.perf_counter()
        plain = bake(pipe, style=style, style_weights=weights)
        bake_s = time.perf_counter() - t1
        metadata = provenance(
            pipe,
            args.model,
            style=style,
            style_weights=weights,
            model_dir=folder,
            run_id=model_run_id,  # the merge's run (dmm_merge.json, or the registry's), never --run-id's
            export_run_id=None if args.no_track else target.run_id,
        )
    except (StyleError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # 4. write, 5. verify: the configs are staged beside their folder and moved into place only after the
    # export is written (and, with --verify, found equal to the merged model), so a failed (or interrupted)
    # export leaves the folder as it was. With --verify the export is written into a hidden staging folder
    # beside --out and moved into place only once it passed: verified after the move, an export that
    # failed (exit 1) had already replaced the earlier good one at --out.
    t2 = time.perf_counter()
    plain = plain.to("cpu")
    staging = stack.enter_context(verify_staging(out)) if args.verify else None  # removed when the job ends
    written = out if staging is None else staging / out.name
    errors: dict[str, float] = {}
    try:
        with staged_config_folder(plain, config_dir, export=out.name) if config_dir is not None else contextlib.nullcontext() as configs:
            export_pipeline(plain, written, fmt=fmt, dtype=args.dtype, metadata=metadata)
            write_s = time.perf_counter() - t2
            if args.verify:
                if args.dtype != "fp32":
                    print("note: --verify compares in float32; an fp16/bf16 export differs by its rounding")
                with tempfile.TemporaryDirectory(prefix="dmm-verify-") as tmp:
                    if fmt == "single_file" and configs is None:  # --config-dir none: configs only to load the file back here
                        configs = write_config_folder(plain, Path(tmp) / "config")
                    errors = verify(written, fmt, configs, load_dmm_pipeline(folder), style, weights)
                tolerance = 1e-5 if args.dtype == "fp32" else 1e-2
                bad = [name for name, err in errors.items() if not err <= tolerance]
                parts = ", ".join(f"{name} {err:.2e}" if math.isfinite(err) else f"{name} DIFFERS" for name, err in errors.items())
                print(f"verify: max relative difference to the merged model: {parts} ({'ok' if not bad else 'TOO LARGE: ' + ', '.join(bad)})")
                if bad:
                    raise VerifyFailed(bad)  # leaves the config folder (and --out) as they were
                move_into_place(written, out)
    except VerifyFailed:
        kept = f"the earlier export at {out} is kept" if out.exists() else f"nothing written at {out}"
        print(f"error: --verify failed, so the export was not moved into place ({kept})", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    what = f"style {metadata['dmm.style']!r}" if "dmm.style" in metadata else f"mixture {metadata['dmm.style_weights']}"
    print(
        f"exported {what} of {args.model} -> {out} ({fmt}, {args.dtype}, {size / 2**20:.1f} MiB); "
        f"load {load_s:.1f} s, bake {bake_s:.2f} s, write {write_s:.1f} s"
    )
    if config_dir is not None:
        loader = "StableDiffusionXLPipeline" if metadata["dmm.architecture"] == "sdxl" else "StableDiffusionPipeline"
        extra = ""
        if getattr(plain, "text_encoder_2", None) is not None and plain.text_encoder.config.hidden_size == plain.text_encoder_2.config.hidden_size:
            # diffusers picks text_encoder_2's converter by width: equal widths read the first encoder into it
            extra = f", text_encoder_2=dmm_ray.formats.single_file.sdxl_text_encoder_2({str(out)!r}, {str(config_dir)!r})"
        print(f"load it with: {loader}.from_single_file({str(out)!r}, config={str(config_dir)!r}{extra})")
    # a stock pipeline samples with its own defaults (50 steps, guidance 7.5), not the model's: a few-step
    # model's TCD / LCM scheduler refuses 50 steps outright (metadata dmm.sampler)
    sampler = json.loads(metadata["dmm.sampler"])
    print(
        f"sample it as the model does: num_inference_steps={sampler['num_inference_steps']}, guidance_scale={sampler['guidance_scale']}, "
        f"negative_prompt={sampler['negative_prompt']!r} ({sampler['scheduler']}; a stock pipeline's defaults are 50 steps at 7.5)"
    )

    # 6. log to MLflow
    if args.no_track:
        print("MLflow: not logged (--no-track)")
    elif target.run_id is None:
        print("MLflow: not logged: the model records no merge run (dmm_merge.json has no mlflow entry); pass --run-id")
    else:
        try:
            log_export(out, config_dir, metadata, target.run_id, target.tracking_uri, one_try=bool(unanswered))
            print(f"MLflow: logged under run {target.run_id} (artifacts exports/) in {target.tracking_uri}")
        except Exception as exc:  # noqa: BLE001 - the export itself is written; say why tracking failed
            print(f"warning: export written but not logged to MLflow run {target.run_id} at {target.tracking_uri}: {exc}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

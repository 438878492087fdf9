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
teachers with checksums, dmm-ray version; `dmm_ray.export.read_metadata(path)`), and is logged as an
artifact (`exports/`) of the MLflow run of the merge it came from: the run recorded in the merged
folder's dmm_merge.json, the run of a `models:/name/version`, or --run-id.

Exit status: 0 written (and logged), 1 --verify found a difference, 2 bad input (a --model that does
not exist or is not a merged model, an unknown style, bad weights, an --out or config folder that is
not an earlier export's, a tracking store MLflow cannot open or a run it does not hold; all checked
before anything is loaded, nothing written), 3 written but MLflow logging failed, 130 interrupted
(nothing half-written left).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

from dmm_ray.console import add_verbose_argument, cli_main, refuse_empty, set_verbosity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="the merged model: a DMMPipeline / DMMXLPipeline folder (jobs/merge.py's <output_dir>/merged) "
        "or an MLflow model URI models:/<name>/<version> (downloaded into a temporary folder, removed when the job ends)",
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
        help="single_file only: where to write the pipeline's configs (no weights), the `config=` that "
        "from_single_file needs for a model that is not a stock SD1.5/SDXL shape; "
        "default: --out with the suffix .config; 'none' to skip. Written only where nothing is, or over an earlier "
        "export's config folder (it holds dmm_export_config.json): never into a folder of yours",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="after writing, reload the export and check its UNet output against the merged model's with "
        "this style on random inputs (relative error <= 1e-5 in float32; exits 1 otherwise)",
    )
    p.add_argument("--device", default="cpu", help="device to bake on (cpu or cuda); default cpu")
    p.add_argument(
        "--run-id",
        default=None,
        help="MLflow run to log the export to; default: the merge run recorded in the model's dmm_merge.json (or the run of a models:/ URI); "
        "checked before anything is written (unless --no-track)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store; default: the one recorded with the merge, else sqlite:///$DMM_HOME/mlflow.db; checked before anything is written (unless --no-track)",
    )
    p.add_argument("--no-track", action="store_true", help="do not log the export to MLflow")
    add_verbose_argument(p)
    return p


@contextlib.contextmanager
def resolve_model(model: str, tracking_uri: str | None = None) -> Iterator[tuple[Path, str | None, str | None]]:
    """(local folder, run id, tracking uri) for a folder or an MLflow models:/ URI (read from
    `tracking_uri`, else the store already set, else sqlite:///$DMM_HOME/mlflow.db), for the length of
    the block: a downloaded model is removed at its end."""
    from dmm_ray.export import merge_record
    from dmm_ray.tracking import local_model

    if model.startswith(("models:/", "runs:/")):
        with local_model(model, tracking_uri) as folder:
            yield folder, *_registry_run(model)
        return
    folder = Path(model).expanduser()
    record = merge_record(folder).get("mlflow") or {}
    yield folder, record.get("run_id"), record.get("tracking_uri")


def _registry_run(model: str) -> tuple[str | None, str]:
    """(run id, tracking uri) of a models:/ or runs:/ URI, from the store resolve_model set."""
    import mlflow
    from mlflow import MlflowClient

    if model.startswith("runs:/"):
        return model.split("/")[1], mlflow.get_tracking_uri()
    name, _, version = model[len("models:/") :].partition("/")
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, version[1:]) if version.startswith("@") else client.get_model_version(name, version)
    return mv.run_id, mlflow.get_tracking_uri()


def log_to_mlflow(out: Path, config_dir: Path | None, metadata: dict, run_id: str, tracking_uri: str) -> None:
    """The export (file or folder), its config folder and its metadata as artifacts of `run_id` under exports/."""
    import tempfile

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    client.get_run(run_id)  # fails clearly when the run is not in this store
    if out.is_dir():
        client.log_artifacts(run_id, str(out), f"exports/{out.name}")
    else:
        client.log_artifact(run_id, str(out), "exports")
    if config_dir is not None and config_dir.is_dir():
        client.log_artifacts(run_id, str(config_dir), f"exports/{config_dir.name}")
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / f"{out.name}.json"
        record.write_text(json.dumps(metadata, indent=1))
        client.log_artifact(run_id, str(record), "exports")
    client.set_tag(run_id, f"dmm.export.{out.name}", metadata.get("dmm.style") or metadata.get("dmm.style_weights", ""))


def verify(export: Path, fmt: str, config_dir: Path | None, merged, style, style_weights) -> float:
    """Max relative difference between the export's UNet and the merged model's with the style."""

    from dmm_ray.architectures import base_pipeline_class

    if fmt == "diffusers":
        plain = base_pipeline_class(export).from_pretrained(str(export), local_files_only=True)
    else:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLPipeline if getattr(merged, "text_encoder_2", None) is not None else StableDiffusionPipeline
        plain = cls.from_single_file(str(export), config=str(config_dir), local_files_only=True)
    return unet_relative_error(merged.unet, plain.unet, style, style_weights)


def unet_relative_error(style_unet, plain_unet, style=None, style_weights=None, batch: int = 2, seed: int = 0) -> float:
    """max |eps_style - eps_plain| / max |eps_style| on random latents, timesteps and text states (float32)."""
    import torch

    from dmm_ray.export import style_vector

    g = torch.Generator().manual_seed(seed)
    cfg = style_unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    h = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": torch.rand(batch, 6, generator=g) * size * 8}
    w = style_vector(style_unet, style, style_weights)[None].repeat(batch, 1)
    with torch.no_grad():
        su, pu = style_unet.float(), plain_unet.float()
        a = su(x, t, h, style_weights=w, added_cond_kwargs=added).sample
        b = pu(x, t, h, added_cond_kwargs=added).sample
    return float((a - b).abs().max() / a.abs().max())


def _check_device(name: str) -> None:
    import torch

    from dmm_ray.export import ExportError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ExportError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"--device {name}: this torch build sees no CUDA device (torch.cuda.is_available() is False); use --device cpu")


@cli_main(
    interrupted="nothing half-written was left (a partial export, its staged config folder and any models:/ download "
    "are removed; an export already in place stays, its MLflow logging possibly incomplete): run the same command again to redo it"
)
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "model", "style", "weights", "out", "config_dir", "run_id", "tracking_uri")
    set_verbosity(args.verbose)
    with contextlib.ExitStack() as stack:  # holds a downloaded models:/ copy until the export is done
        return _export(args, stack)


def _config_dir(args, out: Path, fmt: str) -> Path | None:
    """The single-file export's config folder, refused (ExportError) before any work when it would
    overwrite something that is not an earlier export's config folder, or clash with --out."""
    from dmm_ray.export import ExportError, check_config_replaceable
    from dmm_ray.paths import check_writable_folder

    if fmt != "single_file" or (args.config_dir or "").lower() == "none":
        return None
    if args.config_dir:
        config_dir, setting = Path(args.config_dir).expanduser(), "--config-dir"
        hint = "give a new folder or an earlier export's config folder, --config-dir none to skip it, or delete it first"
    else:
        config_dir, setting = out.with_suffix(".config"), "the config folder"
        hint = "it is --config-dir's default, --out with the suffix .config: choose another with --config-dir DIR, skip it with --config-dir none, or delete it first"
    a, b = config_dir.absolute(), out.absolute()
    if a == b or a in b.parents or b in a.parents:
        raise ExportError(f"{setting} {config_dir} and --out {out} overlap; give the config folder a path of its own, beside --out")
    check_config_replaceable(config_dir, setting, hint)
    check_writable_folder(config_dir.parent, f"{setting}'s parent")
    return config_dir


def _check_selection(names: list[str], style: str | None, weights: dict[str, float] | None) -> None:
    """--style / --weights against the model's style names (StyleError naming the known ones)."""
    from dmm_ray.styles import StyleError, style_weights

    if style is not None:
        style_weights(names, style)
        return
    seen: dict[int, str] = {}
    for key in weights:
        index = style_weights(names, key).index(1.0)
        if index in seen:
            raise StyleError(f"--weights gives style {names[index]!r} twice ({seen[index]}= and {key}=: a name and its index); give each style once")
        seen[index] = key
    style_weights(names, weights)  # negative, all zero, not finite


@contextlib.contextmanager
def _quick_http(timeout_s: int | None = 10) -> Iterator[None]:
    """MLflow's REST client without its retries (minutes against a server that is down) and, unless
    `timeout_s` is None, with a short per-request timeout: for a check, or a store that just failed one."""
    import os

    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if timeout_s is not None:
        settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_run(run_id: str, uri: str, run_what: str, uri_what: str) -> bool:
    """Before any work: the run the export will be logged to (`run_what` names it and where it came
    from) is in the store `uri` (`uri_what`: where that came from); an ExportError (exit 2) when it is
    not, or is deleted. An sqlite database that does not exist is not created to find that out. An
    http(s) store that does not answer now only gets a warning and False: the export goes on, its
    logging is tried once after the write (no retries), and exits 3 when it fails, as before."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dmm_ray.export import ExportError

    where = f"the MLflow store {uri} ({uri_what})"
    fix = "give a run of that store, name the store that has it with --tracking-uri, or pass --no-track"
    if uri.startswith("sqlite:///") and uri[len("sqlite:///") :].split("?")[0]:
        db = Path(uri[len("sqlite:///") :].split("?")[0])
        if not db.is_file():
            raise ExportError(f"{run_what} is not in {where}: its database {db} does not exist; {fix}")
    remote = uri.startswith(("http://", "https://"))
    try:
        with _quick_http():
            run = MlflowClient(uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - a missing run is bad input; a server that does not answer is not
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        if isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ExportError(f"{run_what} is not in {where}; {fix}") from None
        if not remote:
            raise ExportError(f"cannot read {run_what} from {where}: {text}; {fix}") from None
        print(
            f"warning: cannot check {run_what} in {where} now ({text}); exporting anyway; the logging is tried once after the write (exit 3 if it fails)",
            file=sys.stderr,
        )
        return False
    if run.info.lifecycle_stage == "deleted":
        raise ExportError(f"{run_what} is deleted in {where}; restore it (mlflow runs restore --run-id {run_id}) or {fix}")
    return True


def _export(args, stack: contextlib.ExitStack) -> int:
    from dmm_ray.export import ExportError, bake, check_replaceable, export_pipeline, parse_weights, provenance, staged_config_folder
    from dmm_ray.models.style_unet import StyleError, merged_style_names
    from dmm_ray.paths import check_writable_folder
    from dmm_ray.pipeline import load_dmm_pipeline
    from dmm_ray.tracking import TrackingError, check_tracking_store, is_mlflow_uri

    out = Path(args.out).expanduser()
    fmt = args.format or ("single_file" if out.suffix == ".safetensors" else "diffusers")
    if fmt == "single_file" and out.suffix != ".safetensors":
        print(f"error: --format single_file writes a .safetensors file; --out {out} has no .safetensors suffix", file=sys.stderr)
        return 2
    # Before loading anything: where the export and its configs go, and what they would replace;
    # the style selection, the device, the MLflow store and run.
    check_writable_folder(out.parent, "--out's folder")
    check_replaceable(out, fmt)
    config_dir = _config_dir(args, out, fmt)
    weights = parse_weights(args.weights) if args.weights is not None else None
    _check_device(args.device)
    if args.tracking_uri and not args.no_track:
        check_tracking_store(args.tracking_uri, "--tracking-uri")
    local = None if is_mlflow_uri(args.model) else Path(args.model).expanduser()
    if local is not None and not local.is_dir():
        problem = "is a file, not a folder" if local.exists() else "does not exist"
        print(f"error: --model {args.model} {problem}; give jobs/merge.py's <output_dir>/merged or models:/<name>/<version>", file=sys.stderr)
        return 2
    try:
        folder, run_id, tracking_uri = stack.enter_context(resolve_model(args.model, args.tracking_uri))
    except Exception as exc:  # noqa: BLE001 - a missing registry entry, store, ...: say which
        print(f"error: cannot resolve --model {args.model}: {exc}", file=sys.stderr)
        return 2
    try:
        names = merged_style_names(folder)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}; give jobs/merge.py's <output_dir>/merged", file=sys.stderr)
        return 2
    _check_selection(names, args.style, weights)
    # where the run and the store come from, for the messages
    recorded = f"recorded in {folder / 'dmm_merge.json'}"
    if args.run_id:
        run_what = f"--run-id {args.run_id}"
    elif is_mlflow_uri(args.model):
        run_what = f"the run {run_id} that registered {args.model}"
    else:
        run_what = f"the merge run {run_id} {recorded}"
    if args.tracking_uri:
        uri_what = "--tracking-uri"
    else:
        uri_what = (
            "the registry's store" if is_mlflow_uri(args.model) else "the store recorded with the merge" if tracking_uri else "the default store"
        )
    run_id = args.run_id or run_id
    if args.tracking_uri:
        tracking_uri = args.tracking_uri
    if tracking_uri is None:
        from dmm_ray.paths import default_tracking_uri

        tracking_uri = default_tracking_uri()
    answered = True
    if not args.no_track and run_id is not None:
        if not args.tracking_uri:
            try:
                check_tracking_store(tracking_uri, f"the MLflow store ({uri_what})")
            except TrackingError as exc:
                raise TrackingError(f"{exc}; or name the store with --tracking-uri, or pass --no-track") from None
        answered = check_run(run_id, tracking_uri, run_what, uri_what)

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
        metadata = provenance(pipe, args.model, style=style, style_weights=weights, model_dir=folder, run_id=run_id)
    except (StyleError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    plain = plain.to("cpu")
    # The configs are staged beside their folder and moved into place only after the export is
    # written: a failed (or interrupted) export leaves the folder as it was, new or an earlier export's.
    staged = staged_config_folder(plain, config_dir, export=out.name) if config_dir is not None else contextlib.nullcontext()
    with staged:
        export_pipeline(plain, out, fmt=fmt, dtype=args.dtype, metadata=metadata)
    write_s = time.perf_counter() - t2
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    what = f"style {metadata['dmm.style']!r}" if "dmm.style" in metadata else f"mixture {metadata['dmm.style_weights']}"
    print(
        f"exported {what} of {args.model} -> {out} ({fmt}, {args.dtype}, {size / 2**20:.1f} MiB); "
        f"load {load_s:.1f} s, bake {bake_s:.2f} s, write {write_s:.1f} s"
    )
    if config_dir is not None:
        loader = "StableDiffusionXLPipeline" if metadata["dmm.architecture"] == "sdxl" else "StableDiffusionPipeline"
        print(f"load it with: {loader}.from_single_file({str(out)!r}, config={str(config_dir)!r})")

    if args.verify:
        if args.dtype != "fp32":
            print("note: --verify compares in float32; an fp16/bf16 export differs by its rounding")
        err = verify(out, fmt, config_dir or folder, load_dmm_pipeline(folder), style, weights)
        ok = err <= (1e-5 if args.dtype == "fp32" else 1e-2)
        print(f"verify: max relative UNet difference {err:.2e} ({'ok' if ok else 'TOO LARGE'})")
        if not ok:
            return 1

    if args.no_track:
        print("MLflow: not logged (--no-track)")
    elif run_id is None:
        print("MLflow: not logged: the model records no merge run (dmm_merge.json has no mlflow entry); pass --run-id")
    else:
        try:
            with contextlib.nullcontext() if answered else _quick_http(timeout_s=None):  # a store that did not answer: one try
                log_to_mlflow(out, config_dir, metadata, run_id, tracking_uri)
            print(f"MLflow: logged under run {run_id} (artifacts exports/) in {tracking_uri}")
        except Exception as exc:  # noqa: BLE001 - the export itself is written; say why tracking failed
            print(f"warning: export written but not logged to MLflow run {run_id} at {tracking_uri}: {exc}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

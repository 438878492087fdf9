"""The merged model as an MLflow pyfunc: the diffusers folder is the model's `pipeline` artifact.

    model = mlflow.pyfunc.load_model("models:/dmm-toy/1")
    out = model.predict(pd.DataFrame({"prompt": [...], "style": [...]}), params={"seed": 0})
    images = decode_images(out)  # PIL images; out["image"] holds base64 PNGs

The output is a DataFrame (`prompt`, `style`, `image` as base64 PNG), so `mlflow models serve -m
models:/dmm-toy/1 --env-manager local` answers with JSON; `params={"output": "pil"}` gives PIL images
in-process (a server refuses it: a 400). It runs on the GPU when there is one (`model_config={"device": "cpu"}` to choose).
Serve instead calls `dmm_ray.tracking.resolve_model_uri` and loads the folder.
"""

from __future__ import annotations

import base64
import io
import math

import mlflow.pyfunc

OUTPUTS = ("png", "pil")
MODEL_CONFIG = {"device": "auto"}  # load_model(uri, model_config={"device": "cpu"}), or MLFLOW_PYFUNC_INFERENCE_CONFIG for a server
BATCH = 8  # rows per pipeline call: one batched UNet pass per step, bounded memory for long frames


def model_signature():
    """The pyfunc's signature: `prompt` (string), optional `style` (a name, an index such as 2 or "2",
    or a mixture "noir=0.7,neon=0.3"; missing: the first style); params `num_inference_steps`
    (default: the model's own sampler.json), `seed` (reproducible images) and `output` ("png": base64 PNG strings, JSON-servable;
    "pil": PIL images, in-process only: a 400 through `mlflow models serve`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # style: "noir", 2 or "2", "noir=0.7,neon=0.3". Any type: a "string" column made MLflow refuse an
    # index given as a number before predict() saw it; predict() checks every row itself (400 naming it).
    try:
        from mlflow.types.schema import AnyType  # MLflow >= 2.19

        style_type = AnyType()
    except ImportError:  # older MLflow: the index as a string only
        style_type = "string"
    inputs = Schema([ColSpec("string", "prompt"), ColSpec(style_type, "style", required=False)])
    outputs = Schema([ColSpec("string", "prompt"), ColSpec("string", "style"), ColSpec("string", "image")])
    params = ParamSchema([ParamSpec("num_inference_steps", "long", None), ParamSpec("seed", "long", None), ParamSpec("output", "string", "png")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def decode_images(predictions) -> list:
    """PIL images from predict()'s DataFrame, or from the `predictions` list of records that
    `mlflow models serve` answers with."""
    from PIL import Image

    records = predictions.to_dict("records") if hasattr(predictions, "to_dict") else list(predictions)
    return [Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB") for r in records]


def _bad_request(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # a 400 through `mlflow models serve`


def _serving() -> bool:
    """Whether predict() runs in MLflow's scoring server (`mlflow models serve`), which sets this variable
    (MLflow's own test for its serving environment). MLflow (checked up to 3.17) has no public way to
    tell: the leading _ marks the variable internal (mlflow/mlflow#14168). Should a later MLflow drop it,
    output 'pil' through a server fails as before this check: a 500 after the images are made."""
    import os

    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").strip().lower() in ("true", "1")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class DMMPyfuncModel(mlflow.pyfunc.PythonModel):
    """DataFrame with `prompt` and optional `style` columns -> DataFrame with `prompt`, `style` (the
    style's name, or the normalised mixture) and `image` (base64 PNG); see `model_signature`. A plain diffusers
    folder (jobs/weighted_merge.py --track's weighted merge) has no styles: prompts only, `style` comes back ""."""

    # predict() takes a DataFrame of prompts and styles and returns images: no type hint MLflow's
    # validation supports describes that, and without one MLflow warns at class definition, in a way
    # no warnings filter can silence (it forces "once"). This is MLflow's own switch for such models.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from dmm_ray.architectures import load_plain_pipeline
        from dmm_ray.devices import usable_device
        from dmm_ray.merged_model import model_styles
        from dmm_ray.pipeline import load_dmm_pipeline, sampler_defaults

        # where it runs: `mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`; default "auto",
        # the GPU when there is one (float16, as Serve), else the CPU (float32)
        device = usable_device(str({**MODEL_CONFIG, **(getattr(context, "model_config", None) or {})}["device"]), "model_config device")
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        folder = context.artifacts["pipeline"]
        # A plain diffusers folder has no styles: `jobs/weighted_merge.py --track` registers its weighted merge (the
        # mix baked into the weights) through this model too. DMMPipeline refuses its UNet, so every predict() was an
        # AttributeError (a 500 through `mlflow models serve`); it loads as the stock pipeline and takes prompts only.
        self.styles = model_styles(folder) or []
        if self.styles:
            self.pipe = load_dmm_pipeline(folder, dtype=dtype).to(device)  # DMMPipeline or DMMXLPipeline
            self.defaults = self.pipe.sampler_defaults
        else:
            self.pipe = load_plain_pipeline(folder, dtype=dtype).to(device)  # StableDiffusion(XL)Pipeline
            self.defaults = sampler_defaults(folder, self.pipe.scheduler)  # as a merged model without sampler.json
        self.pipe.set_progress_bar_config(disable=True)  # one bar per batch would fill a server's log

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from dmm_ray.pipeline import max_inference_steps
        from dmm_ray.styles import StyleError, parse_weights, style_weights

        # 1. read the rows and params; a bad row or param is the caller's error (400), before any image
        params = params or {}
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        output = params.get("output") or "png"
        if output not in OUTPUTS:
            raise _bad_request(f"params.output {output!r}: give one of {', '.join(OUTPUTS)}")
        if output == "pil" and _serving():  # PIL images cannot go out as JSON: the answer was a 500, after every image was made
            raise _bad_request(
                "params.output 'pil' gives PIL images in-process only; a server answers JSON: give output 'png' (the default: "
                "base64 PNGs, which dmm_ray.mlflow_model.decode_images turns into PIL images)"
            )
        steps, seed = params.get("num_inference_steps"), params.get("seed")
        if steps is not None and int(steps) < 1:
            raise _bad_request(f"params.num_inference_steps {steps}: give a whole number >= 1 (or none: the model's own)")
        most = max_inference_steps(self.pipe.scheduler)  # a few-step model's scheduler refuses more steps than its grid has
        if steps is not None and most is not None and int(steps) > most:
            raise _bad_request(
                f"params.num_inference_steps {steps}: this few-step model samples at most {most} steps (its scheduler's training grid); "
                f"give 1 to {most} (or none: the model's own, {self.defaults['num_inference_steps']})"
            )
        # Any other scheduler splits its training timesteps: more steps than it has were no error here (Serve caps
        # them at its max_steps): the toy model's DPM-Solver++ gave NaN images at 1001, 10**12 a MemoryError (a 500).
        train = getattr(self.pipe.scheduler.config, "num_train_timesteps", None)
        if steps is not None and train is not None and int(steps) > int(train):
            raise _bad_request(
                f"params.num_inference_steps {steps}: this model's {type(self.pipe.scheduler).__name__} has {train} training timesteps, "
                f"so it samples at most {train} steps; give 1 to {train} (or none: the model's own, {self.defaults['num_inference_steps']})"
            )
        names = self.styles
        prompts, styles = [], []
        for i, r in enumerate(rows):
            if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
                raise _bad_request(f"row {i}: prompt {r.get('prompt')!r} must be non-empty text")
            style = r.get("style")
            if not names:  # a plain pipeline (a weighted merge): no style to choose
                if not _missing(style):
                    raise _bad_request(
                        f"row {i}: style {style!r}: this model has no styles (a plain diffusers pipeline, such as "
                        "jobs/weighted_merge.py's weighted merge, whose mix is baked into its weights); leave style out"
                    )
                prompts.append(r["prompt"])
                styles.append({})
                continue
            style = 0 if _missing(style) else style
            if isinstance(style, float) and style.is_integer():  # pandas stores ints with a missing row as float64 (1 -> 1.0)
                style = int(style)
            try:  # a name, an index ("2"), or a mixture ("noir=0.7,neon=0.3")
                weights = style_weights(
                    names, parse_weights(style, "style") if isinstance(style, str) and "=" in style and style not in names else style
                )
            except StyleError as error:
                raise _bad_request(f"row {i}: {error}") from None
            prompts.append(r["prompt"])
            styles.append(dict(zip(names, weights)))

        def label(mix: dict) -> str:  # the output's style column: the name, or the normalised mixture
            used = {n: w for n, w in mix.items() if w > 0}
            return next(iter(used)) if len(used) == 1 else ",".join(f"{n}={w:.4g}" for n, w in used.items())

        # 2. generate in batches of BATCH rows (one seeded generator: the same frame gives the same images)
        generator = None if seed is None else torch.Generator(self.pipe.device).manual_seed(int(seed))
        steps_kw = {} if steps is None else {"num_inference_steps": int(steps)}
        if not names:  # the stock pipeline: the sampler a merged model without sampler.json uses (DMMPipeline applies its own)
            d = self.defaults
            steps_kw = {"num_inference_steps": d["num_inference_steps"], "guidance_scale": d["guidance_scale"], **steps_kw}
        images = []
        for start in range(0, len(prompts), BATCH):
            chunk = slice(start, start + BATCH)
            # the stock pipeline takes a negative prompt per prompt when given a list (a str is a TypeError there)
            row_kw = {"style": styles[chunk]} if names else {"negative_prompt": [self.defaults["negative_prompt"]] * len(prompts[chunk])}
            images += self.pipe(prompts[chunk], generator=generator, **{**steps_kw, **row_kw}).images

        # 3. PIL in-process, or base64 PNG in a DataFrame (what `mlflow models serve` can send as JSON)
        if output == "pil":
            return images
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return pd.DataFrame({"prompt": prompts, "style": [label(m) for m in styles], "image": encoded})

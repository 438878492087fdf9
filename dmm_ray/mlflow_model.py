"""The merged model as an MLflow pyfunc: the diffusers folder is the model's `pipeline` artifact.

`mlflow.pyfunc.load_model("models:/dmm-merged/1").predict(pd.DataFrame({"prompt": [...], "style": [...]}))`
returns PIL images; Serve instead calls `dmm_ray.tracking.resolve_model_uri` and loads the folder.
"""

from __future__ import annotations

import mlflow.pyfunc


def model_signature():
    """The pyfunc's signature: `prompt` (string), optional `style` (a name, or an index as a string
    such as "2"), and the `num_inference_steps` param (default: the model's own sampler.json)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("string", "style", required=False)])
    return ModelSignature(inputs=inputs, params=ParamSchema([ParamSpec("num_inference_steps", "long", None)]))


class DMMPyfuncModel(mlflow.pyfunc.PythonModel):
    """DataFrame with `prompt` and optional `style` (a name, or an index as a string: "2") columns -> list of
    PIL images; `params={"num_inference_steps": n}` (default: the model's own sampler)."""

    # predict() takes a DataFrame of prompts and styles and returns images: no type hint MLflow's
    # validation supports describes that, and without one MLflow warns at class definition, in a way
    # no warnings filter can silence (it forces "once"). This is MLflow's own switch for such models.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from dmm_ray.pipeline import load_dmm_pipeline

        self.pipe = load_dmm_pipeline(context.artifacts["pipeline"])  # DMMPipeline or DMMXLPipeline

    def predict(self, context, model_input, params=None):
        params = params or {}
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        steps = params.get("num_inference_steps")  # default: the model's own (25; a few-step model's 4, CFG off)
        images = []
        for r in rows:
            images += self.pipe(r["prompt"], style=r.get("style", 0), num_inference_steps=None if steps is None else int(steps)).images
        return images

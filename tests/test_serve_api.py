"""The style router's HTTP contract, in process (no Ray): FastAPI TestClient over the tiny merged model."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import STYLE_NAMES, TINY_SIZE, TINY_STEPS, tiny_model_dir

from serve.config import ServeConfig
from serve.model import ModelLoadError, StyleModelBackend
from serve.router import LocalService, create_api


@pytest.fixture(scope="module")
def backend():
    return StyleModelBackend(str(tiny_model_dir()), device="cpu")


def make_client(backend, **cfg) -> TestClient:
    config = ServeConfig(model=str(backend.path), default_steps=TINY_STEPS, **cfg)
    return TestClient(create_api(LocalService(backend), config))


@pytest.fixture(scope="module")
def client(backend):
    with make_client(backend) as c:
        yield c


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def gen(client, **body):
    body = {"prompt": "a red circle", "steps": TINY_STEPS, "width": TINY_SIZE, "height": TINY_SIZE} | body
    return client.post("/generate", json=body)


def test_styles_lists_names_indices_descriptions(client):
    r = client.get("/styles")
    assert r.status_code == 200
    info = r.json()
    assert [s["name"] for s in info["styles"]] == STYLE_NAMES
    assert [s["index"] for s in info["styles"]] == [0, 1, 2]
    assert info["styles"][1]["description"] == "glowing edges"
    assert info["limits"]["max_steps"] == 50 and info["limits"]["api_key_required"] is False


def test_healthz_and_openapi_docs(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # liveness: nothing else, no model path
    assert client.head("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "num_styles": 3}
    schema = client.get("/openapi.json").json()
    assert {"/generate", "/styles", "/healthz", "/readyz"} <= set(schema["paths"])
    # the schema documents the error bodies the API sends ({"error": ...}), not FastAPI's {"detail": [...]}
    for path in ("/generate", "/export_command"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"400", "401", "403", "413", "415", "422", "503"} <= set(responses), path
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert set(schema["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    docs = client.get("/docs")  # Swagger UI loads from a CDN: offline, the page says so and links the schema
    assert docs.status_code == 200 and "SwaggerUIBundle === 'undefined'" in docs.text and "/openapi.json" in docs.text


def test_one_image_is_png_with_seed_and_mixture_headers(client):
    r = gen(client, style="neon", seed=7)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "7"
    assert r.headers["x-style-mixture"] == '{"neon": 1.0}'
    assert png_array(r.content).shape == (TINY_SIZE, TINY_SIZE, 3)


def test_many_images_are_json_base64_with_consecutive_seeds(client):
    r = gen(client, prompt=["a red circle", "a blue square"], num_images=2, seed=100, weights={"watercolor": 1, "sketch": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 100
    assert [im["seed"] for im in body["images"]] == [100, 101, 102, 103]
    assert [im["prompt"] for im in body["images"]] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert body["mixture"] == {"watercolor": 0.25, "sketch": 0.75}
    arrays = [png_array(base64.b64decode(im["png_base64"])) for im in body["images"]]
    assert all(a.shape == (TINY_SIZE, TINY_SIZE, 3) for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])  # different seeds -> different images


def test_same_seed_same_image_and_style_changes_image(client):
    a = png_array(gen(client, style=0, seed=3).content)
    b = png_array(gen(client, style="watercolor", seed=3).content)
    c = png_array(gen(client, style=1, seed=3).content)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_weights_as_list_equal_dict_and_one_hot_equals_style(client):
    a = png_array(gen(client, weights=[0, 2, 2], seed=5).content)
    b = png_array(gen(client, weights={"neon": 1, "sketch": 1}, seed=5).content)
    assert np.array_equal(a, b)
    c = png_array(gen(client, weights={"sketch": 1}, seed=5).content)
    d = png_array(gen(client, style="sketch", seed=5).content)
    assert np.array_equal(c, d)


def test_default_size_is_native_unless_configured(client, backend):
    info = client.get("/styles").json()
    assert (info["default_width"], info["default_height"]) == backend.native_size
    with make_client(backend, default_size=24) as c:
        assert c.get("/styles").json()["default_width"] == 24
        r = c.post("/generate", json={"prompt": "a red circle", "steps": TINY_STEPS, "seed": 1})
        assert r.status_code == 200 and png_array(r.content).shape == (24, 24, 3)


def test_json_format_for_one_image_and_default_style(client):
    r = gen(client, response_format="json", seed=1)
    assert r.status_code == 200 and r.json()["mixture"] == {"watercolor": 1.0}


# Every validation error: (request body, status, words the message must contain).
BAD_REQUESTS = [
    ({"style": "oil"}, 422, ["unknown style 'oil'", "watercolor", "neon", "sketch"]),
    ({"style": 3}, 422, ["out of range", "watercolor"]),
    ({"style": -1}, 422, ["out of range"]),
    ({"weights": {"neon": -1, "sketch": 2}}, 422, [">= 0", "neon"]),
    ({"weights": {"neon": 0, "sketch": 0}}, 422, ["all zero", "watercolor"]),
    ({"weights": [0, 0, 0]}, 422, ["all zero"]),
    ({"weights": [1, 2]}, 422, ["2 entries", "3 styles"]),
    ({"weights": {"oil": 1}}, 422, ["unknown style", "oil", "sketch"]),
    ({"style": "neon", "weights": [1, 0, 0]}, 422, ["not both"]),
    ({"width": 36}, 422, ["width=36", "multiple of 8"]),
    ({"height": 44}, 422, ["height=44", "multiple of 8"]),
    # the hint is within the limit: 1001 suggested 1000, itself a 422 above 768
    ({"width": 1001}, 422, ["width=1001", "multiple of 8 (try 768)"]),
    ({"height": 36}, 422, ["height=36", "multiple of 8 (try 32)"]),
    ({"width": 1024}, 422, ["width=1024", "maximum 768"]),
    ({"steps": 51}, 422, ["steps=51", "maximum 50"]),
    ({"steps": 0}, 422, ["steps"]),
    ({"num_images": 5}, 422, ["5 images", "maximum is 4"]),
    ({"prompt": ["a", "b", "c"], "num_images": 2}, 422, ["6 images"]),
    ({"prompt": ""}, 422, ["prompt is empty"]),
    ({"prompt": "   "}, 422, ["prompt is empty"]),
    ({"prompt": []}, 422, ["prompt list is empty"]),
    ({"prompt": ["ok", ""]}, 422, ["prompt[1] is empty"]),
    ({"prompt": "x" * 1001}, 422, ["1001 characters"]),
    ({"prompt": None}, 422, ["prompt must be a string or a list of strings"]),
    ({"style": 1.5}, 422, ["style must be a style name (string) or index (integer)"]),
    ({"weights": "x"}, 422, ["weights must be an object"]),
    ({"guidance": -1}, 422, ["guidance"]),
    ({"seed": -5}, 422, ["seed"]),
    ({"colour": "red"}, 422, ["unknown field 'colour'", "allowed fields", "prompt"]),
    ({"steps": "many"}, 422, ["steps", "many"]),
    ({"response_format": "png", "num_images": 2}, 422, ["needs exactly one image"]),
    ({"response_format": "gif"}, 422, ["response_format"]),
]


@pytest.mark.parametrize("body,status,words", BAD_REQUESTS, ids=[str(b)[:40] for b, _, _ in BAD_REQUESTS])
def test_validation_errors_are_4xx_with_clear_messages(client, body, status, words):
    r = gen(client, **body)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert client.get("/healthz").status_code == 200  # server still up


WEIGHTS_EXPECTED = "weights must be an object {style name: weight} or a list with one number per style"


@pytest.mark.parametrize(
    "body,message",
    [
        ({"weights": {"neon": True}}, f"{WEIGHTS_EXPECTED} (got {{'neon': True}}: weights['neon'] is True, not a number)"),
        ({"weights": [True, 0, 0]}, f"{WEIGHTS_EXPECTED} (got [True, 0, 0]: weights[0] is True, not a number)"),
        ({"weights": "x"}, f"{WEIGHTS_EXPECTED} (got 'x')"),
        ({"prompt": ["a", 1]}, "prompt must be a string or a list of strings (got ['a', 1]: prompt[1] is 1, not a string)"),
        (
            {"regions": [{"box": [0, 0, 1, 1], "weights": {"neon": "x"}}]},
            f"regions[0]: {WEIGHTS_EXPECTED} (got {{'neon': 'x'}}: weights['neon'] is 'x', not a number)",
        ),
    ],
)
def test_a_bad_union_field_is_one_message(client, body, message):
    """pydantic reports weights (an object or a list) once per branch: {"neon": true} read as the same
    message twice, once "(got True)" and once "(got {'neon': True})". One message, naming the bad item."""
    r = gen(client, **body)
    assert r.status_code == 422 and r.json()["error"] == message, r.text


@pytest.mark.parametrize(
    "raw", [b"{not json", b'{"prompt": "a", }', b"", b"[1, 2]", b'"just a string"'], ids=["broken", "trailing", "empty", "list", "str"]
)
def test_malformed_json_is_4xx(client, raw):
    r = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]
    if raw in (b"{not json", b'{"prompt": "a", }'):
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    else:
        assert "JSON object" in r.json()["error"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "raw,words",
    [
        (b'{"prompt": "caf\xe9"}', "not UTF-8 text: byte 0xe9 at offset 15"),
        (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", f"a number with more than {sys.get_int_max_str_digits()} digits"),
        (b'{"prompt": "a", "weights": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deep"),
    ],
    ids=["latin-1", "5000-digit number", "deep nesting"],
)
@pytest.mark.parametrize("route", ["/generate", "/export_command"])
def test_a_body_json_cannot_read_says_why_not_just_parse_error(client, raw, words, route):
    """Bodies json.loads refuses outside the JSON grammar got FastAPI's bare 400 "There was an error
    parsing the body"; they say what was wrong, as a grammar error does."""
    r = client.post(route, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON body (") and words in r.json()["error"], r.text
    assert "JSON object like" in r.json()["error"]


@pytest.mark.parametrize(
    "route,raw,key",
    [
        ("/generate", b'{"prompt": "a", "weights": {"neon": 0.3, "sketch": 0.5, "neon": 0.2}, "steps": 2}', "neon"),
        ("/generate", b'{"prompt": "a", "prompt": "b", "steps": 2}', "prompt"),
        ("/generate", b'{"prompt": "a", "regions": [{"box": [0, 0, 1, 1], "style": 0, "style": 1}]}', "style"),
        ("/export_command", b'{"weights": {"neon": 0.3, "sketch": 0.5, "neon": 0.2}}', "neon"),
    ],
    ids=["weights", "prompt", "region", "export"],
)
def test_a_key_given_twice_in_the_body_is_a_422_naming_it(client, route, raw, key):
    """json.loads keeps the last of two equal keys: {"neon": 0.3, "sketch": 0.5, "neon": 0.2} was served as
    neon 0.2 (0.29 after normalising) and {"prompt": "a", "prompt": "b"} as "b", without a word, where
    --weights and the YAML configs refuse a key given twice. Now a 422 naming the key; the server serves on."""
    r = client.post(route, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == f"the JSON body gives the key {key!r} twice in one object; give each key once", r.text
    assert gen(client, weights={"neon": 0.5, "sketch": 0.5}, seed=1).status_code == 200
    # the same key in two objects is no duplicate
    r = client.post(
        "/generate",
        content=b'{"prompt": "a", "steps": 2, "regions": [{"box": [0, 0, 0.5, 1], "style": 0}, {"box": [0.5, 0, 1, 1], "style": 1}]}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text


def test_wrong_content_type_unknown_paths_and_methods_answer_in_the_error_shape(client):
    """A form body (curl -d without -H) is a 415 that says what to send; 404, 405 and an unreadable
    body use the same {"error": ...} body as every other client error; HEAD /healthz works for probes."""
    r = client.post("/generate", content=b'{"prompt": "a"}', headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "Content-Type must be application/json" in r.json()["error"]
    r = client.post("/generate", content=b'{"prompt": "a", "steps": 2}', headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200  # a charset parameter is fine
    r = client.post("/generate", content=b'{"prompt": "a", "steps": 2}')  # requests.post(url, data=...): no Content-Type
    assert r.status_code == 415 and "(got none)" in r.json()["error"]
    assert client.get("/nope").json() == {"error": "Not Found"} and client.get("/nope").status_code == 404
    r = client.get("/generate")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
    assert client.head("/healthz").status_code == 200
    r = client.post("/generate", content='{"prompt": "a", "guidance": NaN}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "guidance must be a finite number" in r.json()["error"]


def test_mixture_header_leaves_out_weights_that_round_to_zero(client):
    r = gen(client, weights={"watercolor": 1e-7, "neon": 1}, seed=1)
    assert r.status_code == 200 and json.loads(r.headers["X-Style-Mixture"]) == {"neon": 1.0}


def test_api_key_guards_generate_only(backend):
    with make_client(backend, api_key="s3cret") as c:
        assert c.get("/styles").json()["limits"]["api_key_required"] is True
        r = gen(c, seed=1)
        assert r.status_code == 401 and "X-API-Key" in r.json()["error"]
        r = c.post("/generate", json={"prompt": "a", "steps": 2}, headers={"X-API-Key": "wrong"})
        assert r.status_code == 403
        r = c.post("/generate", json={"prompt": "a", "steps": 2, "width": 32, "height": 32}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        # the key is checked before anything else: a key-less form POST was a 415 that told a caller
        # without the key what the server accepts; with the key, the same POST is the 415
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        r = c.post("/generate", content=b"prompt=a", headers=form)
        assert r.status_code == 401 and "X-API-Key" in r.json()["error"], r.text
        assert c.post("/generate", content=b"prompt=a", headers=form | {"X-API-Key": "wrong"}).status_code == 403
        assert c.post("/generate", content=b"prompt=a", headers=form | {"X-API-Key": "s3cret"}).status_code == 415


def test_playground_page_has_prompt_sliders_button(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    for part in ('id="prompt"', 'slider.type = "range"', 'id="generate"', 'id="image"', 'fetch(BASE + "styles")'):
        assert part in r.text


# ---- configuration and model loading ---------------------------------------------------------


def test_config_rejects_unknown_keys_and_bad_values():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_batchsize"):
        ServeConfig(max_batchsize=4)
    with pytest.raises(ValidationError, match="multiple of 8"):
        ServeConfig(limits={"max_width": 100})
    with pytest.raises(ValidationError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    # what `serve run serve:build_app max_batchsize=4` reads: one line per key, the nearest known key
    with pytest.raises(ValueError, match="max_batchsize: Extra inputs are not permitted \\(got 4\\); did you mean max_batch_size\\?"):
        ServeConfig.from_env(overrides={"max_batchsize": 4}, environ={})


def test_config_from_env_and_overrides(tmp_path):
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("max_batch_size: 4\nlimits: {max_steps: 10}\n")
    env = {"DMM_MODEL": "/models/m", "DMM_API_KEY": "k", "DMM_SERVE_CONFIG": str(yaml_file)}
    cfg = ServeConfig.from_env({"max_batch_size": "16"}, environ=env)
    assert (cfg.model, cfg.api_key, cfg.max_batch_size, cfg.limits.max_steps) == ("/models/m", "k", 16, 10)
    # args override key by key inside sections too: serve/config.yaml's `limits: {max_steps, max_images}` dropped the
    # file's limits.max_steps (and a file's max_width: 1024 went back to 768) without a word
    cfg = ServeConfig.from_env({"limits": {"max_images": 2}}, environ=env)
    assert (cfg.limits.max_steps, cfg.limits.max_images, cfg.max_batch_size) == (10, 2, 4)
    assert ServeConfig.from_env(environ={}).model == "$DMM_HOME/outputs/dmm-toy/merged"
    assert ServeConfig(model="models:/dmm/3").model_location() == "models:/dmm/3"
    assert ServeConfig(model="outputs/toy/merged").model_location().endswith("outputs/toy/merged")


@pytest.mark.parametrize(
    "text, message",
    [
        ("max_batch_size: [4\n", r"DMM_SERVE_CONFIG file .*serve.yaml is not valid YAML: .* at line 2, column 1"),
        ("- max_batch_size: 4\n", r"the top level must be a mapping of ServeConfig fields"),
        ("applications:\n  - args: {max_batch_size: 4}\n", r"this is a Ray Serve config file \(applications:\); run it with `serve run "),
    ],
)
def test_a_serve_config_file_that_is_not_a_mapping_of_fields_says_so(tmp_path, text, message):
    """DMM_SERVE_CONFIG naming malformed YAML, a list, or a Serve config file (serve/config.yaml):
    a ConfigError that says which, not a YAML parser dump, a TypeError, or every key of the file."""
    from dmm_ray.overrides import ConfigError

    (tmp_path / "serve.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        ServeConfig.from_env(environ={"DMM_SERVE_CONFIG": str(tmp_path / "serve.yaml")})


def test_default_model_is_the_default_merge_output_under_dmm_home(tmp_path, monkeypatch):
    """Serve's default is where `python jobs/merge.py` (no arguments) writes its merged model."""
    import yaml

    from dmm_ray import paths

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    toy = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy.yaml").read_text())
    assert "output_dir" not in toy  # the embedded default keeps its outputs in $DMM_HOME/outputs/<name>
    expected = paths.outputs_dir(toy["name"]) / "merged"
    assert ServeConfig().model_location() == str(expected) == str(tmp_path / "home" / "outputs" / "dmm-toy" / "merged")


def test_missing_model_folder_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="make demo.*DMM_MODEL"):
        StyleModelBackend(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model_index.json"):
        StyleModelBackend(str(tmp_path))


def test_registry_uri_resolved_lazily_through_tracking(monkeypatch):
    seen = []

    def resolve_model_uri(uri, dst=None):  # dst: the backend's own download folder
        seen.append(uri)
        return str(tiny_model_dir())

    fake = types.ModuleType("dmm_ray.tracking")
    fake.resolve_model_uri = resolve_model_uri
    monkeypatch.setitem(sys.modules, "dmm_ray.tracking", fake)
    b = StyleModelBackend("models:/dmm-merged/2", device="cpu")
    assert seen == ["models:/dmm-merged/2"] and b.style_names == STYLE_NAMES


def test_registry_uri_without_tracking_module_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "dmm_ray.tracking", None)  # import fails
    with pytest.raises(ModelLoadError, match="resolve_model_uri is not available"):
        StyleModelBackend("models:/dmm-merged/2")


def test_readyz_reaches_the_model_not_the_styles_cache_and_leaks_nothing(caplog):
    """Once the style list is cached, /styles keeps answering from it, but /readyz must say 503 when the
    model deployment no longer answers - without the exception text or paths (those go to the log),
    while /healthz (liveness) stays 200."""
    from serve.deployments import HandleService

    class Method:
        def __init__(self, fn):
            self.remote = fn

    state = {"alive": True}

    async def info():
        if not state["alive"]:
            raise RuntimeError("no replica at /secret/models/merged")
        return {"styles": [{"name": "a", "index": 0, "description": ""}], "native_size": [32, 32], "vae_scale_factor": 8}

    handle = types.SimpleNamespace(info=Method(info), generate=Method(None))
    with TestClient(create_api(HandleService(handle), ServeConfig(model="/secret/models/merged"))) as c:
        assert c.get("/readyz").status_code == 200 and c.get("/styles").status_code == 200
        state["alive"] = False
        assert c.get("/styles").status_code == 200  # cached
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "unavailable"} and r.headers["retry-after"] == "2"
        h = c.get("/healthz")
        assert h.status_code == 200 and h.json() == {"status": "ok"}
        for text in (r.text, h.text):
            assert "secret" not in text and "RuntimeError" not in text and "no replica" not in text
    assert "no replica" in caplog.text  # logged for the operator instead


def test_a_style_error_from_deeper_code_is_a_422_and_the_server_keeps_serving(backend):
    """One resolver (dmm_ray.styles) for pipeline and Serve: a StyleError raised below the request
    checks (here by the backend) is the client's mistake, answered 422 with the known styles."""
    from dmm_ray.styles import StyleError, style_weights

    class Refusing(LocalService):
        async def generate(self, samples):
            style_weights(STYLE_NAMES, "oil")  # raises StyleError naming the known styles
            raise AssertionError("unreachable")

    config = ServeConfig(model=str(backend.path), default_steps=TINY_STEPS)
    with TestClient(create_api(Refusing(backend), config), raise_server_exceptions=False) as c:
        r = gen(c)
        assert r.status_code == 422 and "unknown style 'oil'" in r.json()["error"] and STYLE_NAMES[0] in r.json()["error"]
        assert c.get("/healthz").status_code == 200
    with pytest.raises(StyleError, match="one entry per style"):
        style_weights(STYLE_NAMES, [1.0])


def test_the_tiny_model_folder_is_removed_when_its_process_exits(tmp_path):
    """Every test process builds one tiny model (6 MB); it must not stay in the temp folder after the run."""
    code = "from serve_helpers import tiny_model_dir; d = tiny_model_dir(); assert (d / 'model_index.json').is_file(); print(d)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    made = Path(out.strip().splitlines()[-1])
    assert made.parent.parent == tmp_path and made.name == "merged"
    assert not made.parent.exists(), f"{made.parent} was left behind"


def test_text_a_tokenizer_cannot_read_and_digit_styles_int_refuses_are_422s_naming_the_field(client):
    """A JSON escape can carry a lone surrogate (no Unicode text: the tokenizer raised inside the model,
    a 500); "²" is a digit to str.isdigit() but not to int(), and so is a 5000-digit index."""
    size = '"steps": 2, "width": 32, "height": 32'
    two_regions = '[{"box": [0, 0, 0.5, 1], "style": 0, "prompt": "x\\ud800"}, {"box": [0.5, 0, 1, 1], "style": 1}]'
    for raw, field in (
        ('{"prompt": "a \\ud800 circle", %s}' % size, "prompt holds an unpaired surrogate"),
        ('{"prompt": "a", "negative_prompt": "\\udfff", %s}' % size, "negative_prompt holds an unpaired surrogate"),
        ('{"prompt": "a", "regions": %s, %s}' % (two_regions, size), "regions[0].prompt holds an unpaired surrogate"),
    ):
        r = client.post("/generate", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and field in r.json()["error"], (raw, r.text)
    for style in ("²", "9" * 5000):
        for body in ({"style": style}, {"weights": {style: 1}}, {"regions": [{"box": [0, 0, 1, 1], "style": style}]}):
            r = gen(client, **body)
            assert r.status_code == 422 and "known styles" in r.json()["error"], (body, r.text)
    assert gen(client, style="1").status_code == 200
    assert client.get("/healthz").status_code == 200


def test_a_few_step_models_steps_stop_at_its_training_grid(tmp_path):
    """A TCD / LCM model samples at most its grid's steps (original_inference_steps): steps=11 on the
    toy preset's 10 was diffusers' ValueError, a 500; now a 422, and /styles says the limit. A server default
    above it is a 422 that says so."""
    import shutil
    from types import SimpleNamespace

    from dmm_ray.fast.sampler import few_step_scheduler

    src, dst = tiny_model_dir(), tmp_path / "fast"
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "scheduler")  # what jobs/fast.py saves with jobs/configs/toy_fast.yaml (tcd, 10 DDIM timesteps)
    few_step_scheduler(src, SimpleNamespace(sampler="tcd", timestep_scaling=10.0, num_ddim_timesteps=10)).save_pretrained(dst / "scheduler")
    index = json.loads((dst / "model_index.json").read_text())
    (dst / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "TCDScheduler"]}))
    (dst / "sampler.json").write_text(json.dumps({"scheduler": "TCDScheduler", "num_inference_steps": 4, "guidance_scale": 1.0}))
    with TestClient(create_api(LocalService(StyleModelBackend(str(dst), device="cpu")), ServeConfig(model=str(dst)))) as c:
        assert c.get("/styles").json()["limits"]["max_steps"] == 10
        body = {"prompt": "a red circle", "width": TINY_SIZE, "height": TINY_SIZE, "seed": 1}
        assert c.post("/generate", json=body | {"steps": 10}).status_code == 200
        r = c.post("/generate", json=body | {"steps": 11})
        assert r.status_code == 422 and r.json()["error"] == "steps=11 is above the maximum 10"
    # a configured default_steps above the grid (one written for the merged model): a request that names no
    # steps was told "steps=25 is above the maximum 10", steps it never sent; the answer now names the config
    with TestClient(create_api(LocalService(StyleModelBackend(str(dst), device="cpu")), ServeConfig(model=str(dst), default_steps=25))) as c:
        r = c.post("/generate", json=body)
        assert r.status_code == 422 and r.json()["error"] == (
            "steps=25 is above the maximum 10 (the server's default_steps, as the request gives none: send steps of at most 10, "
            "or lower default_steps in the serve config)"
        )
        assert c.post("/generate", json=body | {"steps": 10}).status_code == 200


def test_serve_config_defaults_within_limits_methods_and_styles_json(tmp_path, backend):
    """A default above its limit made every request that left the field out a 422; DELETE /generate
    was a 415 (the Content-Type check ran for every method); a truncated styles.json stopped the load
    and a null description showed as "None"."""
    import shutil

    from pydantic import ValidationError

    from serve.model import read_style_descriptions

    for bad in (dict(default_steps=60), dict(default_size=1024)):
        with pytest.raises(ValidationError, match="is above limits.max_"):
            ServeConfig(**bad)
    with make_client(backend) as c:
        assert c.delete("/generate").status_code == 405 and c.put("/styles").status_code == 405
        assert c.post("/nope", content=b"a=1").status_code == 404
    folder = shutil.copytree(tiny_model_dir(), tmp_path / "m")
    (folder / "styles.json").write_text('[{"name": "neon", "description": null}]')
    assert read_style_descriptions(folder, STYLE_NAMES) == ["", "", ""]
    (folder / "styles.json").write_text('[{"name": "neon", "descr')
    assert read_style_descriptions(folder, STYLE_NAMES) == ["", "", ""]


def test_export_commands_run_for_any_style_name():
    """A style named `-dark` became `--style -dark` (argparse: expected one argument); names holding ','
    or '=' broke the --weights pairs. Every command the playground shows parses back to its selection."""
    import shlex

    from dmm_ray.export import export_command
    from dmm_ray.styles import parse_weights
    from jobs import export as job

    args = job.build_parser().parse_args(shlex.split(export_command("m", style="-dark"))[2:])
    assert args.style == "-dark" and args.out == "dark.safetensors"
    names = ["ink", "oil, impasto", "neon=glow"]
    cmd = export_command("m", style_weights={"oil, impasto": 0.25, "neon=glow": 0.75}, names=names)
    assert parse_weights(job.build_parser().parse_args(shlex.split(cmd, comments=True)[2:]).weights) == {"1": 0.25, "2": 0.75}  # indices
    assert "--style neon " in export_command("m", style="neon")  # ordinary names read as before


def test_export_commands_by_index_bake_the_mixture_when_styles_are_named_by_digits():
    """A mixture whose name needs an index (',' or '=') used indices for every style, and `--weights` reads a
    digit string as a name first: with a style named "0" (or "1"), `0=...` baked that style instead. Now only
    such names go by index, with leading zeros where a style has the digit string's name, and a shell comment
    names them; the command, run as printed (the shell drops the comment), bakes the mixture the server showed."""
    import shlex

    from dmm_ray.export import check_selection, export_command
    from dmm_ray.styles import parse_weights, style_weights
    from jobs import export as job

    for names, mixture in (
        (["a,b", "c", "0"], {"a,b": 0.5, "c": 0.5}),  # index 0 was the style named "0"
        (["a,b", "2", "1"], {"a,b": 0.5, "2": 0.5}),  # "2" went as index 1: the style named "1"
        (["a,b", "0", "c"], {"a,b": 0.5, "0": 0.5}),  # was refused: "0" twice
        (["x=y\nrm -rf ~", "noir"], {"x=y\nrm -rf ~": 0.25, "noir": 0.75}),  # a newline stays in the comment
    ):
        cmd = export_command("m", style_weights=mixture, names=names)
        argv = shlex.split(cmd, comments=True)
        assert argv[:2] == ["python", "jobs/export.py"] and "\n" not in cmd, cmd
        weights = parse_weights(job.build_parser().parse_args(argv[2:]).weights)
        check_selection(names, None, weights)
        assert style_weights(names, weights) == style_weights(names, mixture), cmd
    cmd = export_command("m", style_weights={"a,b": 0.5, "c": 0.5}, names=["a,b", "c", "0"])
    assert "--weights 00=0.5,c=0.5 " in cmd and cmd.endswith('# by index: 00 = "a,b"')


def test_export_command_mixture_is_the_one_generate_reports(client):
    """A weight that rounds to 0 at 6 decimals: /generate leaves it out of its mixture, /export_command listed it
    ({"watercolor": 0.0, "neon": 1.0}) and printed `--weights neon=1`. Now the same mixture, and one style is --style."""
    weights = {"watercolor": 1e-7, "neon": 1}
    mixture = gen(client, weights=weights, response_format="json").json()["mixture"]
    r = client.post("/export_command", json={"weights": weights})
    assert r.status_code == 200 and r.json()["mixture"] == mixture == {"neon": 1.0}, r.text
    assert " --style neon --out neon.safetensors " in r.json()["command"]


def test_default_size_limits_follow_a_model_larger_than_768(tmp_path, backend):
    """A model whose native size is above the default limits (SDXL: 1024 px): the unset limits rise to it, so a
    request without width/height is served at the native size (was a 422 "width=1024 is above the maximum 768"
    while /styles advertised default_width 1024); limits the config sets below it fail the deploy, naming the fix."""
    import asyncio
    import shutil

    from dmm_ray.overrides import ConfigError
    from serve.app import build_app
    from serve.deployments import StyleModel
    from serve.router import sampler_config
    from serve.schemas import GenerateRequest, RequestError, resolve_request

    folder = shutil.copytree(tiny_model_dir(), tmp_path / "m")
    unet_cfg = folder / "unet" / "config.json"
    big = json.loads(unet_cfg.read_text())
    big["sample_size"] = 1024 // backend.pipe.vae_scale_factor  # native 1024 px; never sampled at it here
    unet_cfg.write_text(json.dumps(big))
    large = StyleModelBackend(str(folder), device="cpu")
    assert large.native_size == (1024, 1024)
    with make_client(large) as c:
        info = c.get("/styles").json()
        assert (info["default_width"], info["limits"]["max_width"], info["limits"]["max_height"]) == (1024, 1024, 1024)
    cfg = ServeConfig(model=str(folder))
    model_info = asyncio.run(LocalService(large).info())
    resolved = resolve_request(
        GenerateRequest(prompt="a red circle"), STYLE_NAMES, sampler_config(cfg, model_info), model_info.native_size, vae_scale_factor=8
    )
    assert (resolved.samples[0].width, resolved.samples[0].height) == (1024, 1024)
    # the limits' memory bound stays: above the native size is still a 422
    with pytest.raises(RequestError, match="width=1032 is above the maximum 1024"):
        resolve_request(GenerateRequest(prompt="a", width=1032), STYLE_NAMES, sampler_config(cfg, model_info), (1024, 1024), vae_scale_factor=8)
    # a model at or below 768 keeps the default 768
    assert ServeConfig().limits_for((512, 512)).max_width == 768

    # Deploy (the args of `serve run serve/config.yaml`): the model replica gets only the fields the user set,
    # and refuses limits set below the native size
    def model_args(**args):
        return build_app(dict(model=str(folder), device="cpu") | args)._bound_deployment.init_args[0]._bound_deployment.init_args

    StyleModel.func_or_class(*model_args())  # unset limits: deploys
    with pytest.raises(ConfigError, match=r"native width is 1024 px .* above limits.max_width=768, .* default_size to at most 768"):
        StyleModel.func_or_class(*model_args(limits={"max_width": 768, "max_height": 768}))
    StyleModel.func_or_class(*model_args(limits={"max_width": 768, "max_height": 768}, default_size=768))

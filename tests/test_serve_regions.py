"""POST /generate with `regions` (in process, FastAPI TestClient over the tiny merged model; no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import TINY_SIZE, TINY_STEPS, tiny_model_dir

from serve.config import ServeConfig
from serve.model import StyleModelBackend
from serve.router import LocalService, create_api
from serve.schemas import MAX_REGIONS, Sample

LEFT, RIGHT = [0, 0, 0.5, 1], [0.5, 0, 1, 1]


@pytest.fixture(scope="module")
def backend():
    return StyleModelBackend(str(tiny_model_dir()), device="cpu")


@pytest.fixture(scope="module")
def client(backend):
    config = ServeConfig(model=str(backend.path), default_steps=TINY_STEPS)
    with TestClient(create_api(LocalService(backend), config)) as c:
        yield c


def gen(client, **body):
    body = {"prompt": "a red circle", "steps": TINY_STEPS, "width": TINY_SIZE, "height": TINY_SIZE, "seed": 3} | body
    return client.post("/generate", json=body)


def png(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)


def test_regions_png_with_region_header_and_equal_to_the_pipeline(client, backend):
    from dmm_ray.regions import Region

    r = gen(client, regions=[{"box": LEFT, "style": "watercolor"}, {"box": RIGHT, "style": "neon", "prompt": "a blue star"}])
    image = png(r)
    regions = json.loads(r.headers["X-Regions"])
    assert [list(g["mixture"]) for g in regions] == [["watercolor"], ["neon"]]
    assert all(set(g) == {"box", "mixture"} for g in regions)  # prompts stay out of the header (JSON answers carry them)
    direct = backend.pipe(
        ["a red circle"],
        regions=[Region(box=LEFT, style="watercolor"), Region(box=RIGHT, style="neon", prompt="a blue star")],
        num_inference_steps=TINY_STEPS,
        width=TINY_SIZE,
        height=TINY_SIZE,
        output_type="np",
        generator=[torch.Generator().manual_seed(3)],
    ).images[0]
    assert np.array_equal(image, (np.clip(direct, 0, 1) * 255).round().astype(int))
    assert not np.array_equal(image, png(gen(client, style="watercolor")))


def test_one_full_region_equals_the_style_and_two_same_style_bands_match(client):
    plain = png(gen(client, style="neon"))
    assert np.array_equal(png(gen(client, regions=[{"box": [0, 0, 1, 1], "style": "neon"}])), plain)
    bands = png(gen(client, regions=[{"box": [0, 0, 1, 0.5], "style": 1}, {"box": [0, 0.5, 1, 1], "weights": {"neon": 2}}]))
    assert np.abs(bands - plain).max() <= 1  # float tolerance, rounded to uint8


def test_request_style_is_the_background_and_json_lists_regions(client):
    r = gen(client, regions=[{"box": [0.25, 0.25, 0.75, 0.75], "style": "sketch"}], style="neon", num_images=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and body["mixture"] == {"neon": 1.0}
    assert body["regions"] == [{"box": [0.25, 0.25, 0.75, 0.75], "mixture": {"sketch": 1.0}, "prompt": None}]


@pytest.mark.parametrize(
    "regions, extra, words",
    [
        ([{"box": LEFT, "style": "neon"}, {"box": RIGHT, "style": "anime"}], {}, ["regions[1]", "unknown style 'anime'", "known styles"]),
        ([{"box": LEFT, "style": 0}, {"box": RIGHT, "style": 7}], {}, ["regions[1]", "out of range"]),
        ([{"box": LEFT, "weights": {"neon": -1}}, {"box": RIGHT, "style": 0}], {}, ["regions[0]", ">= 0"]),
        ([{"box": LEFT, "style": "neon", "weights": [1, 0, 0]}, {"box": RIGHT, "style": 0}], {}, ["regions[0]", "not both"]),
        ([{"box": LEFT}, {"box": RIGHT, "style": 0}], {}, ["regions[0]", "give `style`"]),
        ([{"box": [0.6, 0, 0.4, 1], "style": 0}], {}, ["regions[0]", "box", "0 <= x0 < x1 <= 1"]),
        ([{"box": [0, 0, 1.5, 1], "style": 0}], {}, ["regions[0]", "box"]),
        ([{"box": [0, 0, 1], "style": 0}], {}, ["regions[0]", "box", "four fractions"]),
        ([{"box": LEFT, "style": 0, "colour": "red"}], {}, ["regions[0]", "unknown field 'colour'", "box"]),
        ([{"box": LEFT, "style": {"a": 1}}], {}, ["regions[0]", "style must be"]),
        ([{"box": LEFT, "style": 0}], {}, ["uncovered", "50%", "background"]),
        # a gap of one latent column (32 px over 16 cells: 2 px each), as the pipeline counts it
        (
            [{"box": LEFT, "style": 0}, {"box": [0.5625, 0, 1, 1], "style": 0}],
            {},
            ["leave 6% of the canvas uncovered (16 latent cell(s)", "x=16, y=0 px"],
        ),
        ([{"box": [0, 0, 1, 1], "style": 0, "prompt": "  "}], {}, ["regions[0]", "prompt"]),
        # a box too thin to weigh anything on the latent grid (its share of a cell rounds to 0 in float32): the
        # pipeline refuses it, which was a 500 "internal error", with a background too
        ([{"box": [0, 0, 1, 1], "style": 0}, {"box": [0, 0, 1e-50, 1], "style": 1}], {}, ["regions[1]", "covers nothing", "widen it"]),
        ([{"box": [0, 0, 1e-25, 1e-25], "style": 1}], {"style": 0}, ["regions[0]", "covers nothing", "16x16 latent grid"]),
        ([], {}, ["regions is empty"]),
        ([{"box": [0, 0, 1, 1], "style": 0}] * (MAX_REGIONS + 1), {}, [f"maximum is {MAX_REGIONS}"]),
    ],
)
def test_region_errors_are_422_naming_the_region(client, regions, extra, words):
    r = gen(client, regions=regions, **extra)
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert all(w in message for w in words), message


@pytest.mark.parametrize(
    "boxes, size",
    [
        ([LEFT, [0.5001, 0, 1, 1]], (TINY_SIZE, TINY_SIZE)),  # a sliver inside one latent column: the pipeline renders it
        ([LEFT, [0.5625, 0, 1, 1]], (TINY_SIZE, TINY_SIZE)),  # a whole latent column left: the pipeline refuses it
        ([LEFT, [0.5625, 0, 1, 1]], (TINY_SIZE, 16)),  # ... and at 16 px wide the same gap falls inside a column
        ([[0, 0, 1 / 3, 1], [1 / 3, 0, 2 / 3, 1], [2 / 3, 0, 1, 1]], (TINY_SIZE, TINY_SIZE)),
    ],
)
def test_uncovered_regions_are_refused_exactly_when_the_pipeline_refuses_them(client, backend, boxes, size):
    """Serve's coverage check is the pipeline's rule (a box covering part of a latent cell covers it): a
    request the model would render is never a 422 (an exact-area check refused slivers it renders)."""
    from dmm_ray.regions import Region, RegionError

    height, width = size
    try:
        backend.pipe("a red circle", regions=[Region(box=b, style=0) for b in boxes], num_inference_steps=1, width=width, height=height)
        renders, message = True, ""
    except RegionError as error:
        renders, message = False, str(error)
    r = gen(client, regions=[{"box": b, "style": 0} for b in boxes], width=width, height=height)
    assert r.status_code == (200 if renders else 422), r.text
    if not renders:  # the same account of the gap, with Serve's remedy
        assert r.json()["error"].split(";")[0] == message.split(";")[0], (r.json(), message)
        assert "give `style`/`weights` for the background" in r.json()["error"]


def test_backend_batch_mixes_regional_and_plain_samples_in_order(backend):
    regions = (((0.0, 0.0, 0.5, 1.0), (1.0, 0.0, 0.0), None), ((0.5, 0.0, 1.0, 1.0), (0.0, 1.0, 0.0), None))
    plain = Sample("a red circle", None, (0.0, 0.0, 1.0), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, 5)
    regional = Sample("a blue star", None, (1.0, 0.0, 0.0), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, 6, regions=regions)
    regional2 = Sample("a red circle", None, (1.0, 0.0, 0.0), TINY_STEPS, 7.0, TINY_SIZE, TINY_SIZE, 7, regions=regions)
    together = backend.generate([regional, plain, regional2])
    alone = [backend.generate([s])[0] for s in (regional, plain, regional2)]
    for a, b in zip(together, alone):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_region_window_and_region_decode_match_the_pipeline_and_need_regions(client, backend):
    from dmm_ray.regions import Region

    bands = [{"box": [i / 4, 0, (i + 1) / 4, 1], "style": s} for i, s in enumerate(["watercolor", "neon", "watercolor", "neon"])]
    wide = dict(width=4 * TINY_SIZE, height=TINY_SIZE // 2)  # wider than the model's native size: the windows are smaller than the canvas
    windows = png(gen(client, regions=bands, region_window="native", **wide))
    canvas = png(gen(client, regions=bands, **wide))
    direct = backend.pipe(
        ["a red circle"],
        regions=[Region(box=b["box"], style=b["style"]) for b in bands],
        region_window="native",
        num_inference_steps=TINY_STEPS,
        output_type="np",
        generator=[torch.Generator().manual_seed(3)],
        **wide,
    ).images[0]
    assert np.abs(windows - (direct * 255).round()).max() <= 1
    assert np.abs(windows - canvas).max() > 1  # the windowed views are another layout, not the whole canvas
    r = gen(client, style="neon", region_window="native")
    assert r.status_code == 422 and "region_window='native' goes with regions" in r.json()["error"]
    r = gen(client, regions=bands, region_window="tiles")
    assert r.status_code == 422 and "region_window" in r.json()["error"]
    decoded = png(gen(client, regions=bands, region_window="native", region_decode=True, **wide))
    direct = backend.pipe(
        ["a red circle"],
        regions=[Region(box=b["box"], style=b["style"]) for b in bands],
        region_window="native",
        region_decode=True,
        num_inference_steps=TINY_STEPS,
        output_type="np",
        generator=[torch.Generator().manual_seed(3)],
        **wide,
    ).images[0]
    assert np.abs(decoded - (direct * 255).round()).max() <= 1 and np.abs(decoded - windows).max() > 1
    r = gen(client, style="neon", region_decode=True)
    assert r.status_code == 422 and "region_decode=True goes with regions" in r.json()["error"]
    # the defaults change nothing, so they are accepted without regions (README: a client may send every
    # field), and give the image a request without them gives
    plain = png(gen(client, style="neon"))
    for default in (dict(region_window="canvas"), dict(region_decode=False), dict(feather=None)):
        assert np.array_equal(png(gen(client, style="neon", **default)), plain), default


def test_feather_sets_the_regions_edges_and_needs_regions(client, backend):
    from dmm_ray.regions import Region

    bands = [{"box": LEFT, "style": "watercolor"}, {"box": RIGHT, "style": "neon"}]
    wide = dict(width=2 * TINY_SIZE, height=TINY_SIZE)
    hard = png(gen(client, regions=bands, feather=0, **wide))
    direct = backend.pipe(
        ["a red circle"],
        regions=[Region(box=b["box"], style=b["style"]) for b in bands],
        feather=0,
        num_inference_steps=TINY_STEPS,
        output_type="np",
        generator=[torch.Generator().manual_seed(3)],
        **wide,
    ).images[0]
    assert np.abs(hard - (direct * 255).round()).max() <= 1
    assert np.abs(hard - png(gen(client, regions=bands, **wide))).max() > 1  # the default feather is soft
    assert np.array_equal(png(gen(client, regions=bands, feather=2.5, **wide)), png(gen(client, regions=bands, feather=2.5, **wide)))
    for extra, words in [
        (dict(style="neon", feather=2), "feather=2.0 goes with regions"),
        (dict(regions=bands, feather=-1), "feather"),
        (dict(regions=bands, feather=True), "feather"),
        (dict(regions=bands, feather="soft"), "feather"),
    ]:
        r = gen(client, **extra)
        assert r.status_code == 422 and words in json.dumps(r.json()), (extra, r.text)


def test_a_request_that_omits_feather_shares_a_forward_with_one_that_sends_the_default(backend):
    """The default feather is filled in before batching: omitting it and sending its value are one group
    (they were two forwards of the same images)."""
    from dmm_ray.regions import default_feather
    from serve.schemas import GenerateRequest, resolve_request

    config = ServeConfig(model=str(backend.path), default_steps=TINY_STEPS)
    f = int(backend.pipe.vae_scale_factor)
    body = dict(prompt="a red circle", regions=[{"box": LEFT, "style": "watercolor"}, {"box": RIGHT, "style": "neon"}], seed=3)
    size = dict(width=2 * TINY_SIZE, height=TINY_SIZE)
    samples = [
        resolve_request(GenerateRequest(**body, **size, **extra), backend.style_names, config, backend.native_size, vae_scale_factor=f).samples[0]
        for extra in ({}, {"feather": default_feather((TINY_SIZE, 2 * TINY_SIZE), f)})
    ]
    backend.forward_groups = []
    omitted, sent = backend.generate(samples)
    assert len(backend.forward_groups) == 1 and backend.forward_groups[0][1] == 2
    assert np.array_equal(omitted, sent)

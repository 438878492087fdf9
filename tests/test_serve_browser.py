"""Playground page end to end in headless Chromium: type a prompt, move a slider, click, an image appears.

The page is served by the same FastAPI app the Serve ingress runs (create_api), here under
uvicorn in a thread over the tiny model, so the test stays a few seconds; the Serve wiring
itself is tested in test_serve_batch.py / test_serve_cli.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from serve_helpers import free_port, tiny_model_dir, wait_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing (skip only where apt is unavailable)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Debian chromium missing and apt-get is unavailable (or not root): `apt-get install -y chromium`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=900)
    assert CHROMIUM.exists(), "apt-get installed chromium but /usr/bin/chromium is missing"
    return CHROMIUM


def serve_in_thread(api):
    """Run the FastAPI app with uvicorn in a daemon thread; yield its URL once /healthz answers."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def playground_url():
    """The router app over the tiny model on a loopback port (uvicorn in a thread)."""
    from serve.config import ServeConfig
    from serve.model import StyleModelBackend
    from serve.router import LocalService, create_api

    cfg = ServeConfig(model=str(tiny_model_dir()), default_steps=2)
    api = create_api(LocalService(StyleModelBackend(cfg.model, device="cpu")), cfg)
    yield from serve_in_thread(api)


@contextlib.contextmanager
def chromium_page():
    """A new page in headless Chromium (skips where python playwright is missing)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright missing: pip install playwright")
    chromium = ensure_chromium()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def wait_for_image(page) -> None:
    page.wait_for_function(
        "() => { const i = document.getElementById('image'); return !i.hidden && i.complete && i.naturalWidth > 0; }",
        timeout=60_000,
    )


def generate_and_wait(page) -> None:
    """Click Generate, wait until the image is shown, and check no error is displayed."""
    page.click("#generate")
    wait_for_image(page)
    assert page.text_content("#error") == ""


@pytest.mark.browser
def test_playground_generates_an_image(playground_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright missing: pip install playwright")
    chromium = ensure_chromium()
    url = playground_url
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            sliders = page.locator("input[type=range]")
            sliders.nth(2).wait_for()  # one slider per style, built from GET /styles
            assert sliders.count() == 3
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#seed", "5")
            sliders.nth(1).fill("60")  # fires `input`: the neon weight goes 0 -> 60
            assert page.text_content("#o1") == "60"
            # the exact jobs/export.py command for this mixture (issue 16): shown, updated with the sliders
            page.wait_for_function("() => document.getElementById('exportcmd').textContent.includes('neon=0.375')", timeout=30_000)
            command = page.text_content("#exportcmd")
            assert command.startswith("python jobs/export.py --model ") and "--weights watercolor=0.625,neon=0.375" in command, command
            generate_and_wait(page)
            meta = page.text_content("#meta")
            assert meta == "seed 5 · mixture watercolor 0.625 + neon 0.375", meta
            page.screenshot(path=str(tmp_path / "playground.png"))
        finally:
            browser.close()


@pytest.mark.browser
def test_playground_empty_boxes_mean_the_defaults_and_it_says_what_runs(playground_url, tmp_path):
    """Cleared Steps / Guidance boxes are left out of the request (the server's defaults), never sent
    as 0 (guidance 0 silently turned CFG off; steps 0 was a 422 for a box the user left empty); the page
    says it is generating, then how long it took; a server that cannot be reached is an error line."""
    with chromium_page() as page:
        page.goto(playground_url + "/")
        page.locator("input[type=range]").nth(2).wait_for()
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "")
        page.fill("#guidance", "")
        assert page.get_attribute("#guidance", "placeholder").startswith("default ")
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/generate") else None)
        page.press("#prompt", "Control+Enter")  # the keyboard way to Generate
        wait_for_image(page)
        assert sent and "steps" not in sent[0] and "guidance" not in sent[0], sent
        assert page.text_content("#status").startswith("done in ")
        page.route("**/generate", lambda route: route.abort())  # the server gone
        page.click("#generate")
        page.wait_for_function("() => document.getElementById('error').textContent.includes('could not reach the server')", timeout=30_000)
        assert page.is_enabled("#generate") and page.text_content("#status") == ""


@pytest.mark.browser
def test_playground_bands_give_each_band_a_style(playground_url, tmp_path):
    """Split the canvas into 3 vertical bands, pick a style per band: the request carries `regions`
    (one box per band, covering the canvas), the image appears and the meta line names the bands.
    The layout choice (windows + regional decode) and a wider canvas reach the request and the image."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright missing: pip install playwright")
    chromium = ensure_chromium()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/generate") else None)
            page.goto(playground_url + "/")
            page.locator("input[type=range]").nth(2).wait_for()
            assert page.locator("#bandstyles select").count() == 0  # bands off by default
            page.select_option("#bands", "3")
            assert page.locator("#bandstyles select").count() == 3
            page.select_option("#band0", "sketch")
            page.select_option("#band2", "watercolor")  # band 1 keeps its default (neon)
            assert page.locator("#bandpreview div").all_text_contents() == ["sketch", "neon", "watercolor"]
            page.select_option("#orientation", "horizontal")  # styles picked so far stay
            assert page.eval_on_selector("#bandpreview", "e => e.className") == "horizontal"
            page.select_option("#orientation", "vertical")
            page.fill("#prompt", "a red circle on a blue background")
            page.fill("#seed", "9")
            generate_and_wait(page)
            meta = page.text_content("#meta")
            assert "seed 9" in meta and "regions sketch | neon | watercolor" in meta, meta
            body = requests[-1]
            assert "weights" not in body and [r["style"] for r in body["regions"]] == ["sketch", "neon", "watercolor"]
            assert body["regions"][0]["box"] == [0, 0, 1 / 3, 1] and body["regions"][2]["box"] == [2 / 3, 0, 1, 1]
            assert "region_window" not in body and "region_decode" not in body and "width" not in body  # the defaults
            # a canvas twice the native width, each band in its own window, decoded alone
            native = int(page.get_attribute("#width", "placeholder").split()[-1])
            assert page.is_visible("#layout")
            page.select_option("#layout", "decode")
            page.fill("#width", str(2 * native))
            page.fill("#feather", "0")  # hard panels
            page.fill("#seed", "10")
            generate_and_wait(page)
            page.wait_for_function("() => document.getElementById('meta').textContent.includes('seed 10')", timeout=60_000)
            body = requests[-1]
            assert body["region_window"] == "native" and body["region_decode"] is True and body["width"] == 2 * native, body
            assert body["feather"] == 0, body
            page.wait_for_function(
                f"() => {{ const i = document.getElementById('image'); return i.complete && i.naturalWidth === {2 * native}; }}", timeout=30_000
            )
            assert page.eval_on_selector("#image", "i => i.naturalHeight") == native
            # bands off again: back to the slider mixture, and the layout choice is hidden and not sent
            page.select_option("#bands", "1")
            assert not page.is_visible("#layout")
            page.click("#generate")
            page.wait_for_function("() => document.getElementById('meta').textContent.includes('mixture')", timeout=60_000)
            assert "regions" not in requests[-1] and "weights" in requests[-1]
            assert "region_decode" not in requests[-1] and "feather" not in requests[-1]
            page.screenshot(path=str(tmp_path / "playground_bands.png"))
        finally:
            browser.close()


EVIL_NAME = "<img src=x onerror=alert(1)>"
EVIL_DESCRIPTION = '"><script>alert(2)</script><b>bold</b>'


@pytest.fixture
def evil_playground_url():
    """The router over the tiny model, but the model's styles are named like an attack: the page must
    show the names as text and run nothing (the style list comes from a model folder, not the operator)."""
    from serve.config import ServeConfig
    from serve.model import StyleModelBackend
    from serve.router import LocalService, ModelInfo, create_api
    from serve.schemas import StyleInfo

    cfg = ServeConfig(model=str(tiny_model_dir()), default_steps=2)

    class EvilNames(LocalService):
        async def info(self, refresh=False):
            info = await super().info(refresh)
            styles = [StyleInfo(index=0, name=EVIL_NAME, description=EVIL_DESCRIPTION)] + info.styles[1:]
            return ModelInfo(styles, info.native_size)

    api = create_api(EvilNames(StyleModelBackend(cfg.model, device="cpu")), cfg)
    yield from serve_in_thread(api)


@pytest.mark.browser
def test_playground_shows_html_in_style_names_as_text(evil_playground_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright missing: pip install playwright")
    chromium = ensure_chromium()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(evil_playground_url + "/")
            page.locator("input[type=range]").nth(2).wait_for()
            styles = page.locator("#styles")
            assert styles.locator("img").count() == 0 and styles.locator("script").count() == 0
            assert styles.locator("b").count() == 0
            text = styles.inner_text()
            assert EVIL_NAME in text and "<script>alert(2)</script>" in text, text
            assert page.eval_on_selector("#w0", "e => e.dataset.style") == EVIL_NAME
            assert page.eval_on_selector("#w0", "e => e.getAttribute('aria-label')") == "weight of " + EVIL_NAME
            assert page.eval_on_selector("#styles span", "e => e.title") == EVIL_DESCRIPTION
            page.select_option("#bands", "2")  # the band selects and the preview show the name as text too
            assert page.locator("#bandpreview img").count() == 0
            assert page.locator("#bandpreview div").first.text_content() == EVIL_NAME
            page.wait_for_timeout(500)
            assert dialogs == [], dialogs
        finally:
            browser.close()


@pytest.mark.browser
def test_playground_error_line_says_when_to_retry(playground_url):
    """A 503 (the model at capacity, its replica restarting; or Ray Serve's own backpressure, whose body
    is plain text) carries Retry-After: the error line says how long to wait, not only 'retry later'."""
    with chromium_page() as page:
        page.goto(playground_url + "/")
        page.locator("input[type=range]").nth(2).wait_for()
        page.fill("#prompt", "a red circle")
        busy = {"status": 503, "headers": {"Retry-After": "7"}, "content_type": "application/json"}
        page.route("**/generate", lambda route: route.fulfill(**busy, body='{"error": "the model is at capacity; retry later"}'))
        page.click("#generate")
        page.wait_for_function("() => document.getElementById('error').textContent !== ''", timeout=30_000)
        assert page.text_content("#error") == "503: the model is at capacity; retry later (Retry-After: try again in 7 s)"
        page.unroute("**/generate")
        page.route("**/generate", lambda route: route.fulfill(status=503, headers={"Retry-After": "3"}, body="Service Unavailable"))
        page.click("#generate")
        page.wait_for_function("() => document.getElementById('error').textContent.includes('3 s')", timeout=30_000)
        assert page.text_content("#error").startswith("503: ")
        page.unroute("**/generate")
        page.route("**/generate", lambda route: route.fulfill(status=422, content_type="application/json", body='{"error": "steps must be >= 1"}'))
        page.click("#generate")
        page.wait_for_function("() => document.getElementById('error').textContent.includes('steps')", timeout=30_000)
        assert page.text_content("#error") == "422: steps must be >= 1"  # no Retry-After: nothing to wait for


@pytest.mark.browser
def test_playground_export_box_says_when_the_server_cannot_be_reached(playground_url):
    """The export command follows the sliders through POST /export_command; when that cannot reach the
    server the box says so, instead of keeping the previous mixture's command as if it were this one's."""
    with chromium_page() as page:
        page.goto(playground_url + "/")
        sliders = page.locator("input[type=range]")
        sliders.nth(2).wait_for()
        page.wait_for_function("() => document.getElementById('exportcmd').textContent.startsWith('python jobs/export.py')", timeout=30_000)
        page.route("**/export_command", lambda route: route.abort())  # the server gone
        sliders.nth(1).fill("60")
        page.wait_for_function("() => !document.getElementById('exportcmd').textContent.startsWith('python')", timeout=30_000)
        assert page.text_content("#exportcmd").startswith("(could not reach the server ("), page.text_content("#exportcmd")
        page.unroute("**/export_command")  # back: the next slider move shows this mixture's command
        sliders.nth(1).fill("100")
        page.wait_for_function("() => document.getElementById('exportcmd').textContent.includes('neon=0.5')", timeout=30_000)


@pytest.fixture
def accented_playground_url():
    """The router over the tiny model with its first style named with a non-ASCII letter ('café')."""
    from serve.config import ServeConfig
    from serve.model import StyleModelBackend
    from serve.router import LocalService, ModelInfo, create_api
    from serve.schemas import StyleInfo

    cfg = ServeConfig(model=str(tiny_model_dir()), default_steps=2)

    class Accented(LocalService):
        async def info(self, refresh=False):
            info = await super().info(refresh)
            return ModelInfo([StyleInfo(index=0, name="café", description="")] + info.styles[1:], info.native_size)

    yield from serve_in_thread(create_api(Accented(StyleModelBackend(cfg.model, device="cpu")), cfg))


@pytest.mark.browser
def test_playground_meta_line_shows_style_names_as_written(accented_playground_url):
    """X-Style-Mixture is JSON with \\u escapes (HTTP headers are ASCII): the meta line decodes it, so a
    style named 'café' reads 'café', not 'caf\\u00e9'."""
    with chromium_page() as page:
        page.goto(accented_playground_url + "/")
        page.locator("input[type=range]").nth(2).wait_for()
        page.fill("#prompt", "a red circle")
        page.fill("#seed", "3")
        generate_and_wait(page)
        assert page.text_content("#meta") == "seed 3 · mixture café 1", page.text_content("#meta")

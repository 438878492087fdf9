"""Playground page end to end in headless Chromium: type a prompt, move a slider, click, an image appears.

The page is served by the same FastAPI app the Serve ingress runs (create_api), here under
uvicorn in a thread over the tiny model, so the test stays a few seconds; the Serve wiring
itself is tested in test_serve_batch.py / test_serve_cli.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serve_helpers import free_port, tiny_model_dir, wait_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


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


@pytest.fixture
def playground_url():
    """The router app over the tiny model on a loopback port (uvicorn in a thread)."""
    import threading

    import uvicorn

    from serve.config import ServeConfig
    from serve.model import StyleModelBackend
    from serve.router import LocalService, create_api

    cfg = ServeConfig(model=str(tiny_model_dir()), default_steps=2)
    api = create_api(LocalService(StyleModelBackend(cfg.model, device="cpu")), cfg)
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
            page.wait_for_function(
                "() => document.getElementById('exportcmd').textContent.includes('neon=0.375')", timeout=30_000)
            command = page.text_content("#exportcmd")
            assert command.startswith("python jobs/export.py --model ") and "--weights watercolor=0.625,neon=0.375" in command, command
            page.click("#generate")
            page.wait_for_function(
                "() => { const i = document.getElementById('image'); return !i.hidden && i.complete && i.naturalWidth > 0; }",
                timeout=60_000,
            )
            assert page.text_content("#error") == ""
            meta = page.text_content("#meta")
            assert "seed 5" in meta and '"watercolor": 0.625' in meta and '"neon": 0.375' in meta, meta
            page.screenshot(path=str(tmp_path / "playground.png"))
        finally:
            browser.close()

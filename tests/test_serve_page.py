"""The chat page of `minicpmv-serve` in a real headless Chromium (Debian's, driven by Playwright): upload an
image, ask, see the answer stream in, ask a follow-up, start over. The screenshot is kept as a test artefact
in tests/artifacts/ (git-ignored). `.ci/run` installs Chromium and sets MINICPMV_REQUIRE_BROWSER=1, so CI
fails instead of skipping when the browser is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from serving_server import Server, picture, png_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser_available() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (apt-get install -y chromium; .ci/run does it)"
    return None


missing = _browser_available()
if missing and os.environ.get("MINICPMV_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"the browser test cannot run: {missing}")
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


@pytest.fixture(scope="module")
def server(tiny_checkpoint_fp32, tmp_path_factory):
    srv = Server(
        ["--model", str(tiny_checkpoint_fp32), "--served-model-name", "tiny", "--max-tokens", "16"],
        tmp_path_factory.mktemp("logs") / "page-server.log",
    )
    yield srv
    srv.stop()


def test_chat_page_uploads_asks_streams_and_starts_over(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image_file = tmp_path / "picture.png"
    image_file.write_bytes(png_bytes(picture(120, 80, seed=3)))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(server.url + "/")
            expect(page.locator("#model-name")).to_have_text("(tiny)", timeout=30_000)
            page.set_input_files("#file", str(image_file))
            expect(page.locator("#preview img")).to_have_count(1)
            page.fill("#question", "What is in this picture?")
            page.click("#send")
            first = page.locator(".msg.assistant").nth(0)
            expect(first).to_have_attribute("data-finish", "length", timeout=120_000)  # 16 tokens, --max-tokens
            assert first.inner_text().strip()
            expect(page.locator(".msg.user img")).to_have_count(1)  # the picture is shown with the question
            page.fill("#question", "And what colour is it?")
            page.press("#question", "Enter")  # Enter sends
            second = page.locator(".msg.assistant").nth(1)
            expect(second).to_have_attribute("data-finish", "length", timeout=120_000)
            assert second.inner_text().strip()
            shot = ARTIFACTS / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the chat page: {shot}")
            page.click("#reset")
            expect(page.locator(".msg")).to_have_count(0)
            assert not errors, errors
        finally:
            context.close()
    health = server.health()
    assert health["completed"] == 2 and health["failed"] == 0

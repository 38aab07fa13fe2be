"""The chat page of `minicpmv-serve` in a real headless Chromium (Debian's, driven by Playwright): upload an
image, ask, see the answer stream in, ask a follow-up, start over. The screenshot is kept as a test artefact
in tests/artifacts/ (git-ignored). `.ci/run` installs Chromium and sets MINICPMV_REQUIRE_BROWSER=1, so CI
fails instead of skipping when the browser is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
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


def _serve(checkpoint, logs, max_tokens: int):
    srv = Server(["--model", str(checkpoint), "--served-model-name", "tiny", "--max-tokens", str(max_tokens)], logs / "page-server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(tiny_checkpoint_fp32, tmp_path_factory):
    yield from _serve(tiny_checkpoint_fp32, tmp_path_factory.mktemp("logs"), 16)


@pytest.fixture(scope="module")
def long_server(tiny_checkpoint_fp32, tmp_path_factory):
    yield from _serve(tiny_checkpoint_fp32, tmp_path_factory.mktemp("logs"), 2000)


@contextlib.contextmanager
def _chat_page(tmp_path, url: str, route: tuple | None = None):
    """A headless Chromium on the chat page at `url`, once the page has listed the model: (page, the page's
    JavaScript errors so far). `route` (pattern, handler) passes the page's requests matching it to the handler."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page, errors = context.new_page(), []
            page.on("pageerror", lambda err: errors.append(str(err)))
            if route:
                page.route(*route)
            page.goto(url)
            expect(page.locator("#model-name")).to_have_text("(tiny)", timeout=30_000)
            yield page, errors
        finally:
            context.close()


def test_chat_page_uploads_asks_streams_and_starts_over(server, tmp_path):
    from playwright.sync_api import expect

    image_file = tmp_path / "picture.png"
    image_file.write_bytes(png_bytes(picture(120, 80, seed=3)))
    ARTIFACTS.mkdir(exist_ok=True)
    with _chat_page(tmp_path, server.url + "/") as (page, errors):
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
    health = server.health()
    assert health["completed"] == 2 and health["failed"] == 0


def test_the_page_works_under_a_path_prefix_and_gives_back_a_question_a_proxy_refused(server, tmp_path):
    """Behind a proxy that serves it at /minicpmv/ (played by the browser's request routing, the server real):
    every call stays under the prefix; the proxy's HTML 413 for the first question shows as HTTP 413, the
    question and its picture come back to be sent again, and sent again they are answered. An Enter that picks
    an input method's candidate sends nothing; a picture larger than the model reads is scaled down to send."""
    from playwright.sync_api import expect

    image_file = tmp_path / "picture.png"
    image_file.write_bytes(png_bytes(picture(96, 64, seed=5)))
    outside, refused = [], []

    def proxy(route):
        path = route.request.url.removeprefix(server.url)
        if not path.startswith("/minicpmv/"):
            outside.append(path)
            return route.abort()
        if path.endswith("/v1/chat/completions") and not refused:
            refused.append(path)
            return route.fulfill(
                status=413, content_type="text/html", body="<html><body><h1>413 Request Entity Too Large</h1></body></html>"
            )
        return route.fulfill(response=route.fetch(url=server.url + path.removeprefix("/minicpmv")))

    with _chat_page(tmp_path, server.url + "/minicpmv/", route=("**/*", proxy)) as (page, _):
        page.set_input_files("#file", str(image_file))
        expect(page.locator("#preview img")).to_have_count(1)
        page.fill("#question", "What is in this picture?")
        page.locator("#question").evaluate(
            "q => q.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', keyCode: 229, isComposing: true, bubbles: true}))"
        )
        expect(page.locator(".msg")).to_have_count(0)
        page.press("#question", "Enter")
        expect(page.locator(".msg.error")).to_contain_text("HTTP 413", timeout=30_000)
        expect(page.locator(".msg.user.unsent")).to_have_count(1)
        expect(page.locator("#question")).to_have_value("What is in this picture?")
        expect(page.locator("#preview img")).to_have_count(1)
        page.click("#send")
        answer = page.locator(".msg.assistant").last
        expect(answer).to_have_attribute("data-finish", "length", timeout=120_000)
        assert answer.inner_text().strip()
        expect(page.locator(".msg.user img")).to_have_count(2)  # shown with the refused question and the answered one
        # a picture larger than the model reads is scaled down (aspect kept) before it is attached
        large = tmp_path / "large.png"
        Image.new("RGB", (2600, 2000), (30, 120, 200)).save(large)
        page.set_input_files("#file", str(large))
        expect(page.locator("#preview img")).to_have_count(1)
        width, height, src = page.locator("#preview img").evaluate(
            "img => img.decode().then(() => [img.naturalWidth, img.naturalHeight, img.src.slice(0, 15)])"
        )
        assert src == "data:image/jpeg" and width * height <= 4_000_000 and abs(width / height - 1.3) < 0.01, (width, height, src)
    assert refused and not outside, outside


def test_stop_and_start_over_end_the_answer_being_streamed(long_server, tmp_path):
    """Stop ends the answer being streamed (the server cancels it) and keeps what came in the conversation; Start
    over during an answer cancels it too, and the new conversation's first request carries nothing of the old
    one. Questions starting with "long" are asked for at least 1,800 tokens, the others for 16 (set on the way)."""
    import json

    from playwright.sync_api import expect

    sent = []

    def lengthen(route):
        body = json.loads(route.request.post_data)
        sent.append(body["messages"])
        if body["messages"][-1]["content"].startswith("long"):
            body["min_tokens"] = 1800
        else:
            body["max_tokens"] = 16
        route.continue_(post_data=json.dumps(body))

    with _chat_page(tmp_path, long_server.url + "/", route=("**/v1/chat/completions", lengthen)) as (page, _):
        page.fill("#question", "long answer, please")
        page.press("#question", "Enter")
        first = page.locator(".msg.assistant").last
        expect(first).not_to_have_text("", timeout=60_000)  # streaming has begun
        page.click("#stop")
        expect(first).to_have_attribute("data-finish", "stopped", timeout=10_000)
        expect(page.locator("#send")).to_be_enabled()
        kept = first.inner_text()
        page.fill("#question", "short one")
        page.press("#question", "Enter")
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-finish", "length", timeout=120_000)
        assert [m["role"] for m in sent[-1]] == ["user", "assistant", "user"]
        assert sent[-1][1]["content"].strip() == kept.strip()  # the stopped answer, as far as it came
        page.fill("#question", "long again")
        page.press("#question", "Enter")
        expect(page.locator(".msg.assistant").last).not_to_have_text("", timeout=60_000)
        page.click("#reset")
        expect(page.locator(".msg")).to_have_count(0)
        expect(page.locator("#send")).to_be_enabled()
        page.fill("#question", "a new start")
        page.press("#question", "Enter")
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-finish", "length", timeout=120_000)
        assert sent[-1] == [{"role": "user", "content": "a new start"}]
        expect(page.locator(".msg")).to_have_count(2)  # the cancelled answer did not come back into the page
    deadline = time.monotonic() + 30
    while long_server.health()["cancelled"] < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    health = long_server.health()
    assert health["cancelled"] == 2 and health["failed"] == 0, health

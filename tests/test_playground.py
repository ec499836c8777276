"""The playground page at /, in a real browser: Debian's Chromium, driven by Playwright's Python API, against
`polargrid-local serve` on loopback (with an API key, so the page has to ask for it).

Chromium comes from the system packages (`make browser`); Playwright never downloads one. Without either, the
browser tests skip and say which is missing. PLAYGROUND_SCREENSHOT=path saves a screenshot of the page there.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import CHAT, MODELS_FILE, ROOT, SENTENCES, word_error_rate

CHROMIUM = os.environ.get("POLARGRID_CHROMIUM", "/usr/bin/chromium")
KEY = "playground-key"
WAIT_MS = 180_000  # generation on 2 shared cores


def why_no_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python package is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM}: `make browser` installs Debian's (or set POLARGRID_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def served():
    """`polargrid-local serve` in its own process on a free loopback port; its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "polargrid_local", "--models", str(MODELS_FILE), "serve",
                             "--host", "127.0.0.1", "--port", "0", "--api-key", KEY, "--metrics-open",
                             "--log-level", "warning"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url, lines = None, []
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"serving on (http://\S+)", line)
        url = found.group(1) if found else None
    if url is None:
        proc.kill()
        pytest.fail("serve did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep its pipe drained
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def speech_file(served, tmp_path_factory):
    audio = httpx.post(served + "/v1/audio/speech", headers={"Authorization": f"Bearer {KEY}"}, timeout=120, json={
        "model": "tts-1", "input": SENTENCES[0], "voice": "alloy", "response_format": "wav"})
    assert audio.status_code == 200 and audio.content[:4] == b"RIFF"
    path = tmp_path_factory.mktemp("audio") / "fox.wav"
    path.write_bytes(audio.content)
    return path


@pytest.fixture(scope="module")
def page(served, speech_file, tmp_path_factory):
    reason = why_no_browser()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
                  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                  f"--use-file-for-fake-audio-capture={speech_file}"],
            viewport={"width": 1280, "height": 900})
        context.grant_permissions(["microphone"], origin=served)
        tab = context.new_page()
        tab.set_default_timeout(WAIT_MS)
        problems: list[str] = []
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
        tab.problems = problems
        tab.goto(served + "/")
        yield tab
        context.close()


def test_the_page_asks_for_the_key_and_then_lists_the_models(page):
    page.wait_for_selector("#key-form", state="visible")
    page.fill("#api-key", "wrong-key")
    page.click("#key-form button")
    page.wait_for_selector("#key-error:has-text('Invalid or missing API key')")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#key-form", state="hidden")
    page.wait_for_selector(f"#models-table tr[data-model='{CHAT}']")
    assert CHAT in page.eval_on_selector_all("#chat-model option", "options => options.map(o => o.value)")
    assert "healthy" in page.text_content("#health")
    assert not [p for p in page.problems if "pageerror" in p]


def test_chat_streams_its_answer_with_first_token_time_and_speed(page):
    page.select_option("#chat-model", CHAT)
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "24")
    page.evaluate("""() => { window.mutations = 0;
        new MutationObserver(records => { window.mutations += records.length; })
            .observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true}); }""")
    page.fill("#chat-input", "<b>Say hello</b> <img src=x onerror=alert(1)>")
    page.click("#chat-send")
    page.wait_for_selector("#chat-stats:has-text('tokens/s')")
    stats = page.text_content("#chat-stats")
    assert re.search(r"first token \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens", stats), stats
    answer = page.text_content("#chat-log .msg.assistant .text")
    assert answer.strip()
    assert page.evaluate("window.mutations") >= 3, "the answer arrived in pieces, as it streamed"
    assert page.text_content("#chat-log .msg.user .text") == "<b>Say hello</b> <img src=x onerror=alert(1)>"
    assert page.locator("#chat-log b, #chat-log img").count() == 0, "what the page shows is text, never markup"


def test_speak_gives_playable_audio(page):
    page.fill("#speak-input", "The quick brown fox jumps over the lazy dog.")
    page.select_option("#speak-format", "wav")
    page.click("#speak-go")
    page.wait_for_selector("#speak-info:has-text('KB of wav')")
    page.wait_for_function("() => document.getElementById('speak-audio').duration > 1")
    assert page.evaluate("document.getElementById('speak-audio').src").startswith("blob:")
    assert page.evaluate("document.getElementById('speak-audio').play().then(() => true)")
    assert page.get_attribute("#speak-download", "download") == "speech.wav"


def test_uploading_a_wav_shows_its_transcript(page, speech_file):
    page.set_input_files("#transcribe-file", str(speech_file))
    page.click("#transcribe-go")
    page.wait_for_selector("#transcribe-info:has-text('fox.wav:')")
    assert word_error_rate(SENTENCES[0], page.text_content("#transcript")) < 0.2


def test_recording_from_the_microphone_is_transcribed(page):
    """Chromium's fake microphone plays the test WAV; the recording goes up as webm and comes back as text."""
    page.evaluate("document.getElementById('transcript').textContent = ''")
    page.click("#record")
    page.wait_for_selector("#record:has-text('Stop recording')")
    page.wait_for_timeout(4000)
    page.click("#record")
    page.wait_for_selector("#transcribe-info:has-text('recording.')")
    page.wait_for_function("() => document.getElementById('transcript').textContent.length > 0")
    heard = page.text_content("#transcript").lower()
    assert sum(word in heard for word in ("quick", "brown", "fox", "jumps", "lazy", "dog")) >= 3, heard


def test_models_panel_loads_and_unloads_a_model(page):
    row = "#models-table tr[data-model='smollm2-135m-embed']"
    page.click(f"{row} button:has-text('Load')")
    page.wait_for_selector(f"{row} td.state-loaded")
    assert page.text_content(f"{row} td:nth-child(4)").endswith(" MB")
    page.click(f"{row} button:has-text('Unload')")
    page.wait_for_selector(f"{row} td:nth-child(3):has-text('not loaded')")
    assert "freed" in page.text_content("#models-info")
    shot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if shot:
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=shot, full_page=True)
    assert not page.problems, page.problems


def test_the_page_is_open_static_and_locked_to_its_origin(served):
    index = httpx.get(served + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    policy = index.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert not re.search(r"(src|href)=\"(https?:)?//", index.text), "nothing is loaded from another origin"
    script = httpx.get(served + "/playground/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", script.text)
    assert httpx.get(served + "/playground/nope.js").status_code == 404
    assert httpx.get(served + "/playground/..%2f__init__.py").status_code == 404
    assert httpx.get(served + "/v1/models").status_code == 401, "the API still needs the key"
    assert httpx.get(served + "/metrics").status_code == 200, "serve --metrics-open"

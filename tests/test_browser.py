"""The chat page in a real browser: headless Chromium (Debian's, driven by Playwright) on the running app.

The page is loaded from the session app and talks to the real router and the
real vLLM CPU engine over its WebSocket, as a person's browser would. What
the page shows is read from the DOM: the reply's text as it grows (a
MutationObserver in the page stamps every change), its status
(``data-status``: waiting, streaming, done, stopped, error) and its meta line.
The engine's own running count in ``/health`` shows that Stop aborts the
engine request. Nothing asserts a speed: only orderings.

``scripts/install.sh`` installs Chromium with apt; Playwright's own browser
downloads are not used (``executable_path`` is the system Chromium).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.test_websocket import engine_idle, engine_running

pytestmark = pytest.mark.integration

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
STORY = "Write a very long story about a lighthouse keeper and the sea, with many chapters."

# Stamps every change of the newest reply: [Date.now(), its text length, its status].
WATCH_REPLIES = """
window.__changes = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.message.assistant');
  const reply = replies[replies.length - 1];
  if (reply) window.__changes.push([Date.now(), reply.querySelector('.content').textContent.length,
                                    reply.dataset.status]);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true,
                                                attributes: true});
"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no chromium on PATH: scripts/install.sh installs Debian's chromium with apt")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 900, "height": 900})
    yield context
    context.close()


def open_page(context, base_url, max_tokens: int | None = None):
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.errors = errors
    page.goto(base_url + "/")
    page.wait_for_selector("#connection:text('connected')")
    page.evaluate(WATCH_REPLIES)
    if max_tokens is not None:
        page.click("#settings summary")
        page.fill("#max-tokens", str(max_tokens))
    return page


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page):
    return page.locator(".message.assistant").last


def wait_status(page, statuses: str, timeout_s: float = 120):
    """Wait until the newest reply's status is one of ``statuses`` (space-separated); return it."""
    selector = ", ".join(f".message.assistant:last-child[data-status='{s}']" for s in statuses.split())
    page.wait_for_selector(selector, timeout=timeout_s * 1000)
    return last_reply(page).get_attribute("data-status")


def wait_js(page, expression: str, timeout_s: float = 120):
    """Poll a JavaScript expression until true (the page's CSP forbids eval, which wait_for_function uses)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout_s}s: {expression}"
        time.sleep(0.05)


def lengths_while_streaming(page) -> list[int]:
    return [length for _, length, status in page.evaluate("window.__changes") if status == "streaming"]


def test_the_page_streams_a_markdown_reply_with_its_class_ttft_and_speed(context, base_url):
    page = open_page(context, base_url, max_tokens=48)
    assert page.title() == "Chat" and page.is_visible("#new-chat") and page.is_visible("#prompt")
    send(page, QUESTION)
    assert wait_status(page, "done error") == "done"
    reply = last_reply(page)
    assert "Paris" in reply.locator(".content").inner_text()
    grew = lengths_while_streaming(page)
    assert len(set(grew)) >= 3 and grew == sorted(grew), grew  # the answer grew in steps, never shrank
    meta = reply.locator(".meta").inner_text()
    assert meta.startswith("high · TTFT ") and " ms · " in meta and " tok/s · " in meta and " tokens" in meta, meta
    assert page.locator(".message.user").inner_text() == QUESTION
    assert not page.errors, page.errors


@pytest.mark.skipif(not os.environ.get("CHAT_SCREENSHOT"), reason="set CHAT_SCREENSHOT=docs/img/chat.png")
def test_screenshot_of_a_finished_reply(context, base_url):
    """The README's picture (docs/img/chat.png), taken from the real app."""
    page = open_page(context, base_url, max_tokens=160)
    send(page, QUESTION)
    wait_status(page, "done")
    send(page, "Give me three tips for learning Python, as a numbered list with a short code example.")
    assert wait_status(page, "done error") == "done"
    page.click("#settings summary")  # folded away again
    page.screenshot(path=str(REPO_ROOT / os.environ["CHAT_SCREENSHOT"]), full_page=False)


def test_stop_ends_a_long_reply_midway_and_the_engine_request_with_it(context, base_url):
    page = open_page(context, base_url, max_tokens=2000)
    send(page, STORY)
    wait_js(page, "window.__changes.filter(c => c[2] === 'streaming').length >= 5")
    assert engine_running(base_url)["running"] > 0
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    assert wait_status(page, "stopped done error") == "stopped"
    assert engine_idle(base_url)["running"] == 0
    meta = last_reply(page).locator(".meta").inner_text()
    assert "stopped" in meta and int(meta.split(" tokens")[0].split(" ")[-1]) < 2000, meta
    assert not page.is_enabled("#stop") and page.is_enabled("#send")
    send(page, QUESTION)  # the conversation goes on over the same socket
    assert wait_status(page, "done error") == "done"


def test_an_over_limit_prompt_shows_the_servers_error(context, base_url, model_id):
    prompt = "hello " * 8999 + "hello"  # the page trims what is typed
    expected = httpx.post(base_url + "/v1/chat/completions", timeout=120, json={
        "model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": 512}).json()
    page = open_page(context, base_url, max_tokens=512)
    send(page, prompt)
    assert wait_status(page, "done error") == "error"
    shown = last_reply(page).locator(".error-text").inner_text()
    assert shown == f"Error 400: {expected['error']['message']}" and "context" in shown
    send(page, QUESTION)  # the refused prompt is not part of the conversation: the next turn is served
    assert wait_status(page, "done error") == "done"


def test_two_tabs_stream_at_once(context, base_url):
    tabs = [open_page(context, base_url, max_tokens=120) for _ in range(2)]
    for tab, topic in zip(tabs, ("the sea", "the mountains")):
        send(tab, f"Write a story about {topic}.")
    for tab in tabs:
        wait_status(tab, "done error")
    spans = []
    for tab in tabs:
        stamps = [at for at, _, status in tab.evaluate("window.__changes") if status == "streaming"]
        assert len(stamps) >= 3
        spans.append((min(stamps), max(stamps)))
    (first_a, last_a), (first_b, last_b) = spans
    # Each tab received text while the other was still receiving: they streamed at the same time.
    assert first_a < last_b and first_b < last_a, spans


def test_a_system_prompt_goes_with_each_turn_and_new_chat_starts_over(context, base_url):
    page = open_page(context, base_url, max_tokens=4)

    def prompt_tokens() -> int:
        title = last_reply(page).locator(".meta").get_attribute("title")
        return int(title.split("prompt ")[1].split(" tokens")[0])

    send(page, QUESTION)
    wait_status(page, "done")
    plain = prompt_tokens()
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.fill("#system-prompt", "You are a patient geography teacher for a class of ten-year-olds. Answer "
                                "every question in one short, friendly sentence, name the country and the "
                                "continent, and never use words a child would not know.")
    send(page, QUESTION)
    wait_status(page, "done")
    # The system prompt went with the question (the model's template has a shorter default one).
    assert prompt_tokens() > plain + 10
    assert page.locator(".message").count() == 2  # only the new chat's question and answer


MARKDOWN_CASES = {
    "```python\nprint('<b>hi</b>')\n```": "<pre><code class=\"language-python\">print(&#39;&lt;b&gt;hi&lt;/b&gt;&#39;)</code></pre>",
    "- one\n- two\n  - nested\n- three": "<ul><li>one</li><li>two<ul><li>nested</li></ul></li><li>three</li></ul>",
    "1. first\n2. second": "<ol><li>first</li><li>second</li></ol>",
    "Use `x < y` and **bold** and *it*": "<p>Use <code>x &lt; y</code> and <strong>bold</strong> and <em>it</em></p>",
    "<script>alert(1)</script>": "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>",
    "## Title\ntext": "<h2>Title</h2><p>text</p>",
    "```\nunclosed mid-stream": "<pre><code>unclosed mid-stream</code></pre>",
    "[link](javascript:alert(1)) [ok](https://example.org)":
        "<p>[link](javascript:alert(1)) <a href=\"https://example.org\" target=\"_blank\" "
        "rel=\"noopener noreferrer\">ok</a></p>",
}


def test_the_pages_markdown_renderer(context, base_url):
    page = context.new_page()
    page.goto(base_url + "/")
    for source, html in MARKDOWN_CASES.items():
        assert page.evaluate("source => window.renderMarkdown(source)", source) == html, source


def test_the_page_fetches_nothing_from_elsewhere(context, base_url):
    page = context.new_page()
    hosts = set()
    page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
    page.goto(base_url + "/")
    page.wait_for_selector("#connection:text('connected')")
    assert hosts == {"127.0.0.1:8000"}, hosts
    assert "default-src 'none'" in httpx.get(base_url + "/", timeout=30).headers["content-security-policy"]
    assert httpx.get(base_url + "/web/..%2F__init__.py", timeout=30).status_code == 404

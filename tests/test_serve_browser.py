"""The chat page `fermion serve` answers at `/`, driven in headless Chromium against the real server: it shows the
model, streams the answer into the page chunk by chunk, sends the whole conversation each turn, renders text as
text, stops on request, and asks for the API key when the server wants one.

The browser is Debian's chromium (Playwright's own downloads are not used); without it the tests skip, except in CI,
where they fail: CI must install it (apt-get install chromium)."""

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import running_server, tiny_model

from fermion.chat.templates import ChatTemplate
from fermion.infer.engine import Engine
from fermion.serve.app import ServerConfig

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MAX_TOKENS = 48
PACE_S = 0.01  # per decode step while the page streams
PROMPT = "Who goes <b>there</b>?"  # markup in the text must come out as text
TIMEOUT_MS = 120_000  # a guard against a hung page, not a speed check

# Records the latest answer's length after every change to the page, to see it grow chunk by chunk, and whether
# Stop took Send's place while it did.
OBSERVE = """() => {
  window.lengths = [];
  window.stopWhileStreaming = false;
  new MutationObserver(() => {
    const texts = document.querySelectorAll('.msg.assistant .text');
    if (!texts.length) return;
    const last = texts[texts.length - 1];
    window.lengths.push(last.textContent.length);
    if (last.parentElement.dataset.state === 'streaming' && last.textContent.length > 0)
      window.stopWhileStreaming ||= !document.getElementById('stop').hidden && document.getElementById('send').hidden;
  }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
}"""


class PacedEngine(Engine):
    """The tiny model decodes a token in well under a millisecond, so a whole answer would arrive in one network
    read; pacing each decode step as a real model's would makes the stream arrive piece by piece."""

    pace = 0.0

    def step(self):
        if self.active and self.pace:
            time.sleep(self.pace)
        return super().step()


@pytest.fixture(scope="module")
def engine(shakespeare_tokenizer) -> PacedEngine:
    model = tiny_model(vocab_size=shakespeare_tokenizer.vocab_size, context_length=256, init_std=0.3)
    return PacedEngine(model, shakespeare_tokenizer, max_batch=4)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: CI must install Debian's chromium (apt-get install chromium) for the "
                        "chat page tests")
        pytest.skip("chromium is not installed (apt-get install chromium); the chat page is not tested")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 960, "height": 720})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert errors == [], f"the page raised: {errors}"


def chat(url: str, messages: list[dict], seed: int, max_tokens: int = MAX_TOKENS) -> dict:
    """What the server answers to the page's request, asked without streaming."""
    body = {"model": "tiny", "messages": messages, "temperature": 0.7, "max_tokens": max_tokens, "seed": seed}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def long_answer_seed(url: str, messages: list[dict], max_tokens: int = MAX_TOKENS) -> tuple[int, str]:
    """A seed for which the random model talks until max_tokens (it may say end-of-sequence at once), and its text."""
    for seed in range(64):
        answer = chat(url, messages, seed, max_tokens)["choices"][0]
        if answer["finish_reason"] == "length" and answer["message"]["content"]:
            return seed, answer["message"]["content"]
    raise AssertionError("no seed in 0..63 gives a full-length answer")


def settings(page, **fields: str) -> None:
    if page.locator("#settings").is_hidden():
        page.click("#settings-toggle")
    for name, value in fields.items():
        page.fill(f"#{name.replace('_', '-')}", value)


def send(page, text: str) -> dict:
    """Type a message, press Enter; the chat request the page sent."""
    page.fill("#prompt", text)
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    return request.value.post_data_json


def screenshot(page, tmp_path: Path, name: str) -> None:
    paths = [tmp_path / name]
    if os.environ.get("FERMION_SCREENSHOT_DIR"):
        paths.append(Path(os.environ["FERMION_SCREENSHOT_DIR"]) / name)
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=paths[0], full_page=True)
    for path in paths[1:]:
        shutil.copyfile(paths[0], path)
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, path


def test_the_page_streams_answers_and_keeps_the_conversation(page, engine, tmp_path):
    with running_server(engine, ServerConfig("tiny", ChatTemplate.get("chatml"))) as url:
        engine.pace = 0.0
        seed, expected = long_answer_seed(url, [{"role": "user", "content": PROMPT}])
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
        assert page.text_content("#model") == "tiny · 256 ctx"
        assert page.locator("#settings").is_hidden()
        settings(page, max_tokens=str(MAX_TOKENS), seed=str(seed))
        assert page.input_value("#temperature") == "0.7"
        page.evaluate(OBSERVE)

        engine.pace = PACE_S
        body = send(page, PROMPT)
        assert body["messages"] == [{"role": "user", "content": PROMPT}] and body["stream"] is True
        assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.7, MAX_TOKENS, seed)
        page.wait_for_selector('.msg.assistant[data-state="done"]')
        assert page.evaluate("window.stopWhileStreaming")
        assert page.is_hidden("#stop") and page.is_visible("#send")

        user = page.locator(".msg.user .text")
        assert user.text_content() == PROMPT and user.locator("b").count() == 0
        answer = page.locator(".msg.assistant .text")
        assert answer.text_content() == expected
        lengths = page.evaluate("window.lengths")
        partial = {n for n in lengths if 0 < n < len(expected)}
        assert len(partial) >= 2, f"the answer did not grow chunk by chunk: {lengths}"
        meta = page.text_content(".msg.assistant .meta")
        assert meta.startswith(f"{MAX_TOKENS} tokens · ") and "tokens/s" in meta and "cut at max tokens" in meta
        assert page.locator(".msg.error").count() == 0

        # The second turn carries the first; with a system prompt set, that leads.
        settings(page, system="Answer as a player would.")
        second = [{"role": "system", "content": "Answer as a player would."},
                  {"role": "user", "content": PROMPT}, {"role": "assistant", "content": expected},
                  {"role": "user", "content": "Stand and unfold yourself."}]
        body = send(page, "Stand and unfold yourself.")
        assert body["messages"] == second
        page.wait_for_selector('.msg.assistant:nth-child(4)[data-state="done"]')
        engine.pace = 0.0
        assert answer.nth(1).text_content() == chat(url, second, seed)["choices"][0]["message"]["content"]
        assert page.locator(".msg.error").count() == 0 and page.locator(".msg").count() == 4
        screenshot(page, tmp_path, "chat.png")
        page.emulate_media(color_scheme="dark")
        screenshot(page, tmp_path, "chat-dark.png")

        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        body = send(page, "Hail!")
        assert body["messages"] == [{"role": "system", "content": "Answer as a player would."},
                                    {"role": "user", "content": "Hail!"}]
        page.wait_for_selector('.msg.assistant[data-state="done"]')


def test_stop_ends_the_stream_and_frees_the_server(page, engine):
    with running_server(engine, ServerConfig("tiny", ChatTemplate.get("chatml"))) as url:
        engine.pace = 0.0
        seed, _ = long_answer_seed(url, [{"role": "user", "content": "Speak on!"}], 200)
        engine.pace = PACE_S
        try:
            page.goto(url)
            settings(page, max_tokens="200", seed=str(seed))
            page.evaluate(OBSERVE)
            send(page, "Speak on!")
            page.wait_for_function("window.lengths.some((n) => n > 0)")
            page.click("#stop")
            page.wait_for_selector('.msg.assistant[data-state="stopped"]')
            assert page.text_content(".msg.assistant .text") and "stopped" in page.text_content(".msg.assistant .meta")
            assert page.is_visible("#send") and page.locator(".msg.error").count() == 0
            deadline = time.monotonic() + 60
            while json.load(urllib.request.urlopen(f"{url}/health", timeout=5))["running"]:
                assert time.monotonic() < deadline, "the stopped answer still holds an engine slot"
                time.sleep(0.05)

            # "New chat" in the middle of an answer drops it, and the next conversation starts clean.
            page.evaluate(OBSERVE)
            send(page, "Speak on!")
            page.wait_for_function("window.lengths.some((n) => n > 0)")
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0 and page.is_visible("#send")
            engine.pace = 0.0
            assert send(page, "Hail!")["messages"] == [{"role": "user", "content": "Hail!"}]
            page.wait_for_selector('.msg.assistant[data-state="done"]')
            assert page.locator(".msg").count() == 2 and page.locator(".msg.error").count() == 0
        finally:
            engine.pace = 0.0


def test_the_page_asks_for_the_api_key_and_then_works(page, engine, tmp_path):
    with running_server(engine, ServerConfig("tiny", ChatTemplate.get("chatml"), api_key="k")) as url:
        engine.pace = 0.0
        page.goto(url)
        error = page.locator(".msg.error")
        error.wait_for()
        assert "401" in error.text_content() and "no API key was given" in error.text_content()
        assert page.is_visible("#api-key") and page.text_content("#model") == "not connected"
        screenshot(page, tmp_path, "chat-401.png")

        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelectorAll('.msg.error').length === 1")
        assert page.locator(".msg.user").count() == 0

        page.fill("#api-key", "wrong")
        page.click("#send")  # the unsent message waits in the box
        page.wait_for_function("document.querySelector('.msg.error')?.textContent.includes('not valid')")
        assert page.input_value("#prompt") == "Hello"

        page.fill("#api-key", "k")
        with page.expect_request("**/v1/chat/completions") as request:
            page.click("#send")
        assert request.value.headers["authorization"] == "Bearer k"
        page.wait_for_selector('.msg.assistant[data-state="done"]')
        assert page.locator(".msg.error").count() == 0 and page.text_content(".msg.user .text") == "Hello"
        assert page.text_content("#model") == "tiny · 256 ctx"

        page.reload()  # the key is remembered
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
        assert page.input_value("#api-key") == "k" and page.locator(".msg.error").count() == 0


# Server-sent events as a stream may cut them: a comment, CRLF line ends, an event's data over two lines, text
# with multi-byte characters, and nothing read after [DONE].
EVENTS = (': ping\r\n\r\ndata: {"choices": [{"delta": {"content": "Grüß — "}}]}\n\n'
          'data: {"choices": [{"delta":\ndata: {"content": "🙂 ok"}}]}\r\n\r\n'
          'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\ndata: not json\n\n')
READ_SPLIT = """async ([events, size]) => {
  const bytes = new TextEncoder().encode(events), seen = [];
  const stream = new ReadableStream({start(controller) {
    for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
    controller.close();
  }});
  await readEvents(stream, (data) => seen.push(data));
  return seen;
}"""


def test_the_event_reader_and_errors_from_the_server(page, engine):
    with running_server(engine, ServerConfig("tiny", ChatTemplate.get("chatml"))) as url:
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
        for size in (1, 2, 3, 5, 7, 64, 4096):
            seen = page.evaluate(READ_SPLIT, [EVENTS, size])
            assert [c["choices"][0]["delta"].get("content") for c in seen] == ["Grüß — ", "🙂 ok", None], size

        # An error in the middle of a stream keeps what came and says what went wrong.
        stream = ['{"choices": [{"delta": {"role": "assistant", "content": ""}}]}',
                  '{"choices": [{"delta": {"content": "Good "}}]}', '{"choices": [{"delta": {"content": "morrow"}}]}',
                  '{"error": {"message": "generation failed: out of memory", "type": "server_error"}}']
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body="".join(f"data: {s}\n\n" for s in stream)))
        send(page, "Hi")
        page.wait_for_selector('.msg.assistant[data-state="error"]')
        assert page.text_content(".msg.assistant .text") == "Good morrow"
        assert "generation failed: out of memory" in page.text_content(".msg.error")

        # A refusal before any answer shows the server's message and takes the turn back for another try.
        page.unroute("**/v1/chat/completions")
        page.route("**/v1/chat/completions", lambda route: route.fulfill(status=429, json={"error": {
            "message": "the waiting line is full (256 requests); try again shortly", "type": "rate_limit_error",
            "param": None, "code": "server_busy"}}))
        send(page, "Again?")
        page.wait_for_function("document.querySelector('.msg.error')?.textContent.includes('waiting line is full')")
        assert page.text_content(".msg.error") == "Error 429the waiting line is full (256 requests); try again shortly"
        assert page.locator(".msg").count() == 3 and page.input_value("#prompt") == "Again?"
        assert page.is_visible("#send") and page.is_hidden("#stop") and page.is_hidden("#settings")

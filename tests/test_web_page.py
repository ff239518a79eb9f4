"""The chat page at ``/``: served from the package under a policy that allows nothing remote,
and used the way a person uses it, in a real headless Chromium against a real server process.

The browser tests drive Debian's ``chromium`` through its ``chromedriver`` with Selenium; where
either cannot be found they skip and say so (``.ci/run`` installs both, so CI runs them).
A screenshot of the page is written to ``test-artifacts/chat-page.png``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.api.http.metrics import Metrics
from app.api.web.routes import ASSETS, CONTENT_SECURITY_POLICY
from app.core.results import Event, Finished, PhaseTimes
from app.demo import ensure_demo_model
from app.engine.llama_backend import LlamaBackend
from app.main import create_app
from app.text import Delta
from tests.support.clients import asgi_client
from tests.support.servers import ServerProcess, settings_for

ROOT = Path(__file__).resolve().parents[1]
STATIC = files("app.api.web") / "static"
ARTIFACTS = Path(os.environ.get("QWEN3_MOE_ARTIFACTS", ROOT / "test-artifacts"))

VENDORED = {
    "vendor/marked.umd.js": "f8c7f128939415995e2219e8a84bec42fab27f5980d22e361339e6901da5eadf",
    "vendor/purify.min.js": "f69a46022ab1f53e969c8ebbca98172c8995785a9b3be72ea4a12d25b1a1bf67",
}
"""marked 18.3.0 (lib/marked.umd.js) and DOMPurify 3.5.0 (dist/purify.min.js), as npm ships
them: the page's only third-party code, pinned by content."""

MARKUP_SCRIPT = (
    b"<think>", b"\n\n", b"</think>", b"\n\nSee", b" **this**", b": ",
    b"<img src=x ", b'onerror="window.__pwned=1">', b" <script>", b"window.__pwned=2", b"</script>",
    b"\n\n```python\n", b"print(1)\n", b"```", b"<|im_end|>",
)  # fmt: skip
"""An answer with markup in it: markdown to render, HTML that must stay text."""


# -- served, without a browser --------------------------------------------------------------


@pytest.fixture
async def page_client(demo_backend: LlamaBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(settings_for(), backend=demo_backend)) as client:
        yield client


@pytest.mark.anyio
async def test_the_page_and_its_assets_carry_a_policy_that_allows_nothing_remote(
    page_client: httpx.AsyncClient,
) -> None:
    for path, (name, media_type) in ASSETS.items():
        response = await page_client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == media_type
        assert response.content == (STATIC / name).read_bytes()
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert directives[directive] == "'self'"  # no inline code, no other origin


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.inline_styles = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("src", "href"):
            if values.get(key):
                self.urls.append(str(values[key]))
        if "style" in values:
            self.inline_styles += 1
        self._in_script = tag == "script" and not values.get("src")
        self.inline_styles += tag == "style"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


def test_the_page_loads_nothing_from_another_origin() -> None:
    links = _Links()
    links.feed((STATIC / "index.html").read_text(encoding="utf-8"))
    assert links.urls, "the page names its scripts and stylesheet"
    assert all(url.startswith("/") or url.startswith("data:") for url in links.urls), links.urls
    assert {url for url in links.urls if url.startswith("/")} <= set(ASSETS)
    assert links.inline_scripts == 0 and links.inline_styles == 0  # the policy would block them
    script = (STATIC / "chat.js").read_text(encoding="utf-8")
    assert not re.search(r"https?://", script)
    assert "innerHTML = DOMPurify.sanitize(" in script  # the one place markup is written


@pytest.mark.anyio
async def test_the_page_is_not_in_the_openapi_schema(page_client: httpx.AsyncClient) -> None:
    paths = (await page_client.get("/openapi.json")).json()["paths"]
    assert "/v1/chat/completions" in paths
    assert not set(paths) & set(ASSETS)


@pytest.mark.anyio
async def test_no_web_page_turns_the_page_off(demo_backend: LlamaBackend) -> None:
    app = create_app(settings_for(web_page=False), backend=demo_backend)
    async with asgi_client(app) as client:
        for path in ASSETS:
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/v1/models")).status_code == 200


@pytest.mark.anyio
async def test_with_api_keys_the_page_is_open_and_the_api_it_calls_is_not(
    demo_backend: LlamaBackend,
) -> None:
    app = create_app(settings_for(api_key="sekrit"), backend=demo_backend)
    async with asgi_client(app) as client:
        for path in ASSETS:
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/v1/models")).status_code == 401
        authorized = {"Authorization": "Bearer sekrit"}
        assert (await client.get("/v1/models", headers=authorized)).status_code == 200
        page = (await client.get("/")).text
        assert "sekrit" not in page


def test_the_vendored_libraries_are_the_pinned_files_beside_their_licences() -> None:
    for name, digest in VENDORED.items():
        assert hashlib.sha256((STATIC / name).read_bytes()).hexdigest() == digest, name
    marked = (STATIC / "vendor/marked.LICENSE.txt").read_text(encoding="utf-8")
    purify = (STATIC / "vendor/dompurify.LICENSE.txt").read_text(encoding="utf-8")
    assert "MIT License" in marked or "Permission is hereby granted" in marked
    assert "Apache License" in purify


def test_the_readme_shows_the_page_with_a_screenshot_the_browser_test_made() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/images/chat-page.png)" in readme and "--no-web-page" in readme
    image = (ROOT / "docs/images/chat-page.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n")


def _finished(reason: str = "stop") -> Finished:
    return Finished(
        finish_reason=reason,  # type: ignore[arg-type]
        prompt_tokens=3,
        completion_tokens=2,
        cached_tokens=0,
        times=PhaseTimes(queue_ms=0.0, prompt_ms=1.0, decode_ms=1.0),
    )


def _abort_count(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "qwen3_moe_serve:request_success_total", {"finished_reason": "abort"}
    )
    return value or 0.0


@pytest.mark.anyio
async def test_a_generation_its_client_leaves_is_counted_as_aborted() -> None:
    """The page's stop button, or any client that leaves, shows in the metrics as vLLM counts
    it: ``request_success_total{finished_reason="abort"}``."""
    metrics = Metrics()

    async def generation(finish: bool) -> AsyncIterator[list[Event | Finished]]:
        yield [Event(Delta(content="a"))]
        yield [Event(Delta(content="b"))]
        if finish:
            yield [_finished()]

    left = metrics.observe(generation(finish=False), time.perf_counter())
    await anext(left)
    assert isinstance(left, AsyncGenerator)
    await left.aclose()
    assert _abort_count(metrics) == 1.0

    finished = [batch async for batch in metrics.observe(generation(True), time.perf_counter())]
    assert isinstance(finished[-1][-1], Finished)
    assert _abort_count(metrics) == 1.0  # an answer that ended is not an abort


# -- in a real browser ------------------------------------------------------------------------


def _find(env: str, *candidates: str) -> str | None:
    explicit = os.environ.get(env)
    if explicit:
        return explicit
    for candidate in candidates:
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = _find("CHROMIUM", "chromium", "chromium-browser", "/usr/lib/chromium/chromium")
    driver_path = _find("CHROMEDRIVER", "chromedriver", "/usr/lib/chromium/chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "no Chromium and chromedriver found (Debian: apt-get install chromium "
            "chromium-driver; or set CHROMIUM and CHROMEDRIVER): the page is not tested in "
            "a browser"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    flags = (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",  # containers' /dev/shm is small
        "--disable-gpu",
        "--window-size=1280,860",
    )
    for flag in flags:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _open(driver: Any, url: str) -> None:
    """A fresh page: this origin's storage emptied, then loaded."""
    driver.get(url + "/web/chat.css")  # any page of the origin, to reach its storage
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/")
    driver.get_log("browser")  # only what this page logs from here on counts


def _model_id(driver: Any) -> str:
    """The model id the page shows, once it has read ``/v1/models`` ("…" until then)."""

    def shown() -> str:
        text: str = driver.find_element("id", "model-id").text
        return "" if text == "…" else text

    model_id: str = _wait("the model's id", shown)
    return model_id


def _console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _fill(driver: Any, element_id: str, value: str) -> None:
    """Set a field as typing would (its input and change events fire)."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
        element_id,
        value,
    )


def _send(driver: Any, text: str) -> None:
    _fill(driver, "prompt", text)
    driver.find_element("id", "send").click()


def _last_answer_state(driver: Any) -> str | None:
    state: str | None = driver.execute_script(
        "const m = [...document.querySelectorAll('article[data-role=assistant]')].pop();"
        "return m ? m.dataset.state : null;"
    )
    return state


def _shown_answer(driver: Any) -> str:
    """The text of the answer on the page now."""
    text: str = driver.execute_script(
        "const m = [...document.querySelectorAll('article[data-role=assistant]')].pop();"
        "return m ? m.querySelector('.content').innerText : '';"
    )
    return text


def _stored_answer(driver: Any) -> dict[str, Any]:
    stored = driver.execute_script("return localStorage.getItem('qwen3-moe-serve.conversations')")
    conversations = json.loads(stored)
    answer: dict[str, Any] = conversations[0]["messages"][-1]
    return answer


def _watch_answer(driver: Any) -> None:
    """Record the answer's text each time the page changes it while it streams."""
    driver.execute_script(
        "window.__seen = [];"
        "new MutationObserver(() => {"
        "  const m = [...document.querySelectorAll('article[data-role=assistant]')].pop();"
        "  if (m && m.dataset.state === 'streaming')"
        "    window.__seen.push(m.innerText.length);"
        "}).observe(document.getElementById('messages'),"
        "  {childList: true, subtree: true, characterData: true});"
    )


@pytest.mark.slow
def test_a_message_streams_in_with_its_thinking_and_ends_as_the_api_answers(
    browser: Any, demo_model_path: Path, tmp_path: Path
) -> None:
    with ServerProcess(demo_model_path, cache_dir=tmp_path) as server:
        _open(browser, server.url)
        model_id = _model_id(browser)
        assert model_id == "qwen3-moe-demo" or model_id == demo_model_path.stem
        context = browser.find_element("id", "model-ctx").text
        assert int(context) > 0
        _fill(browser, "temperature", "0")
        _watch_answer(browser)
        _send(browser, "Hello!")
        _wait("the answer to end", lambda: _last_answer_state(browser) == "done")
        assert browser.execute_script("return window.__seen"), "nothing drawn while streaming"

        answer = _stored_answer(browser)
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        buffered = sdk.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Hello!"}],
            temperature=0,
            extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        )
        message = buffered.choices[0].message
        reasoning = message.model_extra["reasoning_content"] if message.model_extra else None
        assert answer["content"] == message.content
        assert answer["reasoning"] == reasoning and reasoning
        shown = browser.execute_script(
            "const m = [...document.querySelectorAll('article[data-role=assistant]')].pop();"
            "return [m.querySelector('.reasoning').textContent,"
            " m.querySelector('.content').innerText,"
            " m.querySelector('details.thinking').hidden];"
        )
        assert shown[0] == reasoning  # the thinking block holds the thinking text
        assert shown[2] is False
        assert shown[1].strip() == (message.content or "").strip()
        footer = browser.find_element("css selector", "article[data-role=assistant] .timings")
        assert "time to first token" in footer.text and "tokens/s" in footer.text
        assert not browser.find_element("id", "api-key").is_displayed()  # no key asked for
        browser.find_element("css selector", "details.thinking summary").click()  # unfold it
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))
        assert _console_errors(browser) == []


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics").text
    pattern = re.escape(name + labels) + r" ([0-9.e+]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_an_answer_streams_in_and_stop_ends_it_and_the_server_counts_an_abort(
    browser: Any, slow_model_path: Path, tmp_path: Path
) -> None:
    with ServerProcess(slow_model_path, "--n-ctx", "4096", cache_dir=tmp_path) as server:
        _open(browser, server.url)
        _model_id(browser)
        _fill(browser, "max-tokens", "3000")
        _watch_answer(browser)
        _send(browser, "Write a long story.")
        # The page draws the answer as it streams in: several times before it ends.
        drawn = "return new Set(window.__seen.filter((n) => n > 0)).size"
        _wait("the answer to be drawn 3 times", lambda: browser.execute_script(drawn) >= 3)
        assert _shown_answer(browser)
        assert _last_answer_state(browser) == "streaming"
        browser.find_element("id", "stop").click()
        _wait("the page to stop", lambda: _last_answer_state(browser) == "stopped")
        kept = _stored_answer(browser)
        assert kept["state"] == "stopped" and kept["content"]  # what arrived is kept
        aborted = 'qwen3_moe_serve:request_success_total{finished_reason="abort"}'
        _wait("the server to count the abort", lambda: _metric(server.url, aborted) == 1.0)
        running = "qwen3_moe_serve:num_requests_running"
        _wait("the slot to be free", lambda: _metric(server.url, running) == 0.0)
        assert browser.find_element("id", "send").is_enabled()
        assert _console_errors(browser) == []


@pytest.mark.slow
def test_a_key_protected_server_works_once_the_key_is_entered(
    browser: Any, demo_model_path: Path, tmp_path: Path
) -> None:
    with ServerProcess(demo_model_path, "--api-key", "sekrit", cache_dir=tmp_path) as server:
        _open(browser, server.url)
        _wait(
            "the page to ask for a key",
            lambda: browser.find_element("id", "api-key").is_displayed(),
        )
        assert "API key" in browser.find_element("id", "notice").text
        _fill(browser, "api-key", "sekrit")
        _model_id(browser)
        _send(browser, "Hello!")
        _wait("the answer to end", lambda: _last_answer_state(browser) == "done")
        assert _stored_answer(browser)["content"]
        stored_key = browser.execute_script(
            "return localStorage.getItem('qwen3-moe-serve.api-key')"
        )
        assert stored_key == "sekrit"  # kept in this browser, for the next visit
        # The 401s the page met before the key are the API's answers, not the page's errors.
        errors = [e for e in _console_errors(browser) if "401" not in e["message"]]
        assert errors == []


@pytest.mark.slow
def test_model_text_is_rendered_as_markdown_and_never_run_as_html(
    browser: Any, model_cache: Path, tmp_path: Path
) -> None:
    model = ensure_demo_model(model_cache, MARKUP_SCRIPT)
    with ServerProcess(model, cache_dir=tmp_path) as server:
        _open(browser, server.url)
        _model_id(browser)
        _send(browser, "Show me markup.")
        _wait("the answer to end", lambda: _last_answer_state(browser) == "done")
        assert browser.execute_script("return window.__pwned") is None
        answer = "article[data-role=assistant] .content"
        content = browser.find_element("css selector", answer)
        assert '<img src=x onerror="window.__pwned=1">' in content.text  # shown, as text
        assert "<script>window.__pwned=2</script>" in content.text
        assert not browser.find_elements("css selector", f"{answer} img, {answer} script")
        assert browser.find_element("css selector", f"{answer} strong").text == "this"
        code = browser.find_element("css selector", f"{answer} pre code")
        assert code.text.strip() == "print(1)"
        assert _console_errors(browser) == []

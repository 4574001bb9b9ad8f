"""CORS in a real headless chromium: a page from an allowed loopback origin calls the API with fetch and
reads the JSON; a page from another origin is refused by the browser itself."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from selenium.webdriver.remote.webdriver import WebDriver
from support.browser import WebStack, headless_chromium, web_stack

PASSWORD = "a long enough passphrase"


class _Page(BaseHTTPRequestHandler):
    """An empty page: the test runs its script in it, so the calls come from this server's origin."""

    def do_GET(self) -> None:
        body = b"<!DOCTYPE html><html><head><title>app</title></head><body>app</body></html>"
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what the browser got, not this server's log."""


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[str, str]]:
    """Two web apps on other loopback origins than the API's: (allowed, not allowed)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        allowed, other = (f"http://127.0.0.1:{server.server_address[1]}" for server in servers)
        yield allowed, other
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def stack(
    module_pg_url: str, tmp_path_factory: pytest.TempPathFactory, origins: tuple[str, str]
) -> Iterator[WebStack]:
    allowed, _ = origins
    with web_stack(module_pg_url, tmp_path_factory.mktemp("stack"), cors_origins=[allowed]) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with headless_chromium() as driver:
        yield driver


# Runs in the page: register, log in, create a code (a bearer call: a preflight with authorization),
# look it up; each step's status, JSON and the exposed x-request-id, or the error fetch raised.
APP_SCRIPT = """
const [api, email, password, expiresAt, done] = arguments;
const steps = [];
async function call(name, path, init) {
  try {
    const response = await fetch(api + path, init);
    const body = await response.json();
    steps.push({name, status: response.status, body, requestId: response.headers.get("x-request-id")});
    return body;
  } catch (error) {
    steps.push({name, error: error.name + ": " + error.message});
    return null;
  }
}
(async () => {
  const json = {"content-type": "application/json"};
  await call("register", "/auth/register",
             {method: "POST", headers: json, body: JSON.stringify({email, password})});
  const tokens = await call("login", "/auth/login",
                            {method: "POST", headers: json, body: JSON.stringify({email, password})});
  if (tokens) {
    await call("create", "/referral/code", {
      method: "POST",
      headers: {...json, authorization: "Bearer " + tokens.access_token},
      body: JSON.stringify({expires_at: expiresAt}),
    });
  }
  await call("lookup", "/referral/code/by-email?email=" + encodeURIComponent(email), {});
  done(steps);
})();
"""


def run_app(driver: WebDriver, origin: str, stack: WebStack, email: str) -> list[dict[str, Any]]:
    driver.get(origin + "/")
    driver.set_script_timeout(60)
    steps: list[dict[str, Any]] = driver.execute_async_script(
        APP_SCRIPT, stack.url, email, PASSWORD, in_30_days()
    )
    return steps


def in_30_days() -> str:
    return (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_an_allowed_origin_calls_register_login_and_the_lookup_with_fetch(
    stack: WebStack, origins: tuple[str, str], browser: WebDriver
) -> None:
    allowed, _ = origins
    email = f"cors-{uuid.uuid4().hex[:10]}@example.com"
    steps = {step["name"]: step for step in run_app(browser, allowed, stack, email)}
    assert [steps[name].get("status") for name in ("register", "login", "create", "lookup")] == [200] * 4, (
        steps
    )
    assert steps["register"]["body"]["token_type"] == "Bearer"
    assert steps["lookup"]["body"]["code"] == steps["create"]["body"]["code"]
    # x-request-id is an exposed header: the app can read it to report a problem.
    assert all(steps[name]["requestId"] for name in steps)


def test_a_page_from_an_origin_not_allowed_is_refused_by_the_browser(
    stack: WebStack, origins: tuple[str, str], browser: WebDriver
) -> None:
    _, other = origins
    email = f"cors-{uuid.uuid4().hex[:10]}@example.com"
    steps = run_app(browser, other, stack, email)
    # fetch itself fails: the page never sees a status or a body, whatever the server did.
    assert [step["name"] for step in steps] == ["register", "login", "lookup"]
    assert all(step.get("error", "").startswith("TypeError") for step in steps), steps

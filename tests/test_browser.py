"""The pages the gateway serves, in a real headless chromium: the API docs' "Try it out", and the
password-reset and email-verification pages opened from the links in the emails the worker really sends."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from support.browser import WebStack, console_errors, headless_chromium, wait, web_stack

PASSWORD = "a long enough passphrase"
# What the document's examples say (proto comments, `For example ...`): Try it out sends exactly these.
EXAMPLE_EMAIL = "ada@example.com"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"


@pytest.fixture(scope="module")
def stack(module_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    with web_stack(module_pg_url, tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with headless_chromium() as driver:
        yield driver


def new_email(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}@example.com"


def register(stack: WebStack, email: str) -> dict[str, Any]:
    response = requests.post(
        f"{stack.url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=30
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


# --- the API docs page ---------------------------------------------------------------------------------


def operation(driver: WebDriver, tag: str, operation_id: str) -> WebElement:
    """The operation's block on the docs page, expanded."""
    block: WebElement = wait(driver).until(
        lambda d: d.find_element(By.ID, f"operations-{tag}-{operation_id}")
    )
    if "is-open" not in (block.get_attribute("class") or ""):
        block.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
    return block


def try_it_out(driver: WebDriver, tag: str, operation_id: str) -> tuple[int, Any]:
    """Try it out, Execute with what the page fills in, and the live response's status and JSON body."""
    block = operation(driver, tag, operation_id)
    if not block.find_elements(By.CSS_SELECTOR, ".btn.execute"):
        wait(driver).until(lambda _: block.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    for previous in block.find_elements(By.CSS_SELECTOR, ".btn-clear"):
        previous.click()
    wait(driver).until(lambda _: block.find_element(By.CSS_SELECTOR, ".btn.execute")).click()
    status = wait(driver).until(
        lambda _: block.find_element(
            By.CSS_SELECTOR, ".live-responses-table tbody .response .response-col_status"
        )
    )
    body = block.find_element(
        By.CSS_SELECTOR, ".live-responses-table tbody .response .response-col_description pre"
    )
    return int(status.text), json.loads(body.text)


def authorize(driver: WebDriver, access_token: str) -> None:
    """The Authorize dialog, bearer scheme: what a person does after signing in on the page."""
    driver.find_element(By.CSS_SELECTOR, ".scheme-container .btn.authorize").click()
    dialog = wait(driver).until(lambda d: d.find_element(By.CSS_SELECTOR, ".modal-ux"))
    bearer = next(
        box
        for box in dialog.find_elements(By.CSS_SELECTOR, ".auth-container")
        if "bearerAuth" in box.find_element(By.CSS_SELECTOR, "h4").text
    )
    bearer.find_element(By.CSS_SELECTOR, "input").send_keys(access_token)
    bearer.find_element(By.CSS_SELECTOR, ".btn.modal-btn.auth.authorize").click()
    dialog.find_element(By.CSS_SELECTOR, ".btn-done").click()


def test_try_it_out_on_register_create_and_lookup_succeeds_as_shipped(
    stack: WebStack, browser: WebDriver
) -> None:
    browser.get(f"{stack.url}/docs")
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "docs.png"))

    status, tokens = try_it_out(browser, "AuthService", "AuthService_Register")
    assert status == 200, tokens
    assert tokens["token_type"] == "Bearer" and tokens["access_token"]

    # The code's expires_at example is made concrete by the page: 30 days from now, inside the horizon.
    authorize(browser, tokens["access_token"])
    status, code = try_it_out(browser, "ReferralService", "ReferralService_CreateReferralCode")
    assert status == 200, code

    status, found = try_it_out(browser, "ReferralService", "ReferralService_GetReferralCodeByEmail")
    assert status == 200, found
    assert found["code"] == code["code"]
    assert found["expires_at"] == code["expires_at"]
    browser.save_screenshot(str(SCREENSHOTS / "docs-tried.png"))
    assert console_errors(browser) == []

    # The same Try it out again: the example email is taken now, and the page shows the documented 409.
    status, error = try_it_out(browser, "AuthService", "AuthService_Register")
    assert status == 409
    assert error["details"][0]["reason"] == "EMAIL_TAKEN"


def test_the_docs_page_runs_under_a_policy_without_inline_scripts(stack: WebStack) -> None:
    page = requests.get(f"{stack.url}/docs", timeout=10)
    policy = page.headers["content-security-policy"]
    assert (
        "script-src 'self';" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    )
    assert "<script>" not in page.text


# --- the password-reset page ---------------------------------------------------------------------------


def submit_passwords(driver: WebDriver, first: str, second: str) -> str:
    """Type the two passwords, submit, and return the message the page shows."""
    for field, value in (("new-password", first), ("repeat-password", second)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    message = driver.find_element(By.ID, "message")
    before = message.text
    driver.find_element(By.ID, "reset-submit").click()
    wait(driver).until(lambda _: message.text and message.text != before)
    return str(message.text)


def test_the_reset_link_of_the_email_opens_a_page_that_sets_the_new_password(
    stack: WebStack, browser: WebDriver
) -> None:
    email = new_email("reset")
    register(stack, email)
    response = requests.post(f"{stack.url}/auth/reset_password", json={"email": email}, timeout=30)
    assert response.status_code == 200, response.text
    link = stack.link(email, "/reset-password")

    browser.get(link)
    wait(browser).until(lambda d: d.find_element(By.ID, "reset-password").is_displayed())
    # The token leaves the address bar (and the history) once the page holds it.
    assert browser.current_url == f"{stack.url}/reset-password"

    assert "differ" in submit_passwords(browser, "violet harbour seven kites", "violet harbour seven kite")
    # The server's reason, in words.
    assert "most common" in submit_passwords(browser, "password123", "password123")
    assert "has been changed" in submit_passwords(
        browser, "violet harbour seven kites", "violet harbour seven kites"
    )
    assert "success" in (browser.find_element(By.ID, "message").get_attribute("class") or "")
    assert console_errors(browser) == []

    login = requests.post(
        f"{stack.url}/auth/login", json={"email": email, "password": "violet harbour seven kites"}, timeout=30
    )
    assert login.status_code == 200, login.text

    # The link works once.
    browser.get(link)
    wait(browser).until(lambda d: d.find_element(By.ID, "reset-password").is_displayed())
    assert "already used" in submit_passwords(browser, "another fine passphrase", "another fine passphrase")


def test_a_link_without_a_token_says_so(stack: WebStack, browser: WebDriver) -> None:
    browser.get(f"{stack.url}/reset-password")
    message = wait(browser).until(lambda d: d.find_element(By.ID, "message"))
    wait(browser).until(lambda _: message.text)
    assert "no token" in message.text
    assert not browser.find_element(By.ID, "reset-submit").is_enabled()


def test_the_pages_are_served_with_a_strict_policy(stack: WebStack) -> None:
    for path in ("/reset-password", "/verify-email"):
        page = requests.get(f"{stack.url}{path}?token=abc", timeout=10)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self';")
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["cache-control"] == "no-store"
        assert "<script>" not in page.text and "<style>" not in page.text
    for asset, kind in (("/pages/account.js", "text/javascript"), ("/pages/account.css", "text/css")):
        assert requests.get(f"{stack.url}{asset}", timeout=10).headers["content-type"].startswith(kind)


# --- the email-verification page -----------------------------------------------------------------------


def test_the_verification_link_of_the_email_confirms_the_address_once(
    stack: WebStack, browser: WebDriver
) -> None:
    email = new_email("verify")
    tokens = register(stack, email)
    link = stack.link(email, "/verify-email")

    browser.get(link)
    wait(browser).until(lambda d: d.find_element(By.ID, "verify-email").is_displayed())
    assert browser.current_url == f"{stack.url}/verify-email"
    message = browser.find_element(By.ID, "message")
    browser.find_element(By.ID, "verify-submit").click()
    wait(browser).until(lambda _: message.text)
    assert "is confirmed" in message.text
    assert console_errors(browser) == []

    resend = requests.post(
        f"{stack.url}/auth/verify_email/resend",
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=30,
    )
    assert resend.status_code == 200, resend.text
    assert resend.json()["email_sent"] is False
    assert resend.json()["email_verified_at"]

    browser.get(link)
    message = wait(browser).until(lambda d: d.find_element(By.ID, "message"))
    browser.find_element(By.ID, "verify-submit").click()
    wait(browser).until(lambda _: message.text)
    assert "already used" in message.text

"""A real headless browser for tests: Debian's chromium driven by its chromium-driver through selenium.

Nothing is downloaded at run time: the browser and the driver are the Debian packages `.ci/run` installs,
named by path so that selenium's own driver manager never runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from referral_grpc.devstack.processes import python_child

from . import TEST_JWT_SECRET, wait_until
from .envoy import Envoy, migrate, running_envoy, running_server, server_env
from .smtp import ReceivedMessage, SmtpServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 30.0


@contextmanager
def headless_chromium() -> Iterator[WebDriver]:
    """A fresh headless chromium (its own profile), quit when the block ends."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(f"{missing} missing: install Debian's chromium and chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.add_argument("--headless=new")
    options.add_argument("--window-size=1280,1600")
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument("--disable-gpu")
    # No first-run, sync or update traffic: the tests run offline.
    options.add_argument("--no-first-run")
    options.add_argument("--disable-background-networking")
    if os.geteuid() == 0:
        # Chromium's sandbox refuses to run as root (CI containers).
        options.add_argument("--no-sandbox")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, seconds: float = WAIT_SECONDS) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, seconds)


def console_errors(driver: WebDriver) -> list[str]:
    """The page's console errors (policy violations, script errors, assets that failed to load), without
    the line chromium logs for every API answer with an error status, which the tests expect."""
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return [
        str(entry["message"])
        for entry in entries
        if entry["level"] == "SEVERE"
        and not re.search(
            r"/auth/\S+ - Failed to load resource: the server responded with a status of 4\d\d",
            entry["message"],
        )
    ]


@dataclass
class WebStack:
    """Envoy in front of a server, and the email worker sending through a real SMTP server."""

    envoy: Envoy
    smtp: SmtpServer

    @property
    def url(self) -> str:
        return self.envoy.url

    def link(self, recipient: str, page: str, timeout: float = 30.0) -> str:
        """The `page` link (/reset-password, /verify-email) of the newest email sent to `recipient`."""

        def newest() -> ReceivedMessage | None:
            sent = [m for m in self.smtp.messages if recipient in m.rcpt_tos and page in m.part("plain")]
            return sent[-1] if sent else None

        wait_until(lambda: newest() is not None, timeout, f"a {page} email to {recipient}")
        message = newest()
        assert message is not None
        match = re.search(rf"{re.escape(self.url)}{page}\?token=[A-Za-z0-9_%.~-]+", message.part("plain"))
        assert match, message.part("plain")
        return match[0]


@contextmanager
def web_stack(database_url: str, workdir: Path, **envoy_options: Any) -> Iterator[WebStack]:
    """Server, Envoy (with `envoy_options`), and a worker whose links point at that Envoy."""
    env = server_env(
        DATABASE_URL=database_url,
        JWT_SECRET=TEST_JWT_SECRET,
        REDIS_URL="",
        HUEY_SQLITE_PATH=str(workdir / "huey.db"),
        OUTBOX_RELAY_INTERVAL="0.2",
    )
    migrate(env)
    with SmtpServer() as smtp:
        env |= {"SMTP_HOST": smtp.host, "SMTP_PORT": str(smtp.port)}
        with (
            running_server(env, workdir / "server.log") as (_, backend),
            running_envoy([backend], workdir, **envoy_options) as envoy,
            (workdir / "worker.log").open("a") as worker_log,
        ):
            # The links in the emails lead to this Envoy, as PUBLIC_BASE_URL does in production.
            worker = python_child("worker", "worker", env | {"PUBLIC_BASE_URL": envoy.url}, output=worker_log)
            try:
                yield WebStack(envoy, smtp)
            finally:
                worker.stop(signal.SIGTERM, timeout=30)

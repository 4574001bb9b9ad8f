"""Email messages: the kinds we send, their templates, and the SMTP or console transport that sends them."""

from __future__ import annotations

import html
import logging
import smtplib
import ssl
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from functools import cache
from importlib import resources
from string import Template
from typing import Protocol, TextIO
from urllib.parse import quote

from ..settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmailKind:
    """One kind of email: the exact context its templates take, and which of it is secret."""

    fields: Mapping[str, type]
    # Scrubbed from the outbox once the email is sent or has failed for good.
    secrets: frozenset[str] = frozenset()


KINDS: Mapping[str, EmailKind] = {
    "welcome": EmailKind({}),
    "password_reset": EmailKind({"token": str, "expires_minutes": int}, frozenset({"token"})),
    # Sent to the referrer when someone signs up with their code.
    "referral_joined": EmailKind({"referee_email_masked": str}),
    # Sent after a password change or a completed reset.
    "password_changed": EmailKind({}),
    # Sent at registration and by ResendVerificationEmail: proof that the owner receives mail there.
    "email_verification": EmailKind({"token": str, "expires_hours": int}, frozenset({"token"})),
    # Sent to the referrer when a referral's qualifying event credits them a reward.
    "reward_credited": EmailKind({"amount": str, "referee_email_masked": str, "available_on": str}),
}

# Kinds whose token completes an action on a page of PUBLIC_BASE_URL: the page for each.
LINK_PAGES: Mapping[str, str] = {
    "password_reset": "/reset-password",
    "email_verification": "/verify-email",
}


def validate_context(kind: str, context: Mapping[str, object]) -> None:
    """Raise ValueError unless `context` is exactly what the templates of `kind` take."""
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown email kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    missing = sorted(spec.fields.keys() - context.keys())
    # Unexpected keys are refused too: they would be stored in the outbox (a password must never be).
    unexpected = sorted(context.keys() - spec.fields.keys())
    if missing or unexpected:
        raise ValueError(f"{kind} email context: missing {missing}, unexpected {unexpected}")
    for key, expected in spec.fields.items():
        value = context[key]
        # bool is a subclass of int, and never a valid number of minutes.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ValueError(f"{kind} email context: {key} must be {expected.__name__}")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


@cache
def _template(name: str) -> Template:
    source = resources.files("referral_grpc.infra") / "templates" / name
    return Template(source.read_text(encoding="utf-8"))


def render(kind: str, context: Mapping[str, object], *, public_base_url: str = "") -> RenderedEmail:
    """Fill the templates of `kind`; every value is HTML-escaped in the HTML part."""
    validate_context(kind, context)
    text_values = {key: str(value) for key, value in context.items()}
    html_values = {key: html.escape(value) for key, value in text_values.items()}
    page = LINK_PAGES.get(kind)
    if page is not None:
        # Without a public URL there is no page to link to: the token alone completes the action.
        text_values["link"] = html_values["link"] = ""
        if public_base_url:
            url = f"{public_base_url}{page}?token={quote(text_values['token'], safe='')}"
            text_values["link"] = _template(f"{kind}.link.txt").substitute(url=url)
            html_values["link"] = _template(f"{kind}.link.html").substitute(url=html.escape(url))
    subject = _template(f"{kind}.subject.txt").substitute(text_values)
    return RenderedEmail(
        # One line, whatever the template holds: a newline in a header would be refused.
        subject=" ".join(subject.split()),
        text=_template(f"{kind}.txt").substitute(text_values),
        html=_template(f"{kind}.html").substitute(html_values),
    )


def message_id_for(outbox_id: int, created_at: datetime, sender: str) -> str:
    """A Message-ID that is the same for every attempt at one outbox row, so receivers can drop duplicates.

    The creation time is part of it: ids start again at 1 in a new database.
    """
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    return f"<outbox.{outbox_id}.{created_at.strftime('%Y%m%d%H%M%S%f')}@{domain}>"


def build_message(rendered: RenderedEmail, *, sender: str, recipient: str, message_id: str) -> EmailMessage:
    """A multipart/alternative message: the plain-text part first, the HTML part preferred by clients."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = rendered.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message


class Mailer(Protocol):
    def send(self, message: EmailMessage) -> None:
        """Hand `message` over for delivery; raise if it was not accepted."""
        ...


@dataclass(frozen=True)
class SmtpMailer:
    """Sends through an SMTP server, one connection per message (the worker sends little mail)."""

    host: str
    port: int
    user: str = ""
    password: str = field(default="", repr=False)
    # none | starttls | ssl (implicit TLS, usually port 465)
    tls: str = "none"
    timeout: float = 10.0

    def send(self, message: EmailMessage) -> None:
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.tls == "ssl":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            if self.tls == "starttls":
                smtp.starttls(context=context)
            if self.user:
                smtp.login(self.user, self.password)
            smtp.send_message(message)
        finally:
            _close(smtp)


def _close(smtp: smtplib.SMTP) -> None:
    # Once DATA got its 250 the message is accepted: a failing QUIT must not turn that into a retry,
    # which would deliver the message twice.
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


class ConsoleMailer:
    """Development transport (no SMTP_HOST): prints each whole message to stdout.

    Reset and verification tokens included, so a developer can finish either locally.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        # Worker threads must not interleave two messages.
        self._lock = threading.Lock()

    def send(self, message: EmailMessage) -> None:
        # Resolved at send time, so a redirected or captured stdout is honoured.
        stream = self._stream or sys.stdout
        with self._lock:
            stream.write(
                f"----- email (SMTP_HOST is not set) -----\n{message.as_string()}\n----- end -----\n"
            )
            stream.flush()
        log.info(
            "Email %s to %s printed to stdout (SMTP_HOST is not set)", message["Message-ID"], message["To"]
        )


def make_mailer(settings: Settings) -> Mailer:
    """SmtpMailer when SMTP_HOST is set; otherwise the ConsoleMailer of the embedded setup."""
    if not settings.smtp_host:
        return ConsoleMailer()
    return SmtpMailer(
        host=settings.smtp_host,
        port=settings.smtp_port,
        user=settings.smtp_user,
        password=settings.smtp_password,
        tls=settings.smtp_tls,
        timeout=settings.smtp_timeout,
    )

"""Email delivery end to end: the outbox, a real Huey consumer, a real SMTP server, real databases."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import peewee as pw
import pytest
from huey import Huey, SqliteHuey
from support import FakeClock, closed_port, make_settings, wait_until
from support.api import running_api
from support.hunter import HunterStub
from support.smtp import ReceivedMessage, SmtpServer

from referral_grpc.domain.ports import SystemClock
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.infra.breaker import CircuitBreaker
from referral_grpc.infra.cache import make_code_cache
from referral_grpc.infra.mailer import (
    ConsoleMailer,
    SmtpMailer,
    build_message,
    make_mailer,
    message_id_for,
    render,
)
from referral_grpc.infra.metrics import Metrics
from referral_grpc.infra.outbox import (
    HANDOFF_GRACE,
    TASK_BATCH,
    BackgroundDispatcher,
    DeliveryConfig,
    HueyDispatcher,
    deliver,
    outbox_stats,
    queue_email,
)
from referral_grpc.infra.tasks import Worker, create_huey, create_tasks, make_dispatcher
from referral_grpc.infra.throttle import Throttle
from referral_grpc.settings import Settings
from referral_grpc.store.database import init_database
from referral_grpc.store.migrate import run_migrations
from referral_grpc.store.models import EmailOutbox, User

REPO = Path(__file__).resolve().parent.parent
SENDER = "Referrals <no-reply@referrals.example.com>"
BASE_URL = "https://referrals.example.com"
RESET_TOKEN = "rst_4f9c2a7e1b8d4c3fa0e6b5d7c9a8f1e2"
CONTEXTS: dict[str, dict[str, object]] = {
    "welcome": {},
    "password_reset": {"token": RESET_TOKEN, "expires_minutes": 30},
    "referral_joined": {"referee_email_masked": "j***@example.org"},
    "password_changed": {},
}
SUBJECTS = {
    "welcome": "Welcome to the referral programme",
    "password_reset": "Reset your password",
    "referral_joined": "Someone joined with your referral code",
    "password_changed": "Your password was changed",
}

# The worker process: what `python -m referral_grpc worker` runs, with logging for the test's eyes.
WORKER_SCRIPT = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr,"
    " format='%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s')\n"
    "from referral_grpc.settings import Settings\n"
    "from referral_grpc.infra.tasks import run_worker\n"
    "run_worker(Settings.from_env())\n"
)


class SilentServer:
    """A loopback TCP server that accepts connections and reads, and never answers: a hung Redis."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.connections = 0
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name="silent-redis", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()
        for conn in self._open:
            conn.close()


@pytest.fixture
def silent_redis() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def row(outbox_id: int) -> Any:
    return EmailOutbox.get_by_id(outbox_id)


def wait_sent(*ids: int) -> None:
    # The "sent" mark commits just after the SMTP server accepts the message.
    wait_until(lambda: all(row(i).status == "sent" for i in ids), 5, f"emails {ids} marked sent")


def run_queued_tasks(queue: Huey) -> int:
    """Run every task waiting in `queue` here, as a consumer thread would; return how many ran."""
    count = 0
    while (task := queue.dequeue()) is not None:
        queue.execute(task)
        count += 1
    return count


def queue_committed(db: pw.Database, *emails: tuple[str, str], now: datetime | None = None) -> list[int]:
    """Queue (kind, recipient) emails in one committed transaction, as the domain does."""
    now = now or datetime.now(UTC)
    with db.atomic():
        return [queue_email(kind, recipient, dict(CONTEXTS[kind]), now) for kind, recipient in emails]


def env_for(**overrides: object) -> dict[str, str]:
    return {key.upper(): str(value) for key, value in overrides.items()}


@pytest.fixture
def bind_db() -> Iterator[Callable[[str], pw.Database]]:
    """Bind the models to a database URL and migrate it; connections are closed afterwards."""
    bound: list[pw.Database] = []

    def bind(url: str) -> pw.Database:
        db = init_database(make_settings(database_url=url))
        run_migrations(db)
        bound.append(db)
        return db

    yield bind
    for db in bound:
        if hasattr(db, "close_all"):
            db.close_all()
        else:
            db.close()


@pytest.fixture
def embedded_worker() -> Iterator[Callable[[Settings], Worker]]:
    """Start a Worker (consumer threads + relay) in this process; stopped gracefully afterwards."""
    workers: list[Worker] = []

    def start(settings: Settings) -> Worker:
        worker = Worker(settings, SystemClock())
        worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


class WorkerProcess:
    """`run_worker(Settings.from_env())` in its own process, as production runs it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT],
            env={**os.environ, **env},
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], WorkerProcess]]:
    processes: list[WorkerProcess] = []

    def start(env: dict[str, str]) -> WorkerProcess:
        process = WorkerProcess(env, tmp_path / f"worker-{len(processes)}.log")
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(5)
        # Shown only when the test failed: what the worker logged.
        print(f"--- {process.log_path.name} ---\n{process.log()}")


@pytest.fixture
def redis_env(redis_url: str, key_prefix: str) -> Iterator[dict[str, str]]:
    """Settings for a RedisHuey queue private to this test; its Huey keys are deleted afterwards."""
    env = env_for(redis_url=redis_url, redis_key_prefix=key_prefix)
    yield env
    create_huey(make_settings(**env)).flush()


def by_recipient(messages: list[ReceivedMessage]) -> dict[str, ReceivedMessage]:
    return {message.rcpt_tos[0]: message for message in messages}


# --- rendering and validation -------------------------------------------------------------------


def test_reset_email_links_to_the_public_url_and_escapes_html() -> None:
    rendered = render("password_reset", {"token": "a<b>&c", "expires_minutes": 30}, public_base_url=BASE_URL)
    assert "a<b>&c" in rendered.text
    assert f"{BASE_URL}/reset-password?token=a%3Cb%3E%26c" in rendered.text
    assert "a&lt;b&gt;&amp;c" in rendered.html and "a<b>" not in rendered.html
    assert f'href="{BASE_URL}/reset-password?token=a%3Cb%3E%26c"' in rendered.html
    assert "30 minutes" in rendered.text and "30 minutes" in rendered.html

    joined = render("referral_joined", {"referee_email_masked": '<img src=x onerror="alert(1)">'})
    assert "<img" not in joined.html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in joined.html


def test_reset_email_without_public_url_has_the_token_and_no_link() -> None:
    rendered = render("password_reset", {"token": RESET_TOKEN, "expires_minutes": 15})
    assert RESET_TOKEN in rendered.text and RESET_TOKEN in rendered.html
    assert "reset-password" not in rendered.text and "href" not in rendered.html


@pytest.mark.parametrize(
    ("kind", "context", "problem"),
    [
        ("newsletter", {}, "unknown email kind"),
        ("password_reset", {"token": "t"}, "missing ['expires_minutes']"),
        ("welcome", {"password": "hunter2"}, "unexpected ['password']"),
        ("password_reset", {"token": "t", "expires_minutes": "30"}, "expires_minutes must be int"),
        ("password_reset", {"token": "t", "expires_minutes": True}, "expires_minutes must be int"),
    ],
)
def test_queue_email_refuses_unknown_kinds_and_wrong_context(
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    kind: str,
    context: dict[str, object],
    problem: str,
) -> None:
    bind_db(sqlite_url)
    with pytest.raises(ValueError, match=re.escape(problem)):
        queue_email(kind, "someone@example.com", context, datetime.now(UTC))
    assert EmailOutbox.select().count() == 0


def test_delivery_backoff_doubles_and_is_capped() -> None:
    config = DeliveryConfig.from_settings(make_settings(email_retry_base=2, email_retry_max_delay=60))
    assert [config.retry_delay(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


# --- transports ------------------------------------------------------------------------------------


def test_smtp_mailer_logs_in_with_the_configured_credentials() -> None:
    with SmtpServer(credentials={"mailer": "s3cret-pass"}) as server:
        settings = make_settings(
            smtp_host=server.host, smtp_port=server.port, smtp_user="mailer", smtp_password="s3cret-pass"
        )
        mailer = make_mailer(settings)
        assert isinstance(mailer, SmtpMailer) and "s3cret-pass" not in repr(mailer)
        rendered = render("welcome", {})
        mailer.send(build_message(rendered, sender=SENDER, recipient="a@example.com", message_id="<x@y>"))
        [received] = server.wait_for(1)
    assert received.login == "mailer"
    assert received.rcpt_tos == ["a@example.com"]


def test_console_mailer_is_the_embedded_default_and_prints_the_whole_message() -> None:
    assert isinstance(make_mailer(make_settings(smtp_host="")), ConsoleMailer)
    out = io.StringIO()
    rendered = render("password_reset", {"token": RESET_TOKEN, "expires_minutes": 30})
    ConsoleMailer(out).send(
        build_message(rendered, sender=SENDER, recipient="dev@example.com", message_id="<1@x>")
    )
    printed = out.getvalue()
    # A developer without SMTP finishes the reset with what was printed.
    assert RESET_TOKEN in printed and "To: dev@example.com" in printed and "text/html" in printed


# --- the embedded setup: SQLite database, SqliteHuey, worker threads in this process -------------


def test_every_kind_arrives_with_subject_text_and_html_and_the_reset_token_is_scrubbed(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    smtp_server: SmtpServer,
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        huey_sqlite_path=tmp_path / "huey.db",
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        mail_from=SENDER,
        public_base_url=BASE_URL,
        outbox_relay_interval=0.1,
    )
    db = bind_db(sqlite_url)
    embedded_worker(settings)
    ids = queue_committed(db, *((kind, f"{kind}@example.com") for kind in CONTEXTS))
    # The server's own queue instance: a different Huey object on the same storage.
    HueyDispatcher(create_tasks(settings, SystemClock())).dispatch(ids)

    received = by_recipient(smtp_server.wait_for(len(CONTEXTS)))
    wait_sent(*ids)
    for outbox_id, kind in zip(ids, CONTEXTS, strict=True):
        message = received[f"{kind}@example.com"]
        stored = row(outbox_id)
        assert message.message["From"] == SENDER
        assert message.message["To"] == f"{kind}@example.com"
        assert message.message["Subject"] == SUBJECTS[kind]
        assert message.message.get_content_type() == "multipart/alternative"
        assert message.part("plain").strip() and message.part("html").lstrip().startswith("<!DOCTYPE html>")
        assert message.message["Message-ID"] == message_id_for(outbox_id, stored.created_at, SENDER)
        assert (stored.status, stored.attempts, stored.last_error) == ("sent", 1, None)
        assert stored.sent_at is not None

    reset = received["password_reset@example.com"]
    link = f"{BASE_URL}/reset-password?token={RESET_TOKEN}"
    assert RESET_TOKEN in reset.part("plain") and link in reset.part("plain")
    assert f'href="{link}"' in reset.part("html")
    assert "j***@example.org" in received["referral_joined@example.com"].part("html")
    # Sent: the token is gone from the database, the rest of the context stays for the record.
    reset_row = row(ids[1])
    assert json.loads(reset_row.payload) == {"expires_minutes": 30}
    assert (
        db.execute_sql(
            "SELECT count(*) FROM email_outbox WHERE payload LIKE ?", (f"%{RESET_TOKEN}%",)
        ).fetchone()[0]
        == 0
    )


def test_a_rolled_back_transaction_leaves_no_outbox_row_and_sends_nothing(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    smtp_server: SmtpServer,
    clock: FakeClock,
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        huey_sqlite_path=tmp_path / "huey.db",
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        outbox_relay_interval=0.05,
    )
    db = bind_db(sqlite_url)

    class SignupFailed(Exception):
        pass

    with pytest.raises(SignupFailed), db.atomic():
        queue_email("welcome", "ghost@example.com", {}, clock.now())
        raise SignupFailed
    [committed] = queue_committed(db, ("welcome", "real@example.com"), now=clock.now())
    # No dispatch at all (the process that wrote it died before its hand-off): the relay alone finds
    # what committed, once the insert's claim has run out. Step by step, so that anything the worker
    # would still send is in the queue when we look.
    worker = Worker(settings, clock)
    assert worker.relay_once() == 0
    clock.advance(seconds=HANDOFF_GRACE.total_seconds() - 0.01)
    assert worker.relay_once() == 0 and len(worker.tasks.huey) == 0
    clock.advance(seconds=0.02)
    assert worker.relay_once() == 1
    assert run_queued_tasks(worker.tasks.huey) == 1
    smtp_server.wait_for(1)
    assert worker.relay_once() == 0 and len(worker.tasks.huey) == 0
    assert [m.rcpt_tos for m in smtp_server.messages] == [["real@example.com"]]
    assert [r.recipient for r in EmailOutbox.select()] == ["real@example.com"]
    wait_sent(committed)


def test_max_attempts_records_a_final_failure_without_the_secret(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        huey_sqlite_path=tmp_path / "huey.db",
        smtp_host="127.0.0.1",
        smtp_port=closed_port(),
        email_max_attempts=3,
        email_retry_base=0.05,
        outbox_relay_interval=0.05,
    )
    db = bind_db(sqlite_url)
    worker = embedded_worker(settings)
    [outbox_id] = queue_committed(db, ("password_reset", "nobody@example.com"))
    HueyDispatcher(create_tasks(settings, SystemClock())).dispatch([outbox_id])

    wait_until(lambda: row(outbox_id).status == "failed", 8, "the final failure")
    failed = row(outbox_id)
    assert failed.attempts == 3
    assert "ConnectionRefusedError" in failed.last_error
    assert RESET_TOKEN not in failed.last_error and RESET_TOKEN not in failed.payload
    # Stopped (running tasks finish), the worker leaves no retry behind, its relay takes nothing,
    # and a stray delivery task leaves the row alone.
    worker.stop()
    assert len(worker.tasks.huey) == 0 and worker.tasks.huey.scheduled_count() == 0
    assert worker.relay_once() == 0
    worker.tasks.enqueue_delivery(outbox_id)
    assert run_queued_tasks(worker.tasks.huey) == 1
    assert row(outbox_id).attempts == 3, "a failed email is not retried any more"


def test_a_permanent_refusal_fails_at_once(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    with SmtpServer(reject={"gone@example.com"}) as server:
        settings = make_settings(
            database_url=sqlite_url,
            huey_sqlite_path=tmp_path / "huey.db",
            smtp_host=server.host,
            smtp_port=server.port,
            email_retry_base=0.05,
        )
        db = bind_db(sqlite_url)
        embedded_worker(settings)
        ids = queue_committed(db, ("welcome", "gone@example.com"), ("welcome", "here@example.com"))
        HueyDispatcher(create_tasks(settings, SystemClock())).dispatch(ids)
        server.wait_for(1)
        wait_until(lambda: row(ids[0]).status == "failed", 5, "the refused email to fail")
        wait_sent(ids[1])
    refused = row(ids[0])
    assert refused.attempts == 1 and "550" in refused.last_error


def test_the_hand_off_gathers_emails_into_few_tasks_and_the_worker_sends_each_once(
    pg_url: str,
    redis_env: dict[str, str],
    bind_db: Callable[[str], pw.Database],
    smtp_server: SmtpServer,
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    settings = make_settings(
        **redis_env, database_url=pg_url, smtp_host=smtp_server.host, smtp_port=smtp_server.port
    )
    db = bind_db(pg_url)
    queue = create_tasks(settings, SystemClock())
    # What 25 RPCs that each committed one email hand over, well within one gathering window.
    dispatcher = BackgroundDispatcher(HueyDispatcher(queue), delay=0.5)
    ids = [queue_committed(db, ("welcome", f"batch{n}@example.com"))[0] for n in range(25)]
    for outbox_id in ids:
        dispatcher.dispatch([outbox_id])
    assert len(queue.huey) == 0, "nothing is enqueued before the window closes"
    wait_until(lambda: len(queue.huey) > 0, 5, "the hand-off")
    time.sleep(0.2)  # a second batch would show up meanwhile
    # One task per TASK_BATCH ids: three round trips to the queue, not 25.
    assert len(queue.huey) == -(-len(ids) // TASK_BATCH) == 3
    embedded_worker(settings)
    smtp_server.wait_for(len(ids), timeout=10)
    wait_sent(*ids)
    assert sorted(message.rcpt_tos[0] for message in smtp_server.messages) == sorted(
        f"batch{n}@example.com" for n in range(25)
    )


def test_a_row_that_breaks_its_delivery_leaves_the_rest_of_its_task_to_be_sent(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    smtp_server: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        database_url=sqlite_url,
        huey_sqlite_path=tmp_path / "huey.db",
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
    )
    db = bind_db(sqlite_url)
    queue = create_tasks(settings, SystemClock())
    ids = queue_committed(db, *(("welcome", f"row{n}@example.com") for n in range(3)))
    # A row damaged by hand: its payload is no longer JSON, so its delivery raises.
    EmailOutbox.update(payload="{not json").where(EmailOutbox.id == ids[1]).execute()
    HueyDispatcher(queue).dispatch(ids)
    assert len(queue.huey) == 1
    assert run_queued_tasks(queue.huey) == 1
    assert sorted(message.rcpt_tos[0] for message in smtp_server.wait_for(2, timeout=5)) == [
        "row0@example.com",
        "row2@example.com",
    ]
    wait_sent(ids[0], ids[2])
    assert row(ids[1]).status == "pending", "left for the relay"
    assert f"Delivering email {ids[1]} failed" in caplog.text


def test_a_lost_task_is_enqueued_again_after_the_hand_off_grace_then_after_the_lease(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    smtp_server: SmtpServer,
    clock: FakeClock,
) -> None:
    lease = 60
    settings = make_settings(
        database_url=sqlite_url,
        huey_sqlite_path=tmp_path / "huey.db",
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        outbox_lease=lease,
    )
    db = bind_db(sqlite_url)
    queue = create_tasks(settings, clock)
    [outbox_id] = queue_committed(db, ("welcome", "late@example.com"), now=clock.now())
    # The insert claimed the row for the hand-off; the dispatcher enqueues it without writing.
    HueyDispatcher(queue).dispatch([outbox_id])
    assert row(outbox_id).enqueued_at == clock.now() and len(queue.huey) == 1
    queue.huey.flush()  # the task is lost (a crashed worker had already popped it, say)

    # The relay, pass by pass on the fake clock: not while the insert's claim holds.
    worker = Worker(settings, clock, queue)
    assert worker.relay_once() == 0
    clock.advance(seconds=HANDOFF_GRACE.total_seconds() - 0.01)
    assert worker.relay_once() == 0 and len(queue.huey) == 0
    clock.advance(seconds=0.02)
    assert worker.relay_once() == 1 and row(outbox_id).enqueued_at == clock.now()
    queue.huey.flush()  # lost again

    # Now the relay's own claim: not before the lease ran out, since until then the row belonged to
    # the lost task.
    assert worker.relay_once() == 0
    clock.advance(seconds=lease - 0.01)
    assert worker.relay_once() == 0 and len(queue.huey) == 0
    clock.advance(seconds=0.02)
    assert worker.relay_once() == 1
    assert run_queued_tasks(queue.huey) == 1
    [message] = smtp_server.wait_for(1, timeout=5)
    assert message.rcpt_tos == ["late@example.com"]
    wait_sent(outbox_id)
    # Sent: the next passes find nothing, so nothing is sent twice.
    clock.advance(seconds=10 * lease)
    assert worker.relay_once() == 0 and run_queued_tasks(queue.huey) == 0
    assert len(smtp_server.messages) == 1


def test_concurrent_deliveries_of_one_row_send_it_once(
    tmp_path: Path,
    database_url: str,
    bind_db: Callable[[str], pw.Database],
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    # A slow server keeps each send in flight while the duplicates run on the other threads.
    with SmtpServer(data_delay=0.4) as server:
        settings = make_settings(
            database_url=database_url,
            huey_sqlite_path=tmp_path / "huey.db",
            smtp_host=server.host,
            smtp_port=server.port,
            worker_threads=4,
        )
        db = bind_db(database_url)
        queue = create_tasks(settings, SystemClock())
        [outbox_id] = queue_committed(db, ("welcome", "once@example.com"))
        # The dispatcher, the relay and stray retries can all enqueue the same row.
        for _ in range(6):
            queue.enqueue_delivery(outbox_id)
        worker = embedded_worker(settings)
        server.wait_for(1)
        wait_until(lambda: len(queue.huey) == 0, 5, "the duplicates to run")
        # Stopped, the worker has finished every send it started; whatever is still queued runs here.
        worker.stop()
        run_queued_tasks(queue.huey)
        assert len(server.messages) == 1
        wait_sent(outbox_id)
    assert row(outbox_id).attempts == 1


def test_hunter_rechecks_are_enqueued_and_run_by_the_worker(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    with HunterStub() as hunter:
        settings = make_settings(
            database_url=sqlite_url,
            huey_sqlite_path=tmp_path / "huey.db",
            hunter_url=hunter.url,
            hunter_api_key="test-hunter-key",
            hunter_recheck_interval=1,
        )
        bind_db(sqlite_url)
        now = datetime.now(UTC)
        marked = User.create(
            email="later@example.com",
            email_key="later@example.com",
            password_hash="x",
            created_at=now,
            email_status="error",
            email_recheck=True,
        )
        embedded_worker(settings)
        wait_until(lambda: not User.get_by_id(marked.id).email_recheck, 5, "the re-check")
    checked = User.get_by_id(marked.id)
    assert checked.email_status == "valid" and checked.email_checked_at is not None
    assert {request.email for request in hunter.requests} == {"later@example.com"}


def test_outbox_stats_report_depth_and_lag(database_url: str, bind_db: Callable[[str], pw.Database]) -> None:
    bind_db(database_url)
    now = datetime.now(UTC)
    assert outbox_stats(now).depth == 0 and outbox_stats(now).lag_seconds == 0
    oldest = queue_email("welcome", "a@example.com", {}, now - timedelta(seconds=90))
    queue_email("welcome", "b@example.com", {}, now - timedelta(seconds=30))
    sent = queue_email("welcome", "c@example.com", {}, now - timedelta(seconds=300))
    EmailOutbox.update(status="sent").where(EmailOutbox.id == sent).execute()
    stats = outbox_stats(now)
    assert stats.depth == 2 and stats.lag_seconds == pytest.approx(90)
    EmailOutbox.update(status="failed").where(EmailOutbox.id == oldest).execute()
    assert outbox_stats(now).lag_seconds == pytest.approx(30)


def run_deliveries(outbox_id: int, settings: Settings, clock: FakeClock) -> list[float]:
    """Deliver `outbox_id` as the worker does, moving the clock to each retry; return when attempts ran."""
    config = DeliveryConfig.from_settings(settings)
    mailer = make_mailer(settings)
    start = clock.now()
    offsets = []
    while True:
        offsets.append((clock.now() - start).total_seconds())
        result = deliver(outbox_id, mailer=mailer, config=config, clock=clock)
        if result.retry_in is None:
            return offsets
        clock.advance(seconds=result.retry_in)


def test_a_reset_email_is_not_retried_past_the_expiry_of_its_link(
    sqlite_url: str, bind_db: Callable[[str], pw.Database]
) -> None:
    # The defaults: 10 attempts, 4 s doubling; the last attempt would come 2,044 s after the first,
    # the reset link dies after 30 minutes (RESET_TOKEN_TTL 1,800 s).
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=closed_port())
    db = bind_db(sqlite_url)
    clock = FakeClock()
    with db.atomic():
        reset = queue_email("password_reset", "r@example.com", dict(CONTEXTS["password_reset"]), clock.now())
        welcome = queue_email("welcome", "w@example.com", {}, clock.now())

    reset_offsets = run_deliveries(reset, settings, FakeClock(clock.now()))
    welcome_offsets = run_deliveries(welcome, settings, FakeClock(clock.now()))

    assert welcome_offsets == [0, 4, 12, 28, 60, 124, 252, 508, 1020, 2044], "other kinds keep the schedule"
    assert reset_offsets == welcome_offsets[:9]
    failed = row(reset)
    assert (failed.status, failed.attempts) == ("failed", 9)
    assert failed.last_error.startswith("Expired before the next attempt: ConnectionRefusedError")
    assert RESET_TOKEN not in failed.payload


def test_a_reset_email_due_after_its_link_expired_is_marked_failed_instead_of_sent(
    sqlite_url: str, bind_db: Callable[[str], pw.Database], smtp_server: SmtpServer
) -> None:
    settings = make_settings(smtp_host=smtp_server.host, smtp_port=smtp_server.port)
    config = DeliveryConfig.from_settings(settings)
    mailer = make_mailer(settings)
    db = bind_db(sqlite_url)
    clock = FakeClock()
    with db.atomic():
        expired = queue_email(
            "password_reset", "late@example.com", dict(CONTEXTS["password_reset"]), clock.now()
        )
    clock.advance(minutes=29, seconds=59)
    with db.atomic():
        fresh = queue_email(
            "password_reset", "fresh@example.com", dict(CONTEXTS["password_reset"]), clock.now()
        )
    # The worker was down for half an hour: the first link dies now, the second has 30 minutes left.
    clock.advance(seconds=1)

    assert deliver(expired, mailer=mailer, config=config, clock=clock).outcome == "failed"
    assert deliver(fresh, mailer=mailer, config=config, clock=clock).outcome == "sent"
    assert [message.rcpt_tos for message in smtp_server.messages] == [["fresh@example.com"]]
    dead = row(expired)
    assert (dead.status, dead.attempts) == ("failed", 0)
    assert dead.last_error.startswith("Expired: its link expired at ")
    assert RESET_TOKEN not in dead.payload


def test_failed_emails_are_counted_by_kind_in_the_metrics(
    database_url: str, bind_db: Callable[[str], pw.Database]
) -> None:
    db = bind_db(database_url)
    clock = FakeClock()
    metrics = Metrics(db=db, clock=clock)

    def failed(kind: str) -> float | None:
        return metrics.registry.get_sample_value("referral_email_outbox_failed", {"kind": kind})

    assert {kind: failed(kind) for kind in CONTEXTS} == dict.fromkeys(CONTEXTS, 0.0)
    ids = [queue_email(kind, f"{kind}@example.com", dict(CONTEXTS[kind]), clock.now()) for kind in CONTEXTS]
    reset, welcome = ids[1], ids[0]
    clock.advance(minutes=30)
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=closed_port(), email_max_attempts=1)
    for outbox_id in (reset, welcome):
        deliver(
            outbox_id,
            mailer=make_mailer(settings),
            config=DeliveryConfig.from_settings(settings),
            clock=clock,
        )
    assert failed("password_reset") == 1 and failed("welcome") == 1
    assert failed("referral_joined") == 0 and failed("password_changed") == 0
    assert outbox_stats(clock.now()).failed == {
        "welcome": 1,
        "password_reset": 1,
        "referral_joined": 0,
        "password_changed": 0,
        "email_verification": 0,
        "reward_credited": 0,
    }


# --- production shape: PostgreSQL, RedisHuey, the worker in its own process -------------------------


def test_smtp_outage_retries_with_backoff_and_delivers_once_when_smtp_is_back(
    pg_url: str,
    redis_env: dict[str, str],
    bind_db: Callable[[str], pw.Database],
    worker_process: Callable[[dict[str, str]], WorkerProcess],
) -> None:
    port = closed_port()
    env = {
        **redis_env,
        **env_for(
            database_url=pg_url,
            smtp_host="127.0.0.1",
            smtp_port=port,
            email_retry_base=0.25,
            outbox_relay_interval=0.1,
        ),
    }
    settings = make_settings(**env)
    db = bind_db(pg_url)
    worker = worker_process(env)
    [outbox_id] = queue_committed(db, ("password_reset", "patient@example.com"))
    HueyDispatcher(create_tasks(settings, SystemClock())).dispatch([outbox_id])

    # Each failed attempt n stores when its retry is due in enqueued_at: now + 0.25 * 2**(n-1).
    due: dict[int, datetime] = {}

    def three_failures() -> bool:
        current = row(outbox_id)
        if current.attempts and current.attempts not in due:
            due[current.attempts] = current.enqueued_at
        return current.attempts >= 3

    wait_until(three_failures, 10, "three failed attempts", interval=0.01)
    failing = row(outbox_id)
    assert failing.status == "pending" and "ConnectionRefusedError" in failing.last_error
    assert RESET_TOKEN not in failing.last_error
    # Attempt n+1 waited for its due time, and the waits double: 0.25 s, 0.5 s, 1 s.
    assert (due[2] - due[1]).total_seconds() >= 0.5
    assert (due[3] - due[2]).total_seconds() >= 1.0

    with SmtpServer(port=port) as smtp:
        [message] = smtp.wait_for(1, timeout=10)
        wait_sent(outbox_id)
        # Stopped, the worker has finished every send it started; what is still queued runs here.
        assert worker.stop() == 0
        run_queued_tasks(create_tasks(settings, SystemClock()).huey)
        assert len(smtp.messages) == 1
    sent = row(outbox_id)
    assert sent.status == "sent" and sent.attempts == 4
    assert RESET_TOKEN in message.part("plain") and RESET_TOKEN not in sent.payload


def test_emails_queued_while_the_worker_is_down_arrive_once_when_it_starts(
    capsys: pytest.CaptureFixture[str],
    pg_url: str,
    redis_env: dict[str, str],
    bind_db: Callable[[str], pw.Database],
    smtp_server: SmtpServer,
    worker_process: Callable[[dict[str, str]], WorkerProcess],
) -> None:
    env = {
        **redis_env,
        **env_for(
            database_url=pg_url,
            smtp_host=smtp_server.host,
            smtp_port=smtp_server.port,
            outbox_relay_interval=0.1,
        ),
    }
    settings = make_settings(**env)
    db = bind_db(pg_url)
    recipients = [f"user{n}@example.com" for n in range(5)]
    ids = queue_committed(db, *(("welcome", recipient) for recipient in recipients))
    # Enqueued from this process (the "server") into Redis, with no worker running: they wait there.
    queue = create_tasks(settings, SystemClock())
    HueyDispatcher(queue).dispatch(ids)
    assert len(queue.huey) == 1, "one task carries the five"
    assert smtp_server.messages == [] and all(row(i).status == "pending" for i in ids)

    worker = worker_process(env)
    messages = smtp_server.wait_for(len(ids), timeout=15)
    delays = sorted(message.received_at - worker.started_at for message in messages)
    wait_sent(*ids)
    assert worker.stop() == 0
    # Nothing is sent twice: the relay finds nothing to enqueue, and whatever is still queued runs here.
    assert Worker(settings, SystemClock(), queue).relay_once() == 0
    run_queued_tasks(queue.huey)
    messages = smtp_server.messages
    assert sorted(m.rcpt_tos[0] for m in messages) == recipients
    assert len({m.message["Message-ID"] for m in messages}) == len(ids)
    with capsys.disabled():
        print(
            f"\ndelivery after the worker came back (process start to SMTP accept): "
            f"first {delays[0] * 1000:.0f} ms, all {len(delays)} by {delays[-1] * 1000:.0f} ms"
        )


def test_redis_down_at_dispatch_leaves_the_row_to_the_relay(
    pg_url: str,
    redis_env: dict[str, str],
    bind_db: Callable[[str], pw.Database],
    smtp_server: SmtpServer,
    worker_process: Callable[[dict[str, str]], WorkerProcess],
) -> None:
    env = {
        **redis_env,
        **env_for(
            database_url=pg_url,
            smtp_host=smtp_server.host,
            smtp_port=smtp_server.port,
            outbox_relay_interval=0.1,
        ),
    }
    db = bind_db(pg_url)
    [outbox_id] = queue_committed(db, ("welcome", "resilient@example.com"))
    down = make_settings(**{**env, "REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"})
    started = time.monotonic()
    HueyDispatcher(create_tasks(down, SystemClock())).dispatch([outbox_id])  # must not raise
    assert time.monotonic() - started < 1.0, "a dead queue must not hold the request"
    waiting = row(outbox_id)
    assert (waiting.status, waiting.enqueued_at) == ("pending", None)

    worker = worker_process(env)
    smtp_server.wait_for(1, timeout=15)
    wait_sent(outbox_id)
    assert worker.stop() == 0
    # Nothing is sent twice: the relay finds nothing to enqueue, and whatever is still queued runs here.
    settings = make_settings(**env)
    queue = create_tasks(settings, SystemClock())
    assert Worker(settings, SystemClock(), queue).relay_once() == 0
    run_queued_tasks(queue.huey)
    assert [m.rcpt_tos for m in smtp_server.messages] == [["resilient@example.com"]]


def test_a_hung_queue_redis_never_slows_or_fails_an_rpc_and_the_emails_still_arrive_once(
    pg_url: str,
    redis_env: dict[str, str],
    silent_redis: SilentServer,
    smtp_server: SmtpServer,
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    """Issue 10 item 2: the queue's Redis accepts connections and never answers."""
    hung = make_settings(
        database_url=pg_url,
        redis_url=silent_redis.url,
        redis_key_prefix=redis_env["REDIS_KEY_PREFIX"],
        reset_request_min_seconds=0.3,
    )
    working = make_settings(
        **redis_env,
        database_url=pg_url,
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        outbox_relay_interval=0.05,
    )
    clock = SystemClock()
    # Only the queue hangs: the code cache and the throttle use the working Redis.
    with running_api(
        hung,
        dispatcher=make_dispatcher(hung, clock),
        cache=make_code_cache(working),
        throttle=Throttle.from_settings(working, clock),
    ) as api:

        def timed(call: Callable[[], Any]) -> float:
            started = time.monotonic()
            call()  # raises unless the status is OK
            return time.monotonic() - started

        register = timed(lambda: api.register("first@example.com"))
        assert register < 1.0, f"Register took {register:.2f}s"
        assert User.select().where(User.email == "first@example.com").exists()

        # Identical timing for a known and an unknown address, whatever the queue does.
        known = timed(
            lambda: api.auth.RequestPasswordReset(
                auth_pb.RequestPasswordResetRequest(email="first@example.com")
            )
        )
        unknown = timed(
            lambda: api.auth.RequestPasswordReset(
                auth_pb.RequestPasswordResetRequest(email="nobody@example.com")
            )
        )
        assert 0.3 <= known < 1.0 and 0.3 <= unknown < 1.0, (known, unknown)
        assert abs(known - unknown) < 0.2, (known, unknown)

        # Many signups at once leave the pool free for an unrelated login.
        emails = [f"crowd{n}@example.com" for n in range(17)]
        with futures.ThreadPoolExecutor(len(emails)) as pool:
            signups = [pool.submit(timed, lambda email=email: api.register(email)) for email in emails]
            login = timed(
                lambda: api.auth.Login(
                    auth_pb.LoginRequest(email="first@example.com", password="correct horse battery")
                )
            )
            durations = [signup.result() for signup in signups]
        assert login < 1.0 and max(durations) < 2.0, (login, durations)
        assert User.select().count() == 1 + len(emails)

        # The relay hands every email to a working queue: each arrives once.
        ids = [outbox.id for outbox in api.outbox()]
        # Each signup queues a welcome and a verification email; the known reset request one more.
        assert len(ids) == 3 + 2 * len(emails)
        embedded_worker(working)
        smtp_server.wait_for(len(ids), timeout=15)
        wait_sent(*ids)
    recipients = sorted(message.rcpt_tos[0] for message in smtp_server.messages)
    assert recipients == sorted(["first@example.com"] * 3 + emails * 2)


def test_the_hand_off_gives_up_after_one_socket_timeout_and_the_breaker_stops_trying(
    pg_url: str, bind_db: Callable[[str], pw.Database], silent_redis: SilentServer
) -> None:
    settings = make_settings(database_url=pg_url, redis_url=silent_redis.url, redis_socket_timeout=0.4)
    db = bind_db(pg_url)
    ids = queue_committed(db, *(("welcome", f"user{n}@example.com") for n in range(4)))
    clock = SystemClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after=60)
    dispatcher = HueyDispatcher(create_tasks(settings, clock, enqueue_only=True), breaker)

    durations = []
    for outbox_id in ids:
        started = time.monotonic()
        dispatcher.dispatch([outbox_id])
        durations.append(time.monotonic() - started)
    # One timeout and one connection each: no retries (each retry reconnects and waits again).
    assert all(0.4 <= duration < 1.2 for duration in durations[:2]), durations
    assert breaker.is_open and silent_redis.connections == 2
    # Then the open breaker skips Redis: no wait, no connection.
    assert all(duration < 0.4 for duration in durations[2:]), durations
    assert all((row(i).status, row(i).enqueued_at) == ("pending", None) for i in ids), "left to the relay"


def test_an_embedded_worker_leaves_the_host_process_signal_handlers_alone(
    tmp_path: Path,
    sqlite_url: str,
    bind_db: Callable[[str], pw.Database],
    embedded_worker: Callable[[Settings], Worker],
) -> None:
    bind_db(sqlite_url)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    embedded_worker(make_settings(database_url=sqlite_url, huey_sqlite_path=tmp_path / "huey.db"))
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_sigterm_lets_the_running_delivery_finish(
    pg_url: str,
    redis_env: dict[str, str],
    bind_db: Callable[[str], pw.Database],
    worker_process: Callable[[dict[str, str]], WorkerProcess],
) -> None:
    with SmtpServer(data_delay=1.0) as smtp:
        env = {
            **redis_env,
            **env_for(database_url=pg_url, smtp_host=smtp.host, smtp_port=smtp.port),
        }
        db = bind_db(pg_url)
        worker = worker_process(env)
        [outbox_id] = queue_committed(db, ("password_changed", "careful@example.com"))
        HueyDispatcher(create_tasks(make_settings(**env), SystemClock())).dispatch([outbox_id])
        assert smtp.data_started.wait(10), "the delivery never reached the SMTP server"
        assert worker.stop(signal.SIGTERM) == 0
        assert len(smtp.messages) == 1
    assert row(outbox_id).status == "sent"


def test_tasks_are_registered_under_stable_names(tmp_path: Path) -> None:
    tasks = create_tasks(make_settings(huey_sqlite_path=tmp_path / "huey.db"), SystemClock())
    assert type(tasks.huey) is SqliteHuey
    # Queued messages name their task: a rename would strand what an older server enqueued.
    names = set(tasks.huey._registry._registry)
    assert names == {
        "referral_grpc.infra.tasks.deliver_email",
        "referral_grpc.infra.tasks.recheck_email",
        "referral_grpc.infra.tasks.deliver_webhook",
    }

"""The audit log: what appends a row, the hash chain, `audit verify` before and after tampering."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import peewee as pw
import pytest
from support import TEST_JWT_SECRET, FakeClock
from support.api import bearer
from support.rewards import RewardsApi, running_rewards

from referral_grpc.domain import audit
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.store.models import AuditEvent


@pytest.fixture
def rw(database_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(database_url, clock) as api:
        yield api


def audit_verify(database_url: str) -> subprocess.CompletedProcess[str]:
    """`referral-grpc audit verify` as an operator runs it: a separate process on the same database."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "JWT_SECRET": TEST_JWT_SECRET,
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "referral_grpc", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def actions() -> list[tuple[str, str, str]]:
    return [(row.actor, row.action, row.target) for row in AuditEvent.select().order_by(AuditEvent.seq)]


def _audited_history(rw: RewardsApi) -> int:
    """Key creation and revocation, a program change, a password change and a reset: the user's id."""
    rw.api.app.api_keys.create("ops", ["admin:read"])
    rw.api.app.api_keys.revoke("ops")
    rw.api.app.api_keys.revoke("ops")  # already revoked: nothing happens, nothing is recorded
    rw.set_program()
    rw.set_program(hold_days=3)
    tokens = rw.api.register("owner@example.com")
    rw.api.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(
            current_password="correct horse battery", new_password="another long one"
        ),
        metadata=bearer(tokens.access_token),
    )
    rw.api.auth.RequestPasswordReset(auth_pb.RequestPasswordResetRequest(email="owner@example.com"))
    rw.api.auth.ResetPassword(
        auth_pb.ResetPasswordRequest(
            token=rw.api.reset_token_for("owner@example.com"), new_password="third one!!"
        )
    )
    return int(tokens.user_id)


def test_every_audited_action_appends_a_chained_row(rw: RewardsApi) -> None:
    user_id = _audited_history(rw)
    backend = AuditEvent.select().order_by(AuditEvent.seq).first().target
    assert actions() == [
        ("operator", "apikey.create", backend),
        ("operator", "apikey.create", "key:ops"),
        ("operator", "apikey.revoke", "key:ops"),
        ("operator", "program.update", "program"),
        ("operator", "program.update", "program"),
        (f"user:{user_id}", "password.change", f"user:{user_id}"),
        (f"user:{user_id}", "password.reset", f"user:{user_id}"),
    ]
    rows = list(AuditEvent.select().order_by(AuditEvent.seq))
    assert [row.seq for row in rows] == list(range(1, len(rows) + 1))
    assert rows[0].prev_hash == audit.GENESIS_HASH
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(rows))
    second_program = rows[4]
    assert '"hold_days":14' in second_program.before and '"hold_days":3' in second_program.after
    assert all(row.request_id for row in rows)
    # The RPCs' rows carry the request id the interceptor assigned; the CLI's have none ("-").
    assert rows[5].request_id != "-" and rows[0].request_id == "-"
    assert audit.verify_chain().broken is None


def _tamper(rw: RewardsApi, statements: str) -> None:
    db = rw.api.app.db
    with db.atomic():
        if isinstance(db, pw.PostgresqlDatabase):
            # What only a superuser (or the table's owner) can do: switch the append-only trigger off.
            db.execute_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
        for statement in statements.split(";"):
            db.execute_sql(statement)
        if isinstance(db, pw.PostgresqlDatabase):
            db.execute_sql("ALTER TABLE audit_events ENABLE TRIGGER USER")


@pytest.mark.parametrize(
    ("statements", "message"),
    [
        ('UPDATE audit_events SET after = \'{"scopes":["admin:write"]}\' WHERE seq = 2', "row 2 was changed"),
        ("UPDATE audit_events SET actor = 'someone-else' WHERE seq = 6", "row 6 was changed"),
        ("DELETE FROM audit_events WHERE seq = 3", "row 3 was deleted"),
        (
            "UPDATE audit_events SET seq = -4 WHERE seq = 4;"
            " UPDATE audit_events SET seq = 4 WHERE seq = 5;"
            " UPDATE audit_events SET seq = 5 WHERE seq = -4",
            "row 4 was reordered",
        ),
    ],
    ids=["edited-after", "edited-actor", "deleted", "swapped"],
)
def test_audit_verify_passes_then_names_the_first_tampered_row(
    rw: RewardsApi, database_url: str, statements: str, message: str
) -> None:
    _audited_history(rw)
    whole = audit_verify(database_url)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.startswith("audit log intact: 7 rows, head ")
    _tamper(rw, statements)
    broken = audit_verify(database_url)
    assert broken.returncode == 1
    assert f"audit log broken: {message}" in broken.stderr


def test_postgres_refuses_updates_and_deletes_of_audit_rows(pg_url: str, clock: FakeClock) -> None:
    with running_rewards(pg_url, clock) as rw:
        db = rw.api.app.db
        for statement in (
            "UPDATE audit_events SET actor = 'x'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(pw.ProgrammingError, match="append-only"), db.atomic():
                db.execute_sql(statement)
        assert AuditEvent.select().count() == 1
        assert audit.verify_chain().broken is None


def test_concurrent_appends_make_one_linear_chain(pg_url: str, clock: FakeClock) -> None:
    """Without the append lock, parallel transactions read the same head and both chain onto it."""
    with running_rewards(pg_url, clock) as rw:
        workers, per_worker = 8, 5
        start = threading.Barrier(workers)
        failures: list[BaseException] = []

        def create_keys(worker: int) -> None:
            start.wait()
            try:
                for n in range(per_worker):
                    rw.api.app.api_keys.create(f"k-{worker}-{n}", ["admin:read"])
            except BaseException as exc:  # reported below, with the chain's state
                failures.append(exc)

        threads = [threading.Thread(target=create_keys, args=(w,)) for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert AuditEvent.select().count() == 1 + workers * per_worker
        result = audit.verify_chain()
        assert (result.broken, result.rows) == (None, 1 + workers * per_worker)

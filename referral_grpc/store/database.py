"""Database connection: PostgreSQL through a psycopg2 pool in production, SQLite embedded."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
import select
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import peewee as pw
import psycopg2  # type: ignore[import-untyped]  # no stubs in the dev dependencies
from peewee import Psycopg2Adapter
from playhouse.pool import PooledPostgresqlDatabase

from ..request_context import DeadlineExceeded, RequestAbandoned, check_alive, is_abandoned, time_remaining
from ..settings import Settings
from .models import User, database


class _LivenessAdapter(Psycopg2Adapter):
    """Checks a pooled connection at check-out without a round trip while the socket is quiet.

    peewee's own check sends `SELECT 1` on every check-out (under the pool's lock): a round trip per
    RPC. An idle connection has nothing to read, so a readable socket means the server said
    something on its own: in practice that it is closing the connection (a restart, a terminated
    backend, a dropped database), which it announces with an error message and then EOF. Only then,
    or when the driver already knows the state is odd, is the round trip made, as before.
    """

    def is_connection_closed(self, conn: Any) -> bool:
        if conn.closed or self.txn_status(conn) != self.txn_idle:
            return bool(super().is_connection_closed(conn))
        try:
            # poll, not select: select refuses descriptors above 1023, which a busy process reaches.
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
            spoke = bool(poller.poll(0))  # POLLHUP and POLLERR are reported whatever was asked
        except (OSError, ValueError):
            spoke = True
        return bool(super().is_connection_closed(conn)) if spoke else False


class _Connection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A pooled connection that knows which statements its server session has prepared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()


class PostgresPool(PooledPostgresqlDatabase):  # type: ignore[misc]
    """The pooled PostgreSQL database; remembers the statement cap its connections start with, and
    whether the hot paths' statements are prepared on the server (`run_sql`)."""

    psycopg2_adapter = _LivenessAdapter

    def __init__(
        self, *args: Any, statement_timeout_ms: int = 0, prepare_statements: bool = False, **kwargs: Any
    ) -> None:
        if prepare_statements:
            kwargs["connection_factory"] = _Connection
        super().__init__(*args, **kwargs)
        self.statement_timeout_ms = statement_timeout_ms
        self.prepare_statements = prepare_statements

    # A transaction's BEGIN (and what `defer` adds) is sent with its first statement, in one message:
    # on its own it cost a round trip, during which the server's thread waits for PostgreSQL and
    # PostgreSQL, idle in the transaction, then waits for the thread to send the next statement.
    # Statements are separated by ";" in one simple query: PostgreSQL runs them in order, and an
    # error in the statement leaves the transaction open and aborted, as it would have been.

    def begin(self, isolation_level: Any = None) -> None:
        if isolation_level is not None or self._isolation_level is not None:
            super().begin(isolation_level)
            return
        if self.is_closed():
            # As BEGIN's own cursor did: connecting resets the thread's state, so it comes first.
            self.connect()
        self._state.unsent = "BEGIN;"

    def defer(self, sql: str) -> bool:
        """Send `sql` (no parameters) with the transaction's first statement, if that is still to come;
        whether it will be."""
        unsent: str = getattr(self._state, "unsent", "")
        if not unsent:
            return False
        self._state.unsent = f"{unsent}{sql};"
        return True

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        unsent: str = getattr(self._state, "unsent", "")
        if unsent:
            self._state.unsent = ""
            sql = unsent + sql
        return super().execute_sql(sql, params)

    def commit(self) -> None:
        if getattr(self._state, "unsent", ""):
            self._state.unsent = ""  # nothing was sent: there is nothing to commit
            return
        super().commit()

    def rollback(self) -> None:
        if getattr(self._state, "unsent", ""):
            self._state.unsent = ""
            return
        super().rollback()


def make_database(settings: Settings) -> pw.Database:
    """Build (but do not connect) the database described by DATABASE_URL."""
    target = settings.database
    if target.is_sqlite:
        return pw.SqliteDatabase(
            target.database,
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                "synchronous": "normal",
                # Writers queue for up to 5 s instead of failing at once with "database is locked".
                "busy_timeout": 5000,
            },
            timeout=5,
        )
    options = "-c timezone=UTC"
    if settings.db_statement_timeout_ms:
        options += f" -c statement_timeout={settings.db_statement_timeout_ms}"
    pool: pw.Database = PostgresPool(
        target.database,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        prepare_statements=settings.db_prepare_statements,
        **{
            **target.connect_params,
            # One connection per server worker thread; a bounded wait when all are busy.
            "max_connections": settings.db_pool_size,
            "timeout": settings.db_pool_timeout,
            "stale_timeout": 300,
            "connect_timeout": 2,
            "options": options,
        },
    )
    return pool


def init_database(settings: Settings) -> pw.Database:
    """Create the database for `settings` and bind the models to it."""
    db = make_database(settings)
    database.initialize(db)
    return db


def is_postgres(db: pw.Database) -> bool:
    return isinstance(db, pw.PostgresqlDatabase)


# PostgreSQL's statement timer and our monotonic clock disagree by a few milliseconds.
_TIMER_SLACK = 0.05


def _cancelled_by_deadline(exc: BaseException) -> bool:
    """A statement cancelled by our SET LOCAL statement_timeout is the deadline, not a database fault."""
    remaining = time_remaining()
    return isinstance(exc, pw.OperationalError) and remaining is not None and remaining <= _TIMER_SLACK


class _DeadlineTransaction:
    """A write transaction that never commits after the request's deadline.

    The caller has already been told DEADLINE_EXCEEDED by then, so a late commit would be a change
    the client believes failed (and may retry). On PostgreSQL every statement is also bounded by
    the time left (SET LOCAL statement_timeout), so a blocked statement cannot outlive the deadline.
    """

    def __init__(self, db: pw.Database) -> None:
        self._db = db
        self._atomic = db.atomic("IMMEDIATE") if isinstance(db, pw.SqliteDatabase) else db.atomic()

    def __enter__(self) -> Any:
        check_alive()
        transaction = self._atomic.__enter__()
        timeout_ms = _deadline_timeout_ms(self._db)
        if timeout_ms is not None:
            setting = f"SET LOCAL statement_timeout = {timeout_ms}"
            try:
                if not (isinstance(self._db, PostgresPool) and self._db.defer(setting)):
                    self._db.execute_sql(setting)  # type: ignore[no-untyped-call]
            except BaseException as exc:
                self._atomic.__exit__(type(exc), exc, exc.__traceback__)
                raise
        return transaction

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._atomic.__exit__(exc_type, exc, tb)  # rolls back
            if _cancelled_by_deadline(exc):
                raise DeadlineExceeded() from exc
            return
        remaining = time_remaining()
        late: Exception | None = None
        if remaining is not None and remaining <= 0:
            late = DeadlineExceeded()
        elif is_abandoned():
            late = RequestAbandoned()
        if late is not None:
            self._atomic.__exit__(type(late), late, None)  # rolls back instead of committing
            raise late
        try:
            self._atomic.__exit__(None, None, None)  # commits
        except pw.OperationalError as failed:
            if _cancelled_by_deadline(failed):
                raise DeadlineExceeded() from failed
            raise


def _deadline_timeout_ms(db: pw.Database) -> int | None:
    """The statement timeout the request's deadline needs: the time left when it is under the
    connection's cap (a caller's deadline never lifts the cap); None when the cap is enough."""
    remaining = time_remaining()
    if remaining is None or not is_postgres(db):
        return None
    # 0 would mean "no limit": a deadline that is about to pass gets 1 ms.
    timeout_ms = max(1, math.ceil(remaining * 1000))
    cap_ms = db.statement_timeout_ms if isinstance(db, PostgresPool) else 0
    if cap_ms and timeout_ms >= cap_ms:
        return None
    return timeout_ms


def single_statement_write(db: pw.Database) -> bool:
    """Whether a write that is one statement may run as a transaction of its own (autocommit)
    instead of inside write_transaction: one round trip instead of BEGIN, the statement and COMMIT.

    PostgreSQL only (SQLite's writers take the write lock up front), outside a transaction, and
    only while the connection's statement cap ends the statement before the request's deadline
    would pass; a tighter deadline needs write_transaction's SET LOCAL. Raises DeadlineExceeded
    or RequestAbandoned, as write_transaction does, when the caller has stopped waiting.
    """
    if not is_postgres(db) or db.in_transaction():
        return False
    check_alive()
    return _deadline_timeout_ms(db) is None


# The SQLSTATE of abort_statement() (migrations/007_abort_statement.py).
STATEMENT_ABORTED = "RF001"


def statement_aborted(exc: pw.DatabaseError) -> bool:
    """Whether the statement called abort_statement(): it changed nothing, on purpose."""
    return _sqlstate(exc) == STATEMENT_ABORTED


def lock_not_available(exc: pw.OperationalError) -> bool:
    """Whether PostgreSQL refused a NOWAIT lock that another transaction holds (lock_not_available)."""
    return _sqlstate(exc) == "55P03"


def _sqlstate(exc: pw.DatabaseError) -> str | None:
    """The SQLSTATE of the PostgreSQL error peewee wrapped (None on SQLite)."""
    code: str | None = getattr(getattr(exc, "orig", None), "pgcode", None)
    return code


def write_transaction(db: pw.Database) -> Any:
    """A transaction that will write, bounded by the request's deadline (see request_deadline).

    On SQLite it takes the write lock up front (BEGIN IMMEDIATE): a deferred transaction that
    reads first and writes later can fail with SQLITE_BUSY instead of waiting its turn.
    """
    return _DeadlineTransaction(db)


class DatabaseProbe:
    """`SELECT 1` on a connection of its own, for the server's health status.

    Not from the pool: a pool exhausted by busy RPCs is not an unhealthy database, and the probe
    must not wait for a pooled connection. The PostgreSQL connection is kept between checks and
    opened again once when it fails, so the first check after a database restart already succeeds.
    """

    def __init__(self, settings: Settings, timeout: float) -> None:
        self._settings = settings
        self._timeout = timeout
        self._conn: Any = None

    def check(self) -> None:
        """Return if the database answers; raise (psycopg2.Error, sqlite3.Error) if it does not."""
        target = self._settings.database
        if target.is_sqlite:
            conn = sqlite3.connect(target.database, timeout=self._timeout)
            try:
                # Touches the file, unlike a bare SELECT 1.
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                conn.close()
            return
        try:
            self._select_one()
        except psycopg2.Error:
            self.close()
            self._select_one()

    def _select_one(self) -> None:
        if self._conn is None:
            target = self._settings.database
            timeout_ms = max(1, math.ceil(self._timeout * 1000))
            self._conn = psycopg2.connect(
                **{
                    **target.connect_params,
                    "dbname": target.database,
                    # libpq rounds up to whole seconds, and treats 1 as 2.
                    "connect_timeout": max(1, math.ceil(self._timeout)),
                    "options": f"-c statement_timeout={timeout_ms}",
                    "application_name": "referral-grpc-health",
                }
            )
            self._conn.autocommit = True
        with self._conn.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # A broken connection has nothing left to release.
            with contextlib.suppress(psycopg2.Error):
                conn.close()


class Prepared:
    """A peewee SELECT compiled once for one database, then run with new values.

    Building a peewee query costs more Python per call (about 0.2 ms for a model's whole row) than
    the indexed read it runs, and so does peewee's reading of the result (it works out each column's
    field again for every query), so the hot paths compile theirs once and read rows through the
    converters found here. Each value is a `placeholder`; a query with any other bound value is
    refused here, so values cannot land in the wrong place. A query selects fields of its model only,
    and rows come back as model instances, converted by those fields as a peewee select's are.
    """

    def __init__(self, db: pw.Database, query: Any) -> None:
        sql, params = query.bind(db).sql()
        if params:
            raise ValueError(f"a prepared query takes every value as a placeholder, not {params!r}")
        model = query.model
        fields = list(query.selected_columns)
        if not all(isinstance(f, pw.Field) and f.model is model for f in fields):
            raise ValueError(f"a prepared query selects fields of {model.__name__} only")
        self._db = db
        self._model = model
        self._sql = sql
        self._columns = row_reader(fields)

    @classmethod
    def statement(cls, db: pw.Database, model: type[pw.Model], sql: str) -> Prepared:
        """Hand-written SQL (an INSERT or UPDATE) that ends in `RETURNING {whole_row(model)}`."""
        if not sql.endswith(f"RETURNING {whole_row(model)}"):
            raise ValueError(f"the statement must return the whole {model.__name__} row")
        prepared = cls.__new__(cls)
        prepared._db = db
        prepared._model = model
        prepared._sql = sql
        prepared._columns = row_reader(model._meta.sorted_fields)
        return prepared

    def _instance(self, row: Sequence[Any]) -> Any:
        return instance(self._model, self._columns, row)

    def rows(self, *values: object) -> list[Any]:
        return [self._instance(row) for row in run_sql(self._db, self._sql, values).fetchall()]

    def first(self, *values: object) -> Any:
        """The first row, or None: for reads by a unique key."""
        row = run_sql(self._db, self._sql, values).fetchone()
        return None if row is None else self._instance(row)


RowReader = tuple[tuple[str, Any], ...]


def row_reader(fields: Sequence[pw.Field]) -> RowReader:
    """Each column's field name and converter, found once: what peewee works out again per query."""
    return tuple((field.name, field.python_value) for field in fields)


def instance(model: type[pw.Model], reader: RowReader, row: Sequence[Any]) -> Any:
    """A model instance from the values of the reader's columns, as peewee builds a selected row:
    converted by the fields, no defaults filled in, nothing marked as changed."""
    values = {name: convert(value) for (name, convert), value in zip(reader, row, strict=True)}
    built: Any = model(__no_default__=1, **values)
    built._dirty.clear()
    return built


def joined_instances(row: Sequence[Any], parts: Sequence[tuple[type[pw.Model], RowReader]]) -> list[Any]:
    """The model instances side by side in a joined row (each part's columns as `whole_row` lists them);
    None for a part whose first column (its id) is NULL: a LEFT JOIN that found nothing."""
    found, start = [], 0
    for model, reader in parts:
        values = row[start : start + len(reader)]
        found.append(None if values[0] is None else instance(model, reader, values))
        start += len(reader)
    return found


def whole_row(model: type[pw.Model], alias: str = "") -> str:
    """A model's columns in field order (qualified by `alias` if given): the RETURNING of a hand-written
    statement (`Prepared.statement`), or one part of a joined row (`joined_instances`)."""
    qualifier = f"{alias}." if alias else ""
    return ", ".join(f'{qualifier}"{field.column_name}"' for field in model._meta.sorted_fields)


# Every UTCDateTimeField converts alike; any one of them stands for all.
_ANY_TIME_FIELD = User.created_at


def stored_time(value: datetime) -> Any:
    """A time as the models' UTCDateTimeField stores it (TIMESTAMPTZ, or fixed-width text on SQLite):
    the value hand-written SQL binds."""
    return _ANY_TIME_FIELD.db_value(value)


def placeholder(db: pw.Database) -> Any:
    """Where a value goes in a `Prepared` query."""
    return pw.SQL(db.param)


def run_sql(db: pw.Database, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> Any:
    """Run hand-written SQL (the hot paths' prebuilt statements) and return the DB-API cursor.

    On PostgreSQL (unless DB_PREPARE_STATEMENTS=false) each statement is prepared once per
    connection and then executed by name: PostgreSQL parses and plans it once instead of on every
    call, which was a third of its time on a RecordEvent. The values are bound exactly as before.
    """
    if isinstance(db, PostgresPool) and db.prepare_statements:
        statement = _server_statement(sql)
        prepared: set[str] = db.connection().prepared
        if statement is not None and (
            statement.name in prepared or len(prepared) < MAX_PREPARED_PER_CONNECTION
        ):
            if statement.name not in prepared:
                # Not undone by a rollback: PREPARE outlives the transaction it runs in.
                db.execute_sql(statement.prepare, ())
                prepared.add(statement.name)
            return db.execute_sql(statement.execute, params)
    return db.execute_sql(sql, params)  # type: ignore[no-untyped-call]


# Statements a connection prepares at most; beyond, more (e.g. IN lists of yet another length) run as
# plain SQL, so a session's memory stays bounded.
MAX_PREPARED_PER_CONNECTION = 256
_PLACEHOLDER = re.compile(r"%(?:s|%|\((\w+)\)s)")
# What PREPARE takes; anything else (DDL, SET) runs as plain SQL.
_PREPARABLE = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH|VALUES)\b", re.IGNORECASE)


class _ServerStatement:
    """A hand-written statement as PREPARE and EXECUTE: the name is a digest of its SQL, so every
    process and connection names the same statement alike. Values stay where psycopg2 puts them,
    as %s in order or as %(name)s (each name one parameter, however often it appears)."""

    def __init__(self, sql: str) -> None:
        self.name = "referral_" + hashlib.blake2b(sql.encode(), digest_size=10).hexdigest()
        order: list[str] = []  # the value of each $n: "" for the next positional one, else its name
        numbers: dict[str, int] = {}

        def number(found: re.Match[str]) -> str:
            if found.group() == "%%":
                return "%%"  # psycopg2 still formats the PREPARE: a literal % stays escaped
            name = found.group(1)
            if name is None:
                order.append("")
                return f"${len(order)}"
            if name not in numbers:
                order.append(name)
                numbers[name] = len(order)
            return f"${numbers[name]}"

        body = _PLACEHOLDER.sub(number, sql)
        self.prepare = f"PREPARE {self.name} AS {body}"
        values = ", ".join(f"%({name})s" if name else "%s" for name in order)
        self.execute = f"EXECUTE {self.name}({values})" if order else f"EXECUTE {self.name}"


@functools.lru_cache(maxsize=1024)
def _server_statement(sql: str) -> _ServerStatement | None:
    """The statement's PREPARE and EXECUTE, worked out once per text; None if it cannot be prepared."""
    return _ServerStatement(sql) if _PREPARABLE.match(sql) else None


# PostgreSQL: the channel the appending transaction notifies (delivered at commit, in commit order)
# and the advisory lock that puts event cursors in commit order (domain.events.append_events takes it).
# A BIGSERIAL hands out ids at insert time, not at commit: without the lock, a transaction that took
# cursor 7 could commit after a reader had already seen 8 and moved past 7 for ever. Held from the
# insert to the commit, the lock makes cursor order commit order. SQLite serialises writers already
# (BEGIN IMMEDIATE).
EVENTS_CHANNEL = "referral_events"
EVENT_LOG_LOCK = 0x72656665  # "refe": any constant no other advisory lock of this database uses

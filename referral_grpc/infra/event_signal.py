"""EventSignal adapters: a LISTEN connection per process on PostgreSQL, short polling on SQLite."""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time

import psycopg2  # type: ignore[import-untyped]  # no stubs in the dev dependencies

from ..settings import Settings
from ..store.database import EVENTS_CHANNEL
from ..store.models import Event

log = logging.getLogger(__name__)

# How often SQLite readers look for new events: well under the stream's 100 ms delivery target.
POLL_INTERVAL = 0.02
# A lost listener connection is opened again after this long; readers poll meanwhile.
RECONNECT_DELAY = 1.0
# The listener lets its connection go once no reader has asked for this long (a waiting stream asks at
# least every WATCH_SLICE, a second): while it LISTENs, every commit that appends events also signals
# its PostgreSQL backend and wakes its thread, which cost 12-15% of RecordEvent's throughput with no
# stream open. The next reader starts it again.
IDLE_AFTER = 10.0


class PollingEventSignal:
    """SQLite has no notifications: readers look again every POLL_INTERVAL."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self._interval = interval
        self._closed = threading.Event()

    def wait(self, after_cursor: int, timeout: float) -> None:
        self._closed.wait(min(self._interval, timeout))

    def committed_cursor(self) -> int | None:
        return None

    def close(self) -> None:
        self._closed.set()


class PostgresEventSignal:
    """One dedicated psycopg2 connection per server process LISTENs on the events channel.

    The appending transaction sends NOTIFY with its last cursor; PostgreSQL delivers it at commit,
    so the highest cursor notified is always committed. While the listener is disconnected,
    notifications may be lost: readers then wake every RECONNECT_DELAY and read the log anyway.
    The listener runs while readers use it: started by the first, stopped `idle_after` seconds after
    the last one asked (a stream that is still there asks again within a second, see WATCH_SLICE).
    """

    def __init__(self, settings: Settings, idle_after: float = IDLE_AFTER) -> None:
        self._settings = settings
        self._idle_after = idle_after
        self._latest = 0
        self._connected = False
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._conn: object = None
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._started = False
        self._listening = threading.Event()
        self._asked = time.monotonic()

    def wait(self, after_cursor: int, timeout: float) -> None:
        self._asked = time.monotonic()
        if not self._started:
            # Started by the first stream, not by every process that builds the app (CLI commands),
            # and again by the next one after it let go; the reader then reads again, since events
            # may have committed before the LISTEN.
            with self._start:
                if not self._started:
                    self._started = True
                    self._listening.clear()
                    self._thread = threading.Thread(target=self._run, name="events-listener", daemon=True)
                    self._thread.start()
            self._listening.wait(min(timeout, 2.0))
            return
        with self._changed:
            if not self._connected:
                timeout = min(timeout, RECONNECT_DELAY)
            if self._latest <= after_cursor:
                self._changed.wait(timeout)

    def committed_cursor(self) -> int | None:
        """The highest cursor notified, while the listener is connected: NOTIFY is delivered at commit,
        and cursor order is commit order (the log's lock), so every event up to it has committed.
        Set on connecting to the log's last cursor, so events committed before the LISTEN count."""
        self._asked = time.monotonic()
        with self._changed:
            return self._latest if self._connected else None

    def close(self) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout=5)

    def _idle(self) -> bool:
        return time.monotonic() - self._asked > self._idle_after

    def _run(self) -> None:
        while not self._stopping.is_set():
            lost = False
            try:
                self._listen()
            except psycopg2.Error as exc:
                lost = True
                log.warning("event listener lost its connection (%s): readers poll until it is back", exc)
            finally:
                self._set_connected(False)
            with self._start:
                # Under the lock a reader takes to start a listener: one that asks from now on finds
                # none running and starts one; one that asked meanwhile keeps this one going.
                if self._idle():
                    self._started = False
                    return
            if lost:
                self._stopping.wait(RECONNECT_DELAY)

    def _listen(self) -> None:
        target = self._settings.database
        conn = psycopg2.connect(
            **{
                **target.connect_params,
                "dbname": target.database,
                "connect_timeout": 2,
                "application_name": "referral-grpc-events",
            }
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"LISTEN {EVENTS_CHANNEL}")
                # After the LISTEN: a later commit is notified, an earlier one is counted here.
                cursor.execute(f'SELECT COALESCE(max(id), 0) FROM "{Event._meta.table_name}"')  # noqa: S608
                committed = int(cursor.fetchone()[0])
            with self._changed:
                self._latest = max(self._latest, committed)
            self._set_connected(True)
            self._listening.set()
            while not self._stopping.is_set() and not self._idle():
                if select.select([conn], [], [], 0.5) == ([], [], []):
                    continue
                conn.poll()
                latest = 0
                while conn.notifies:
                    note = conn.notifies.pop(0)
                    with contextlib.suppress(ValueError):
                        latest = max(latest, int(note.payload))
                if latest:
                    with self._changed:
                        self._latest = max(self._latest, latest)
                        self._changed.notify_all()
        finally:
            with contextlib.suppress(psycopg2.Error):
                conn.close()

    def _set_connected(self, connected: bool) -> None:
        with self._changed:
            self._connected = connected
            # Readers waiting without a listener must look at the log themselves.
            self._changed.notify_all()


def make_event_signal(settings: Settings) -> PollingEventSignal | PostgresEventSignal:
    if settings.database.is_sqlite:
        return PollingEventSignal()
    return PostgresEventSignal(settings)

"""The event log over a real server: every change appends its event, ListEvents pages, WatchEvents resumes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import peewee as pw
import pytest
import requests
from google.protobuf import json_format
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import TEST_JWT_SECRET, FakeClock, make_settings, wait_until
from support.api import bearer, expect_error
from support.envoy import migrate, running_envoy, running_server, server_env
from support.rewards import RewardsApi, running_rewards

from referral_grpc.api.events import event_message, payload_field
from referral_grpc.domain.events import (
    EVENT_TYPES,
    USER_REGISTERED,
    EventLog,
    EventStream,
    EventView,
    NewEvent,
    append_events,
)
from referral_grpc.gen import auth_service_pb2 as auth_pb
from referral_grpc.gen import event_service_pb2 as ev_pb
from referral_grpc.gen import event_service_pb2_grpc
from referral_grpc.gen import referral_service_pb2 as ref_pb
from referral_grpc.infra.event_signal import PostgresEventSignal
from referral_grpc.store.database import init_database, write_transaction
from referral_grpc.store.migrate import run_migrations
from referral_grpc.store.models import Event, LedgerEntry, RewardEvent


@pytest.fixture
def rw(database_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(database_url, clock) as api:
        yield api


def events_stub(rw: RewardsApi) -> event_service_pb2_grpc.EventServiceStub:
    return event_service_pb2_grpc.EventServiceStub(rw.api.channel)


def reader(rw: RewardsApi) -> tuple[tuple[str, str]]:
    return (("x-api-key", rw.new_key("events:read")),)


def list_all(rw: RewardsApi, **request: Any) -> list[ev_pb.Event]:
    response = events_stub(rw).ListEvents(ev_pb.ListEventsRequest(**request), metadata=reader(rw))
    return list(response.events)


def payload(event: ev_pb.Event) -> Any:
    return getattr(event, event.WhichOneof("payload"))


def test_every_declared_type_has_its_payload_message() -> None:
    oneof = ev_pb.Event.DESCRIPTOR.oneofs_by_name["payload"]
    assert sorted(f.name for f in oneof.fields) == sorted(payload_field(t) for t in EVENT_TYPES)


def test_the_rewards_walk_writes_each_change_once_in_order(rw: RewardsApi, clock: FakeClock) -> None:
    rw.set_program()
    referrer, referrer_email, token = rw.person()
    code = rw.code_of(token)
    newcomer, newcomer_email, newcomer_token = rw.person(code)
    purchase = rw.event(newcomer, amount_minor=12_345)
    clock.advance(days=14)
    rw.redeem(referrer, 200, "redeem-1")
    rw.event(newcomer, type="refund", refunds=purchase.event_id)
    # Two weeks on, the access tokens have expired: sign in again.
    token, newcomer_token = (
        rw.api.auth.Login(auth_pb.LoginRequest(email=email, password="correct horse battery")).access_token
        for email in (referrer_email, newcomer_email)
    )
    rw.api.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(
            current_password="correct horse battery", new_password="a new long passphrase"
        ),
        metadata=bearer(newcomer_token),
    )
    rw.api.referrals.DeleteReferralCode(ref_pb.DeleteReferralCodeRequest(), metadata=bearer(token))

    events = list_all(rw)
    assert [e.type for e in events] == [
        "program.updated",
        "user.registered",
        "code.created",
        "user.registered",
        "referral.created",
        "referral.qualified",
        "reward.credited",
        "reward.credited",
        "reward.redeemed",
        "referral.reversed",
        "reward.reversed",
        "reward.reversed",
        "user.password_changed",
        "code.deleted",
    ]
    cursors = [e.cursor for e in events]
    assert cursors == sorted(set(cursors)) and cursors[0] > 0
    assert len({e.id for e in events}) == len(events) and all(e.id.startswith("evt_") for e in events)
    assert all(e.WhichOneof("payload") == payload_field(e.type) for e in events)
    by_type = {e.type: payload(e) for e in events}
    assert by_type["referral.created"] == ev_pb.ReferralCreated(
        referee_user_id=newcomer, referrer_user_id=referrer, code=code
    )
    assert by_type["referral.qualified"].qualifying_event_id == purchase.event_id
    credited = {
        (p.user_id, p.kind, p.amount_minor)
        for p in map(payload, events)
        if isinstance(p, ev_pb.RewardCredited)
    }
    assert credited == {(referrer, "referrer_reward", 500), (newcomer, "referee_reward", 1234)}
    assert by_type["reward.redeemed"] == ev_pb.RewardRedeemed(
        user_id=referrer,
        ledger_entry_id=by_type["reward.redeemed"].ledger_entry_id,
        amount_minor=200,
        currency="USD",
    )
    assert by_type["user.password_changed"] == ev_pb.UserPasswordChanged(user_id=newcomer, via="change")
    assert by_type["code.deleted"] == ev_pb.CodeDeleted(user_id=referrer, code=code)
    # No secret reaches the log: no token, hash or password in any payload.
    stored = " ".join(row.payload for row in Event.select())
    for secret in (token, newcomer_token, "correct horse battery", "password_hash"):
        assert secret not in stored


def test_a_qualifying_event_logs_its_ledger_entries_as_stored(rw: RewardsApi) -> None:
    """The referral.qualified and reward.credited rows hold exactly what the ledger holds (on PostgreSQL
    the entry ids are filled in by the statement that inserts the entries), in the order credited."""
    program = rw.set_program()
    referrer, newcomer = rw.pair()
    purchase = rw.event(newcomer, amount_minor=12_345)
    event = RewardEvent.get(RewardEvent.event_id == purchase.event_id)
    entries = list(LedgerEntry.select().where(LedgerEntry.event == event.id).order_by(LedgerEntry.id))
    assert [(e.user_id, e.kind) for e in entries] == [
        (referrer, "referrer_reward"),
        (newcomer, "referee_reward"),
    ]
    logged = list(
        Event.select().where(Event.type.in_(["referral.qualified", "reward.credited"])).order_by(Event.id)
    )
    assert [row.type for row in logged] == ["referral.qualified", "reward.credited", "reward.credited"]

    def stored(payload: dict[str, Any]) -> str:
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    qualified = {
        "referee_user_id": newcomer,
        "referrer_user_id": referrer,
        "qualifying_event_id": purchase.event_id,
        "program_version": program.version,
    }
    credited = [
        {
            "user_id": e.user_id,
            "ledger_entry_id": e.id,
            "kind": e.kind,
            "amount_minor": e.amount_minor,
            "currency": e.currency,
            "referee_user_id": e.referral_user_id,
            "available_at": e.available_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }
        for e in entries
    ]
    assert [row.payload for row in logged] == [stored(qualified), *map(stored, credited)]
    # What the call answered is what was stored.
    assert [(r.id, r.amount_minor) for r in purchase.rewards] == [(e.id, e.amount_minor) for e in entries]
    assert RewardEvent.get_by_id(event.id).outcome == json.dumps(
        {"referral_state": "qualified", "skipped": []}
    )


def test_a_change_that_fails_appends_nothing(rw: RewardsApi) -> None:
    referrer, email, _ = rw.person()
    before = Event.select().count()
    with pytest.raises(grpc.RpcError):
        rw.redeem(referrer, 1, "too-much")  # nothing available yet
    with pytest.raises(grpc.RpcError):
        rw.api.register(email.upper())  # taken
    assert Event.select().count() == before


def test_list_events_pages_and_filters(rw: RewardsApi) -> None:
    for _ in range(5):
        rw.pair()
    everything = list_all(rw)
    stub, auth = events_stub(rw), reader(rw)
    seen: list[ev_pb.Event] = []
    cursor = 0
    while True:
        page = stub.ListEvents(ev_pb.ListEventsRequest(after_cursor=cursor, page_size=3), metadata=auth)
        seen.extend(page.events)
        if not page.events:
            assert page.next_cursor == cursor
            break
        assert len(page.events) <= 3 and page.next_cursor == page.events[-1].cursor
        cursor = page.next_cursor
    assert [e.id for e in seen] == [e.id for e in everything]
    created = list_all(rw, types=["referral.created", "code.created"])
    assert {e.type for e in created} == {"referral.created", "code.created"} and len(created) == 10


def test_list_events_refuses_bad_input_and_missing_scopes(rw: RewardsApi) -> None:
    stub, auth = events_stub(rw), reader(rw)
    bad = expect_error(
        stub.ListEvents,
        ev_pb.ListEventsRequest(after_cursor=-1, types=["user.registered", "user.renamed"], page_size=1001),
        metadata=auth,
    )
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.reason == "CURSOR_INVALID"
    assert set(bad.fields) == {"after_cursor", "types[1]", "page_size"}
    negative = expect_error(stub.ListEvents, ev_pb.ListEventsRequest(page_size=-1), metadata=auth)
    assert (negative.reason, set(negative.fields)) == ("PAGE_SIZE_NEGATIVE", {"page_size"})
    unknown = expect_error(stub.ListEvents, ev_pb.ListEventsRequest(types=["nope"]), metadata=auth)
    assert unknown.reason == "EVENT_TYPE_UNKNOWN"
    no_key = expect_error(stub.ListEvents, ev_pb.ListEventsRequest())
    assert no_key.code == grpc.StatusCode.UNAUTHENTICATED
    wrong_scope = expect_error(stub.ListEvents, ev_pb.ListEventsRequest(), metadata=rw.auth)
    assert (wrong_scope.code, wrong_scope.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "API_KEY_SCOPE_MISSING",
    )


class Watcher:
    """A WatchEvents call read on a thread of its own, so the test can act while it waits."""

    def __init__(self, rw: RewardsApi, after_cursor: int, types: tuple[str, ...] = ()) -> None:
        request = ev_pb.WatchEventsRequest(after_cursor=after_cursor, types=types)
        self.call = events_stub(rw).WatchEvents(request, metadata=reader(rw))
        self.received: list[ev_pb.Event] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.received.append(event)
        except grpc.RpcError:
            pass

    def wait_for(self, count: int, timeout: float = 10) -> list[ev_pb.Event]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.received) >= count, (len(self.received), count)
        return self.received

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(5)


def test_watch_replays_then_streams_and_resumes_without_gaps_or_duplicates(rw: RewardsApi) -> None:
    for _ in range(3):
        rw.pair()  # 4 events each
    first = Watcher(rw, 0)
    first.wait_for(12)
    for _ in range(2):
        rw.pair()
    received = first.wait_for(20)[:15]
    first.cancel()
    # Reconnect mid-way with the last cursor seen, while new events keep committing.
    second = Watcher(rw, received[-1].cursor)
    for _ in range(3):
        rw.pair()
    received += second.wait_for(17)
    second.cancel()
    logged = list_all(rw, page_size=1000)
    assert [e.id for e in received] == [e.id for e in logged]
    assert len({e.id for e in received}) == len(received) == 32


def test_watch_filters_types_and_a_cursor_from_the_future_waits(rw: RewardsApi) -> None:
    rw.pair()
    last = list_all(rw)[-1].cursor
    ahead = Watcher(rw, last + 3, ("user.registered",))
    filtered = Watcher(rw, 0, ("user.registered",))
    for _ in range(3):
        rw.pair()
    got = filtered.wait_for(8)
    assert {e.type for e in got} == {"user.registered"}
    future = ahead.wait_for(2)
    assert all(e.cursor > last + 3 and e.type == "user.registered" for e in future)
    for watcher in (ahead, filtered):
        assert watcher.call.is_active()  # still open: it waits for more
        watcher.cancel()


def test_watch_refuses_bad_input_and_callers_without_the_scope(rw: RewardsApi) -> None:
    stub = events_stub(rw)

    def first(request: ev_pb.WatchEventsRequest, **kwargs: Any) -> Any:
        return next(iter(stub.WatchEvents(request, **kwargs)))

    bad = expect_error(first, ev_pb.WatchEventsRequest(after_cursor=-5, types=["x.y"]), metadata=reader(rw))
    assert (bad.code, bad.reason, set(bad.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "CURSOR_INVALID",
        {"after_cursor", "types[0]"},
    )
    assert expect_error(first, ev_pb.WatchEventsRequest()).code == grpc.StatusCode.UNAUTHENTICATED
    denied = expect_error(first, ev_pb.WatchEventsRequest(), metadata=rw.auth)
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED


def test_cursors_follow_commit_order_under_concurrent_writers(pg_url: str) -> None:
    """Readers polling "after my cursor" while writers commit out of insert order never miss an event.

    Each writer holds its transaction open for a random moment after appending; without the
    event log's lock a later insert commits first and the reader moves past the earlier cursor.
    """
    db = init_database(make_settings(database_url=pg_url))
    run_migrations(db)
    writers, per_writer = 8, 15
    done = threading.Event()
    seen: list[int] = []

    def read() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            rows = list(Event.select(Event.id).where(Event.id > cursor).order_by(Event.id))
            db.close()
            for row in rows:
                seen.append(row.id)
                cursor = row.id
            if finished:
                return
            time.sleep(0.001)

    threads = [threading.Thread(target=_write_slowly, args=(db, n, per_writer)) for n in range(writers)]
    poller = threading.Thread(target=read)
    poller.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    poller.join()
    every = [row.id for row in Event.select(Event.id).order_by(Event.id)]
    db.close()
    assert len(every) == writers * per_writer
    assert seen == every


def test_a_stream_reading_up_to_the_listeners_cursor_misses_nothing(pg_url: str) -> None:
    """The stream reads up to the cursor the LISTEN connection last heard of (no query for it); with
    writers committing out of insert order it still gets every event once, in cursor order."""
    settings = make_settings(database_url=pg_url)
    db = init_database(settings)
    run_migrations(db)
    with write_transaction(db):
        append_events(db, [NewEvent(USER_REGISTERED, {"user_id": i}) for i in range(5)], _now())
    signal = PostgresEventSignal(settings)
    assert signal.committed_cursor() is None  # not listening yet: a reader asks the log
    signal.wait(0, 2.0)  # starts the listener
    deadline = time.monotonic() + 10
    while signal.committed_cursor() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # Committed before the LISTEN: counted when it connected.
    assert signal.committed_cursor() == Event.select(pw.fn.MAX(Event.id)).scalar()
    writers, per_writer = 6, 10
    total = 5 + writers * per_writer
    received: list[int] = []
    enough = threading.Event()

    def watch() -> None:
        stream = EventStream(EventLog(db), signal, db.close)
        for view in stream.watch(0, [], lambda: not enough.is_set()):
            received.append(view.cursor)
            if len(received) == total:
                enough.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=_write_slowly, args=(db, n, per_writer)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    enough.wait(20)
    enough.set()
    watcher.join(5)
    every = [row.id for row in Event.select(Event.id).order_by(Event.id)]
    assert signal.committed_cursor() == every[-1]
    signal.close()
    db.close()
    assert received == every and len(every) == total


def test_the_listener_lets_go_when_no_reader_asks_and_the_next_reader_starts_it(pg_url: str) -> None:
    """While the LISTEN connection is open, every commit that appends events signals its PostgreSQL
    backend and wakes its thread; with no reader asking for `idle_after` seconds it closes, the
    signal says a reader must ask the log, and the next reader starts it again and hears commits."""
    settings = make_settings(database_url=pg_url)
    db = init_database(settings)
    run_migrations(db)
    name = db.execute_sql("SELECT current_database()").fetchone()[0]

    def listening() -> int:
        sql = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'referral-grpc-events'"
        )
        return int(db.execute_sql(sql, (name,)).fetchone()[0])

    signal = PostgresEventSignal(settings, idle_after=1.5)
    try:
        signal.wait(0, 2.0)  # the first reader starts the listener
        wait_until(lambda: signal.committed_cursor() is not None, 10, "the listener")
        assert listening() == 1
        # Nobody asks (listening() does not): the connection goes.
        wait_until(lambda: listening() == 0, 10, "the idle listener to let go")
        assert signal.committed_cursor() is None  # meanwhile a reader reads the log itself
        signal.wait(0, 2.0)  # the next reader starts it again
        wait_until(lambda: signal.committed_cursor() is not None, 10, "the listener, started again")
        assert listening() == 1
        with write_transaction(db):
            append_events(db, [NewEvent(USER_REGISTERED, {"user_id": 1})], _now())
        last = Event.select(pw.fn.MAX(Event.id)).scalar()
        # Heard through the LISTEN: without the listener the signal has no cursor at all.
        wait_until(lambda: signal.committed_cursor() == last, 10, "the commit's notification")
    finally:
        signal.close()
        db.close()


def _write_slowly(db: pw.Database, writer: int, count: int) -> None:
    """`count` transactions that each append an event and stay open a random moment (up to 10 ms)."""
    rng = random.Random(writer)
    for i in range(count):
        with write_transaction(db):
            append_events(db, [NewEvent(USER_REGISTERED, {"user_id": writer * 1000 + i})], _now())
            time.sleep(rng.uniform(0, 0.01))
    db.close()


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_list_events_over_rest_through_envoy(pg_url: str, tmp_path: Path) -> None:
    env = server_env(DATABASE_URL=pg_url, JWT_SECRET=TEST_JWT_SECRET)
    migrate(env)
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "referral_grpc",
            "apikey",
            "create",
            "--name",
            "reader",
            "--scope",
            "events:read",
            "--scope",
            "webhooks:manage",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    key = created.stdout.strip().splitlines()[-1]
    with (
        running_server(env, tmp_path / "server.log") as (_, address),
        running_envoy([address], tmp_path) as envoy,
    ):
        base = envoy.url
        for n in range(3):
            body = {"email": f"rest{n}@example.com", "password": "correct horse battery"}
            assert requests.post(f"{base}/auth/register", json=body, timeout=10).status_code == 200
        page = requests.get(
            f"{base}/events",
            params={"after_cursor": "0", "types": "user.registered", "page_size": "2"},
            headers={"x-api-key": key},
            timeout=10,
        )
        assert page.status_code == 200, page.text
        document = page.json()
        assert [e["type"] for e in document["events"]] == ["user.registered"] * 2
        assert document["events"][0]["user_registered"]["user_id"] == "1"  # int64: a JSON string
        assert document["next_cursor"] == document["events"][1]["cursor"]
        bad = requests.get(
            f"{base}/events", params={"page_size": "5000"}, headers={"x-api-key": key}, timeout=10
        )
        assert bad.status_code == 400 and bad.json()["details"][0]["reason"] == "PAGE_SIZE_TOO_LARGE", (
            bad.text
        )
        assert requests.get(f"{base}/events", timeout=10).status_code == 401
        hook = {"url": "https://hooks.example.com/referrals", "event_types": ["referral.qualified"]}
        created_hook = requests.post(f"{base}/webhooks", json=hook, headers={"x-api-key": key}, timeout=10)
        assert created_hook.status_code == 200, created_hook.text
        endpoint_id = created_hook.json()["endpoint"]["id"]
        assert created_hook.json()["secret"].startswith("whsec_")
        got = requests.get(f"{base}/webhooks/{endpoint_id}", headers={"x-api-key": key}, timeout=10)
        assert got.json()["status"] == "ENABLED" and got.json()["event_types"] == ["referral.qualified"]
        wrong = requests.put(f"{base}/webhooks/{endpoint_id}", headers={"x-api-key": key}, timeout=10)
        assert wrong.status_code == 405 and set(wrong.headers["allow"].split(", ")) == {"GET", "DELETE"}
        deleted = requests.delete(f"{base}/webhooks/{endpoint_id}", headers={"x-api-key": key}, timeout=10)
        assert deleted.status_code == 200


_OFFSETS = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
_TIMES = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.sampled_from(_OFFSETS)
)
# The shapes the log writes, field kind by field kind.
_VALUES = {
    "int": st.integers(-(2**63), 2**63 - 1),
    "str": st.text(max_size=20),
    "time": st.one_of(
        _TIMES.map(lambda t: t.isoformat()),
        _TIMES.map(lambda t: t.isoformat(timespec="seconds").replace("+00:00", "Z")),
    ),
}
# What the log never writes: out of range, other types, other time spellings.
_ODD = st.one_of(
    st.none(),
    st.integers(2**63, 2**65),
    st.booleans(),
    st.floats(allow_nan=False),
    st.sampled_from(
        [
            "2026-11-28 12:00:00+00:00",
            "2026-11-28T12:00:00",
            "2026-11-28T12:00:00.123456789Z",
            "20261128T120000Z",
            "2026-11-28T12:00:00.5+01:00",
            "x",
            "7",
        ]
    ),
)


@st.composite
def _payloads(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """An event type and a payload of the log's shape, sometimes with one field (or key) that is not."""
    event_type = draw(st.sampled_from(sorted(EVENT_TYPES)))
    fields = list(ev_pb.Event.DESCRIPTOR.fields_by_name[payload_field(event_type)].message_type.fields)
    payload: dict[str, Any] = {}
    for field in draw(st.lists(st.sampled_from(fields), unique=True, min_size=len(fields) // 2)):
        kind = "int" if field.type != field.TYPE_STRING else "str"
        kind = "time" if field.message_type is not None else kind
        payload[field.name] = draw(_VALUES[kind])
    odd = draw(st.sampled_from(["none", "none", "value", "key"]))
    if odd == "value" and payload:
        payload[draw(st.sampled_from(sorted(payload)))] = draw(_ODD)
    elif odd == "key":
        payload[draw(st.sampled_from(["unknown", "userId"]))] = 1
    return event_type, payload


@settings(max_examples=600, deadline=None)
@given(_payloads())
@example(("reward.credited", {"user_id": 1, "available_at": "2026-11-28T12:00:00.123456789Z"}))
@example(("code.created", {"user_id": 1, "expires_at": "2026-11-28T12:00:00.5+05:30"}))
@example(("user.registered", {}))
def test_an_event_message_is_what_json_format_parses_from_its_payload(
    typed: tuple[str, dict[str, Any]],
) -> None:
    """The stream's and the list's payload conversion against protobuf's own JSON parser, as the oracle:
    the same message for every payload it accepts, an error for every payload it refuses."""
    event_type, payload = typed
    view = EventView(7, "evt_" + "0" * 32, event_type, datetime(2026, 11, 28, tzinfo=UTC), payload)
    expected = ev_pb.Event(id=view.event_id, cursor=7, type=event_type)
    expected.occurred_at.FromDatetime(view.occurred_at)
    try:
        json_format.ParseDict(payload, getattr(expected, payload_field(event_type)))
    except json_format.ParseError:
        with pytest.raises(json_format.ParseError):
            event_message(view)
        return
    assert event_message(view) == expected


def test_open_streams_leave_the_unary_rpcs_their_threads(database_url: str, clock: FakeClock) -> None:
    workers = 4
    with running_rewards(database_url, clock, grpc_max_workers=workers) as rw:
        rw.pair()
        watchers = [Watcher(rw, 0) for _ in range(workers + 1)]
        for watcher in watchers:
            watcher.wait_for(1)
        # Every stream holds a thread until its caller leaves; none of them is the unary RPCs'.
        started = time.monotonic()
        page = events_stub(rw).ListEvents(ev_pb.ListEventsRequest(), metadata=reader(rw), timeout=5)
        assert page.events and time.monotonic() - started < 2
        for watcher in watchers:
            watcher.cancel()


def test_a_stream_beyond_the_limit_is_refused_at_once_and_the_next_fits_once_one_leaves(
    database_url: str, clock: FakeClock
) -> None:
    with running_rewards(database_url, clock, grpc_max_streams=2) as rw:
        rw.pair()
        watchers = [Watcher(rw, 0) for _ in range(2)]
        for watcher in watchers:
            watcher.wait_for(1)
        stub = events_stub(rw)

        def first(**kwargs: Any) -> Any:
            return next(iter(stub.WatchEvents(ev_pb.WatchEventsRequest(), metadata=reader(rw), **kwargs)))

        started = time.monotonic()
        refused = expect_error(first, timeout=5)
        assert (refused.code, refused.reason, refused.retry_delay) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "SERVER_OVERLOADED",
            1,
        )
        assert "GRPC_MAX_STREAMS" in refused.message and time.monotonic() - started < 2
        # Unary calls still run meanwhile.
        assert events_stub(rw).ListEvents(ev_pb.ListEventsRequest(), metadata=reader(rw), timeout=5).events
        # A stream that leaves gives its thread back (once it notices: at its next wake-up).
        watchers[0].cancel()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert first(timeout=5).cursor == 1
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
        watchers[1].cancel()

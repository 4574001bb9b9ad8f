"""Webhooks end to end: a real worker process POSTs signed events to a real loopback receiver.

Every delivery is verified with `standardwebhooks`, the Standard Webhooks reference library.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from standardwebhooks import Webhook
from support import TEST_JWT_SECRET, FakeClock, closed_port, wait_until
from support.api import expect_error
from support.rewards import RewardsApi, running_rewards

from referral_grpc.gen import webhook_service_pb2 as wh_pb
from referral_grpc.gen import webhook_service_pb2_grpc
from referral_grpc.infra.webhooks import RESPONSE_BODY_LIMIT, Sender, forbidden_address
from referral_grpc.store.models import EmailOutbox, Event, WebhookAttempt, WebhookDelivery, WebhookEndpoint

REPO = Path(__file__).resolve().parent.parent


class Receiver:
    """An HTTP server on loopback that records every POST; answers 500 to the first `failures` of them.

    With `stall_first`, the first request is held that many seconds before it is answered.
    """

    def __init__(self, failures: int = 0, stall_first: float = 0.0, port: int = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._failures = failures
        self._stall_first = stall_first
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as most receivers: the worker sends on kept connections.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver._lock:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    count = len(receiver.received)
                if count == 1 and receiver._stall_first:
                    time.sleep(receiver._stall_first)
                status = 500 if count <= receiver._failures else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        # A stalled answer must not hold up close().
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks?source=referrals"

    def ids(self) -> list[str]:
        with self._lock:
            return [headers["webhook-id"] for headers, _ in self.received]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def worker_env(pg_url: str, redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": key_prefix,
        "JWT_SECRET": TEST_JWT_SECRET,
        "OUTBOX_RELAY_INTERVAL": "0.05",
        "WEBHOOK_RETRY_SCHEDULE": "0.2,0.4",
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
        **extra,
    }


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(processes)}.log").open("w")
        logs.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "referral_grpc", "worker"],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    for log in logs:
        log.close()


@pytest.fixture
def rw(pg_url: str, clock: FakeClock) -> Iterator[RewardsApi]:
    with running_rewards(pg_url, clock, webhook_allow_private_networks="true") as api:
        yield api


def manage(rw: RewardsApi) -> tuple[webhook_service_pb2_grpc.WebhookServiceStub, tuple[tuple[str, str]]]:
    return webhook_service_pb2_grpc.WebhookServiceStub(rw.api.channel), (
        ("x-api-key", rw.new_key("webhooks:manage")),
    )


def verified(receiver: Receiver, secret: str) -> list[dict[str, Any]]:
    """Every request the receiver got, verified by the reference library (raises on a bad one)."""
    webhook = Webhook(secret)
    return [webhook.verify(body, headers) for headers, body in receiver.received]


def rewards_walk(rw: RewardsApi) -> None:
    """Register with a code, purchase, refund."""
    rw.set_program()
    _, newcomer = rw.pair()
    purchase = rw.event(newcomer, amount_minor=10_000)
    rw.event(newcomer, type="refund", refunds=purchase.event_id)


def test_the_rewards_walk_arrives_signed_once_per_event_after_retries(
    rw: RewardsApi, pg_url: str, redis_url: str, key_prefix: str, start_worker: Any
) -> None:
    receiver = Receiver(failures=2)
    stub, auth = manage(rw)
    created = stub.CreateWebhookEndpoint(
        wh_pb.CreateWebhookEndpointRequest(url=receiver.url, description="backend"), metadata=auth
    )
    assert created.secret.startswith("whsec_") and created.endpoint.status == wh_pb.ENABLED
    start_worker(worker_env(pg_url, redis_url, key_prefix))
    rewards_walk(rw)
    logged = {row.event_id: row.type for row in Event.select()}
    wait_until(
        lambda: len(receiver.ids()) >= len(logged) + 2, 30, "every event and 2 retries at the receiver"
    )
    documents = verified(receiver, created.secret)
    # The 2 attempts answered 500 were retried with the same id; every other event arrived once.
    ids = receiver.ids()
    assert set(ids) == set(logged)
    assert len(ids) == len(logged) + 2
    assert all(ids.count(i) == (1 + ids[:2].count(i)) for i in set(ids)), [(i[-4:], logged[i]) for i in ids]
    assert {doc["type"] for doc in documents} == set(logged.values())
    # Each body is what the OpenAPI document's `webhooks` entry for its type describes.
    spec = json.loads((REPO / "gateway" / "openapi.json").read_text())
    for doc in documents:
        pointer = f"#/webhooks/{doc['type']}/post/requestBody/content/application~1json/schema"
        jsonschema.validate(doc, {**spec, "$ref": pointer})
    qualified = next(doc for doc in documents if doc["type"] == "referral.qualified")
    assert set(qualified["data"]) == {
        "referee_user_id",
        "referrer_user_id",
        "qualifying_event_id",
        "program_version",
    }
    request = wh_pb.ListWebhookDeliveriesRequest(id=created.endpoint.id)

    def statuses() -> list[int]:
        return sorted(a.http_status for a in stub.ListWebhookDeliveries(request, metadata=auth).attempts)

    # The receiver answers before the worker records the answer.
    wait_until(lambda: len(statuses()) == len(ids), 10, "every attempt recorded")
    assert statuses() == [204] * len(logged) + [500, 500]
    endpoint = stub.GetWebhookEndpoint(wh_pb.GetWebhookEndpointRequest(id=created.endpoint.id), metadata=auth)
    assert endpoint.consecutive_failures == 0 and endpoint.HasField("last_success_at")
    receiver.close()


def test_a_worker_killed_mid_delivery_loses_nothing(
    rw: RewardsApi, pg_url: str, redis_url: str, key_prefix: str, start_worker: Any
) -> None:
    receiver = Receiver(stall_first=30)
    stub, auth = manage(rw)
    created = stub.CreateWebhookEndpoint(wh_pb.CreateWebhookEndpointRequest(url=receiver.url), metadata=auth)
    env = worker_env(pg_url, redis_url, key_prefix, OUTBOX_LEASE="2", WORKER_THREADS="1")
    first = start_worker(env)
    rewards_walk(rw)
    wait_until(lambda: len(receiver.received) == 1, 30, "the first delivery to be under way")
    first.kill()  # SIGKILL: no cleanup, the attempt is never recorded
    first.wait(5)
    start_worker(env)
    logged = {row.event_id for row in Event.select()}
    wait_until(
        lambda: set(receiver.ids()) >= logged and receiver.ids().count(receiver.ids()[0]) == 2,
        60,
        "every event, and the interrupted one again, after the restart",
    )
    verified(receiver, created.secret)
    ids = receiver.ids()
    duplicates = len(ids) - len(set(ids))
    print(
        f"fault test (worker killed mid-delivery): events sent {len(logged)}, "
        f"received {len(set(ids))}, duplicates by id {duplicates}"
    )
    assert set(ids) == logged
    # The interrupted one arrived again, with the same webhook-id; nothing else twice.
    assert ids.count(ids[0]) == 2 and duplicates == 1
    receiver.close()


def test_endpoints_are_managed_with_the_scope_and_urls_are_checked(rw: RewardsApi) -> None:
    stub, auth = manage(rw)
    bad = expect_error(
        stub.CreateWebhookEndpoint,
        wh_pb.CreateWebhookEndpointRequest(url="ftp://example.com/x", event_types=["user.renamed"]),
        metadata=auth,
    )
    assert (bad.code, bad.reason, set(bad.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEBHOOK_URL_INVALID",
        {"url", "event_types[0]"},
    )
    denied = expect_error(stub.ListWebhookEndpoints, wh_pb.ListWebhookEndpointsRequest(), metadata=rw.auth)
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    created = stub.CreateWebhookEndpoint(
        wh_pb.CreateWebhookEndpointRequest(url="http://127.0.0.1:9/x", event_types=["reward.credited"]),
        metadata=auth,
    )
    rotated = stub.RotateWebhookSecret(
        wh_pb.RotateWebhookSecretRequest(id=created.endpoint.id), metadata=auth
    )
    assert rotated.secret.startswith("whsec_") and rotated.secret != created.secret
    listed = stub.ListWebhookEndpoints(wh_pb.ListWebhookEndpointsRequest(), metadata=auth)
    assert [(e.id, list(e.event_types)) for e in listed.endpoints] == [
        (created.endpoint.id, ["reward.credited"])
    ]
    stub.DeleteWebhookEndpoint(wh_pb.DeleteWebhookEndpointRequest(id=created.endpoint.id), metadata=auth)
    gone = expect_error(
        stub.GetWebhookEndpoint, wh_pb.GetWebhookEndpointRequest(id=created.endpoint.id), metadata=auth
    )
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND")


def test_private_addresses_need_the_switch(pg_url: str, clock: FakeClock) -> None:
    with running_rewards(pg_url, clock) as rw:
        stub, auth = manage(rw)
        for url in (
            "http://127.0.0.1/x",
            "http://10.0.0.8/x",
            "http://169.254.169.254/latest",
            "http://[::1]/x",
        ):
            refused = expect_error(
                stub.CreateWebhookEndpoint, wh_pb.CreateWebhookEndpointRequest(url=url), metadata=auth
            )
            assert (refused.reason, set(refused.fields)) == ("WEBHOOK_URL_INVALID", {"url"}), url
    assert not forbidden_address("93.184.215.14") and forbidden_address("::ffff:127.0.0.1")


def test_a_failing_endpoint_is_disabled_and_its_events_wait_for_re_enabling(
    rw: RewardsApi, pg_url: str, redis_url: str, key_prefix: str, start_worker: Any
) -> None:
    receiver = Receiver(failures=3)
    stub, auth = manage(rw)
    created = stub.CreateWebhookEndpoint(
        wh_pb.CreateWebhookEndpointRequest(url=receiver.url, event_types=["user.registered"]), metadata=auth
    )
    endpoint = wh_pb.GetWebhookEndpointRequest(id=created.endpoint.id)
    start_worker(worker_env(pg_url, redis_url, key_prefix, WEBHOOK_DISABLE_AFTER_FAILURES="3"))
    rw.person()
    wait_until(
        lambda: stub.GetWebhookEndpoint(endpoint, metadata=auth).status == wh_pb.DISABLED,
        30,
        "the endpoint disabled after 3 failures",
    )
    rw.person()  # waits, with the first one, while the endpoint is disabled
    assert len(receiver.received) == 3
    # Rotation: until the overlap ends, both secrets sign.
    rotated = stub.RotateWebhookSecret(
        wh_pb.RotateWebhookSecretRequest(id=created.endpoint.id), metadata=auth
    )
    # Re-enabling sends what waited, and only that.
    enabled = stub.EnableWebhookEndpoint(
        wh_pb.EnableWebhookEndpointRequest(id=created.endpoint.id), metadata=auth
    )
    assert (enabled.status, enabled.consecutive_failures) == (wh_pb.ENABLED, 0)
    registered = {row.event_id for row in Event.select().where(Event.type == "user.registered")}
    wait_until(lambda: set(receiver.ids()[3:]) == registered, 30, "the waiting events after re-enabling")
    assert stub.GetWebhookEndpoint(endpoint, metadata=auth).status == wh_pb.ENABLED
    for secret in (created.secret, rotated.secret):
        Webhook(secret).verify(*reversed(receiver.received[-1]))
    receiver.close()


def test_the_sender_follows_no_redirect_and_checks_the_address_when_it_connects() -> None:
    hits: list[str] = []

    class Redirecting(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(302)
            self.send_header("location", "/elsewhere")
            self.send_header("content-length", "5")
            self.end_headers()
            self.wfile.write(b"moved")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        answer = Sender(timeout=5, allow_private=True).post(url, {}, b"{}")
        assert (answer.http_status, answer.body, hits) == (302, "moved", ["/hook"])
        # Without the switch the loopback address is refused at connection time: nothing is sent.
        refused = Sender(timeout=5, allow_private=False).post(url, {}, b"{}")
        assert refused.http_status == 0 and refused.error.startswith("refused") and hits == ["/hook"]
    finally:
        server.shutdown()
        server.server_close()


class KeepAliveReceiver:
    """An HTTP/1.1 server on loopback that notes each request's path and client port (one port per
    connection); `close_after` closes each connection after that many answers, as idle-closing
    servers do; `/big` answers with a body longer than RESPONSE_BODY_LIMIT, `/moved` redirects."""

    def __init__(self, close_after: int = 0) -> None:
        self.requests: list[tuple[str, int]] = []
        hits = self.requests

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # It writes headers and body apart: without this, its own Nagle wait would show.
            disable_nagle_algorithm = True
            answered = 0

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                hits.append((self.path, self.client_address[1]))
                body = b"x" * (RESPONSE_BODY_LIMIT * 4) if self.path == "/big" else b"ok"
                self.send_response(302 if self.path == "/moved" else 200)
                if self.path == "/moved":
                    self.send_header("location", "/elsewhere")
                self.send_header("content-length", str(len(body)))
                self.answered += 1
                if close_after and self.answered >= close_after:
                    # Closed without telling the client: what an idle timeout does to a kept connection.
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def ports(self, path: str) -> list[int]:
        return [port for p, port in self.requests if p == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_sender_keeps_a_connection_per_endpoint_url_made_to_a_checked_address() -> None:
    receiver = KeepAliveReceiver()
    sender = Sender(timeout=5, allow_private=True)
    try:
        answers = [sender.post(f"{receiver.base}/a", {}, b"{}") for _ in range(3)]
        answers += [sender.post(f"{receiver.base}/b", {}, b"{}") for _ in range(2)]
        assert [(a.http_status, a.body) for a in answers] == [(200, "ok")] * 5
        # One connection per endpoint URL, each used again: the same client port for each URL's requests.
        assert len(set(receiver.ports("/a"))) == 1 and len(set(receiver.ports("/b"))) == 1
        assert receiver.ports("/a")[0] != receiver.ports("/b")[0]
        # Another thread has connections of its own.
        other: list[int] = []
        thread = threading.Thread(
            target=lambda: other.append(sender.post(f"{receiver.base}/a", {}, b"{}").http_status)
        )
        thread.start()
        thread.join()
        assert other == [200] and len(set(receiver.ports("/a"))) == 2
        # A redirect is an answer like any other, never followed; the connection stays usable.
        moved = sender.post(f"{receiver.base}/moved", {}, b"{}")
        assert (moved.http_status, moved.body) == (302, "ok") and receiver.ports("/elsewhere") == []
        # A body longer than the limit is cut, and its connection not used again (the rest is unread).
        big = [sender.post(f"{receiver.base}/big", {}, b"{}") for _ in range(2)]
        assert [len(a.body) for a in big] == [RESPONSE_BODY_LIMIT] * 2
        assert len(set(receiver.ports("/big"))) == 2
        # A sender without the switch refuses the loopback address at connection time: nothing is sent.
        count = len(receiver.requests)
        refused = Sender(timeout=5, allow_private=False).post(f"{receiver.base}/a", {}, b"{}")
        assert refused.http_status == 0 and refused.error.startswith("refused")
        assert len(receiver.requests) == count
    finally:
        sender.close()
        receiver.close()


def test_the_sender_sends_again_on_a_new_connection_when_a_kept_one_was_closed() -> None:
    receiver = KeepAliveReceiver(close_after=1)
    sender = Sender(timeout=5, allow_private=True)
    try:
        answers = [sender.post(f"{receiver.base}/a", {}, b"{}") for _ in range(3)]
        assert [a.http_status for a in answers] == [200] * 3
        assert len(set(receiver.ports("/a"))) == 3
    finally:
        sender.close()
        receiver.close()


def test_a_kept_connection_is_not_slowed_by_delayed_acks() -> None:
    receiver = KeepAliveReceiver()
    sender = Sender(timeout=5, allow_private=True)
    try:
        sender.post(f"{receiver.base}/a", {}, b"{}")
        started = time.monotonic()
        for _ in range(20):
            sender.post(f"{receiver.base}/a", {}, b"{}")
        # Headers and body go out in two writes: with Nagle's algorithm on, each request on a kept
        # connection waited for the receiver's delayed ACK (40 ms here, 0.8 s for these 20).
        assert time.monotonic() - started < 0.4
        assert len(set(receiver.ports("/a"))) == 1
    finally:
        sender.close()
        receiver.close()


def test_the_sender_drops_idle_connections() -> None:
    receiver = KeepAliveReceiver()
    sender = Sender(timeout=5, allow_private=True, idle=0.05)
    try:
        sender.post(f"{receiver.base}/a", {}, b"{}")
        time.sleep(0.1)
        sender.post(f"{receiver.base}/a", {}, b"{}")
        assert len(set(receiver.ports("/a"))) == 2
    finally:
        sender.close()
        receiver.close()


def test_redeliver_queues_a_range_or_one_event_again(database_url: str, clock: FakeClock) -> None:
    with running_rewards(database_url, clock, webhook_allow_private_networks="true") as rw:
        stub, auth = manage(rw)
        created = stub.CreateWebhookEndpoint(
            wh_pb.CreateWebhookEndpointRequest(url="http://127.0.0.1:9/x", event_types=["user.registered"]),
            metadata=auth,
        )
        for _ in range(3):
            rw.person()
        events = list(Event.select().order_by(Event.id))
        WebhookDelivery.update(status="delivered").execute()
        one = wh_pb.RedeliverEventsRequest(id=created.endpoint.id, event_id=events[1].event_id)
        assert stub.RedeliverEvents(one, metadata=auth).queued == 1
        pending = WebhookDelivery.select().where(WebhookDelivery.status == "pending")
        assert [d.event_id for d in pending] == [events[1].id]
        after = wh_pb.RedeliverEventsRequest(id=created.endpoint.id, after_cursor=events[0].id)
        assert stub.RedeliverEvents(after, metadata=auth).queued == 2
        assert WebhookDelivery.select().where(WebhookDelivery.status == "pending").count() == 2
        missing = expect_error(
            stub.RedeliverEvents,
            wh_pb.RedeliverEventsRequest(id=created.endpoint.id, event_id="evt_x"),
            metadata=auth,
        )
        assert missing.code == grpc.StatusCode.NOT_FOUND


def test_a_retried_create_or_rotation_with_an_idempotency_key_happens_once(rw: RewardsApi) -> None:
    stub, auth = manage(rw)
    request = wh_pb.CreateWebhookEndpointRequest(url="http://127.0.0.1:9/x", description="once")
    key = (("idempotency-key", "create-endpoint-1"),)
    first = stub.CreateWebhookEndpoint(request, metadata=auth + key)
    again = stub.CreateWebhookEndpoint(request, metadata=auth + key)
    # The same endpoint and the same secret: the retry is the first answer, not a second endpoint.
    assert again == first
    listed = stub.ListWebhookEndpoints(wh_pb.ListWebhookEndpointsRequest(), metadata=auth).endpoints
    assert [e.id for e in listed] == [first.endpoint.id]
    other = expect_error(
        stub.CreateWebhookEndpoint,
        wh_pb.CreateWebhookEndpointRequest(url="http://127.0.0.1:9/y"),
        metadata=auth + key,
    )
    assert (other.code, other.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    # Without a key each call creates one, as before.
    stub.CreateWebhookEndpoint(request, metadata=auth)
    assert len(stub.ListWebhookEndpoints(wh_pb.ListWebhookEndpointsRequest(), metadata=auth).endpoints) == 2

    rotate = wh_pb.RotateWebhookSecretRequest(id=first.endpoint.id)
    rotation_key = (("idempotency-key", "rotate-1"),)
    rotated = stub.RotateWebhookSecret(rotate, metadata=auth + rotation_key)
    assert stub.RotateWebhookSecret(rotate, metadata=auth + rotation_key) == rotated
    # Rotated once: the secret before the rotation still signs, next to the new one.
    row = WebhookEndpoint.get_by_id(first.endpoint.id)
    assert (row.secret, row.previous_secret) == (rotated.secret, first.secret)


def test_enabling_an_endpoint_sends_what_waited_once_and_nothing_else(
    rw: RewardsApi, pg_url: str, redis_url: str, key_prefix: str, start_worker: Any
) -> None:
    """An endpoint disabled after failures: its events wait; enabling delivers each once."""
    receiver = Receiver()
    stub, auth = manage(rw)
    created = stub.CreateWebhookEndpoint(
        wh_pb.CreateWebhookEndpointRequest(url=receiver.url, event_types=["user.registered"]), metadata=auth
    )
    rw.person()
    start_worker(worker_env(pg_url, redis_url, key_prefix))
    wait_until(lambda: len(receiver.received) == 1, 30, "the first event delivered")
    WebhookEndpoint.update(status="disabled").execute()  # as a run of failures leaves it
    for _ in range(3):
        rw.person()
    time.sleep(1)  # relay passes every 0.05 s: a disabled endpoint must get nothing meanwhile
    assert len(receiver.received) == 1
    missing = expect_error(
        stub.EnableWebhookEndpoint,
        wh_pb.EnableWebhookEndpointRequest(id=created.endpoint.id + 1),
        metadata=auth,
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND")
    stub.EnableWebhookEndpoint(wh_pb.EnableWebhookEndpointRequest(id=created.endpoint.id), metadata=auth)
    logged = [
        row.event_id for row in Event.select().where(Event.type == "user.registered").order_by(Event.id)
    ]
    wait_until(lambda: len(receiver.received) == len(logged), 30, "the waiting events after enabling")
    time.sleep(0.5)
    # Each waiting event once (worker threads deliver side by side, so not necessarily in log order).
    assert sorted(receiver.ids()) == sorted(logged) and receiver.ids()[0] == logged[0]
    verified(receiver, created.secret)
    receiver.close()


# --- faults: real processes, nothing of ours mocked; each prints its counts ---------------------------


def report(fault: str, logged: set[str], receiver: Receiver, secret: str) -> None:
    """Every logged event arrived, each request verified by standardwebhooks; the counts printed."""
    documents = verified(receiver, secret)
    ids = receiver.ids()
    duplicates = len(ids) - len(set(ids))
    print(
        f"fault test ({fault}): events sent {len(logged)}, received {len(set(ids))}, "
        f"duplicates by id {duplicates}, delivery attempts {WebhookAttempt.select().count()}"
    )
    assert set(ids) == logged
    # A duplicate is the same event again: same webhook-id, same body.
    by_id: dict[str, bytes] = {}
    for (headers, body), document in zip(receiver.received, documents, strict=True):
        assert by_id.setdefault(headers["webhook-id"], body) == body
        # The walk's own events, and the program it sets (an administrative change, an event too).
        assert document["type"] in {"user.registered", "code.created", "referral.created"} | {
            "referral.qualified", "reward.credited", "referral.reversed", "reward.reversed", "program.updated"
        }  # fmt: skip


def test_a_receiver_down_for_a_long_stretch_gets_every_event_after_re_enabling(
    rw: RewardsApi, pg_url: str, redis_url: str, key_prefix: str, start_worker: Any
) -> None:
    """Nothing listens at the URL: attempts fail, retry, the endpoint is disabled; events keep coming
    and wait; the receiver comes up, the endpoint is enabled, and every event arrives."""
    port = closed_port()
    stub, auth = manage(rw)
    created = stub.CreateWebhookEndpoint(
        wh_pb.CreateWebhookEndpointRequest(url=f"http://127.0.0.1:{port}/hooks"), metadata=auth
    )
    endpoint = wh_pb.GetWebhookEndpointRequest(id=created.endpoint.id)
    env = worker_env(
        pg_url,
        redis_url,
        key_prefix,
        WEBHOOK_RETRY_SCHEDULE="0.05,0.1,0.2",
        WEBHOOK_DISABLE_AFTER_FAILURES="25",
    )
    start_worker(env)
    rewards_walk(rw)
    wait_until(
        lambda: stub.GetWebhookEndpoint(endpoint, metadata=auth).status == wh_pb.DISABLED,
        60,
        "the endpoint disabled after 25 failed attempts in a row",
    )
    for _ in range(3):
        rw.person()  # while it is disabled: these wait too
    failed = WebhookAttempt.select().where(WebhookAttempt.http_status == 0).count()
    assert failed >= 25
    assert WebhookDelivery.select().where(WebhookDelivery.status == "delivered").count() == 0
    receiver = Receiver(port=port)
    try:
        stub.EnableWebhookEndpoint(wh_pb.EnableWebhookEndpointRequest(id=created.endpoint.id), metadata=auth)
        logged = {row.event_id for row in Event.select()}
        # Well within OUTBOX_LEASE (300 s): deliveries claimed just before the endpoint was disabled
        # must not wait out their lease.
        wait_until(lambda: set(receiver.ids()) >= logged, 30, "every event after the receiver came back")
        report("receiver down, endpoint disabled then enabled", logged, receiver, created.secret)
    finally:
        receiver.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """A Redis server of this test's own on a free port (the shared one is never stopped): call to
    start it (again, on the same port); the test stops it to make the outage."""
    port = closed_port()
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
        )
        started.append(process)
        wait_until(lambda: _answers(port), 10, "redis-server to accept connections")
        return process

    start.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_a_redis_outage_during_the_events_loses_nothing(
    rw: RewardsApi, pg_url: str, key_prefix: str, start_worker: Any, own_redis: Any
) -> None:
    """The worker's Redis (Huey's queue) dies with deliveries queued in it and stays down while events
    are written; it comes back empty, and every event still arrives."""
    receiver = Receiver()
    stub, auth = manage(rw)
    created = stub.CreateWebhookEndpoint(wh_pb.CreateWebhookEndpointRequest(url=receiver.url), metadata=auth)
    redis_server = own_redis()
    # A short lease: deliveries lost with the queue are claimed again soon.
    start_worker(worker_env(pg_url, own_redis.url, key_prefix, OUTBOX_LEASE="2"))
    rw.person()
    wait_until(lambda: len(receiver.received) == 1, 30, "a first delivery through Redis")
    redis_server.kill()  # SIGKILL: no shutdown, whatever was queued is gone
    redis_server.wait(5)
    rewards_walk(rw)
    time.sleep(1.5)
    during = len(receiver.received)
    own_redis()  # back on the same port, empty
    logged = {row.event_id for row in Event.select()}
    wait_until(lambda: set(receiver.ids()) >= logged, 60, "every event after Redis came back")
    print(f"fault test (redis down): deliveries while Redis was down {during - 1}")
    report("redis down during the events", logged, receiver, created.secret)
    receiver.close()


def test_an_smtp_outage_holds_up_no_webhook_and_loses_no_email(
    rw: RewardsApi, pg_url: str, redis_url: str, key_prefix: str, start_worker: Any
) -> None:
    """The worker's mail server refuses connections: emails wait in their outbox, webhooks go on."""
    receiver = Receiver()
    stub, auth = manage(rw)
    created = stub.CreateWebhookEndpoint(wh_pb.CreateWebhookEndpointRequest(url=receiver.url), metadata=auth)
    smtp = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(closed_port()), "SMTP_TIMEOUT": "1"}
    start_worker(worker_env(pg_url, redis_url, key_prefix, **smtp))
    rewards_walk(rw)
    rw.person()
    logged = {row.event_id for row in Event.select()}
    wait_until(lambda: set(receiver.ids()) >= logged, 30, "every event while SMTP is down")
    report("smtp down", logged, receiver, created.secret)
    emails = list(EmailOutbox.select())
    wait_until(
        lambda: EmailOutbox.select().where(EmailOutbox.attempts > 0).exists(), 30, "an email attempt to fail"
    )
    assert emails and all(email.status != "sent" for email in EmailOutbox.select())
    print(f"fault test (smtp down): emails waiting {len(emails)}, sent 0")
    receiver.close()

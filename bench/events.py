"""Events benchmark (`python -m bench.events`): stream commit-to-delivery latency, webhook deliveries/s.

Its own PostgreSQL database (`BENCH_DATABASE` + `_events`, recreated), Redis prefix (`BENCH_KEY_PREFIX` +
`events:`) and free ports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import psycopg2  # type: ignore[import-untyped]

from referral_grpc.app import build_app
from referral_grpc.domain.events import USER_REGISTERED, NewEvent, append_events
from referral_grpc.domain.ports import NoDispatch, NoEmailVerification
from referral_grpc.gen import event_service_pb2, event_service_pb2_grpc
from referral_grpc.server import create_server
from referral_grpc.settings import Settings
from referral_grpc.store.database import write_transaction
from referral_grpc.store.migrate import run_migrations
from referral_grpc.store.models import WebhookAttempt, WebhookDelivery

from .harness import BENCH_DATABASE, BENCH_KEY_PREFIX, BENCH_REDIS_URL, PG_SERVER_URL

# Derived from BENCH_DATABASE, so two checkouts that set it apart do not drop each other's database.
DATABASE = f"{BENCH_DATABASE}_events"
REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- events-bench:begin -->", "<!-- events-bench:end -->"


def write_section(table: str) -> None:
    """Replace this benchmark's block of RESULTS.md, or append one; `python -m bench` leaves it alone."""
    block = f"{BEGIN}\n## Events and webhooks (`python -m bench.events`)\n\n{table}\n{END}"
    text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        RESULTS.write_text(head + block + tail)
    else:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + block + "\n")


def _recreate_database() -> str:
    conn = psycopg2.connect(f"{PG_SERVER_URL}/postgres")
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        cursor.execute(f'CREATE DATABASE "{DATABASE}"')
    conn.close()
    return f"{PG_SERVER_URL}/{DATABASE}"


class _Receiver(BaseHTTPRequestHandler):
    # Keep-alive, as most web servers that receive webhooks (`--http10-receiver`: one connection each).
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Http10Receiver(_Receiver):
    """One connection per delivery: the receiver closes each after its answer."""

    protocol_version = "HTTP/1.0"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_latency(settings: Settings, events: int) -> tuple[float, float]:
    """p50 and p99 milliseconds from an appending commit to the event's arrival on a WatchEvents stream."""
    app = build_app(settings, verifier=NoEmailVerification(), dispatcher=NoDispatch())
    server = create_server(app, "127.0.0.1:0")
    key = app.api_keys.create(f"bench-{time.time_ns()}", ["events:read"]).key
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = event_service_pb2_grpc.EventServiceStub(channel)
    start = app.events.last_cursor()
    call = stub.WatchEvents(
        event_service_pb2.WatchEventsRequest(after_cursor=start), metadata=(("x-api-key", key),)
    )
    arrived: dict[int, float] = {}
    committed: dict[int, float] = {}

    def read_plain() -> None:
        try:
            for event in call:
                arrived[event.user_registered.user_id] = time.perf_counter()
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read_plain, daemon=True)
    reader.start()
    time.sleep(0.5)  # the stream's first read and the listener's LISTEN are in place
    for n in range(events):
        with write_transaction(app.db):
            append_events(app.db, [NewEvent(USER_REGISTERED, {"user_id": n + 1})], datetime.now(UTC))
        committed[n + 1] = time.perf_counter()
        app.release_connection()
        time.sleep(0.01)  # one event at a time: latency, not throughput
    deadline = time.monotonic() + 10
    while len(arrived) < events and time.monotonic() < deadline:
        time.sleep(0.01)
    call.cancel()
    channel.close()
    server.stop(0)
    app.event_signal.close()
    app.db.close()
    latencies = [(arrived[n] - committed[n]) * 1000 for n in committed if n in arrived]
    if len(latencies) < events:
        raise RuntimeError(f"only {len(latencies)} of {events} events arrived on the stream")
    return statistics.median(latencies), _percentile(latencies, 0.99)


def webhook_throughput(settings: Settings, database_url: str, deliveries: int, http10: bool = False) -> float:
    """Deliveries per second of one worker process (default WORKER_THREADS) to a loopback receiver
    (keep-alive, or HTTP/1.0 with `http10`)."""
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Http10Receiver if http10 else _Receiver)
    receiver.daemon_threads = True
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    app = build_app(settings, verifier=NoEmailVerification(), dispatcher=NoDispatch())
    app.webhooks.create(f"http://127.0.0.1:{receiver.server_address[1]}/hooks", [], "bench")
    for first in range(0, deliveries, 100):
        with write_transaction(app.db):
            batch = [
                NewEvent(USER_REGISTERED, {"user_id": n}) for n in range(first, min(first + 100, deliveries))
            ]
            append_events(app.db, batch, datetime.now(UTC))
    app.release_connection()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        # The task queue users get with Redis configured (without it, the embedded SQLite queue).
        "REDIS_URL": BENCH_REDIS_URL,
        "REDIS_KEY_PREFIX": f"{BENCH_KEY_PREFIX}events:",
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
        "OUTBOX_RELAY_INTERVAL": "0.2",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "referral_grpc", "worker"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while (
            WebhookDelivery.select().where(WebhookDelivery.status == "pending").count()
            and time.monotonic() < deadline
        ):
            app.release_connection()
            time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait(30)
    first_at = (
        WebhookAttempt.select(WebhookAttempt.attempted_at).order_by(WebhookAttempt.id).first().attempted_at
    )
    last_at = (
        WebhookAttempt.select(WebhookAttempt.attempted_at)
        .order_by(WebhookAttempt.id.desc())
        .first()
        .attempted_at
    )
    delivered = WebhookDelivery.select().where(WebhookDelivery.status == "delivered").count()
    app.db.close()
    receiver.shutdown()
    return delivered / max((last_at - first_at).total_seconds(), 1e-3)


def measure(stream_events: int, deliveries: int, http10: bool = False) -> dict[str, float]:
    """Stream latency (p50, p99 ms) and webhook deliveries/s, on a database of their own."""
    database_url = _recreate_database()
    settings = Settings.from_env(
        {**os.environ, "DATABASE_URL": database_url, "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true"}
    )
    db = build_app(settings, verifier=NoEmailVerification(), dispatcher=NoDispatch()).db
    run_migrations(db)
    db.close()
    p50, p99 = stream_latency(settings, stream_events)
    rate = webhook_throughput(settings, database_url, deliveries, http10)
    return {"stream_p50_ms": p50, "stream_p99_ms": p99, "webhooks_per_s": rate}


def section(results: dict[str, float], stream_events: int, deliveries: int, http10: bool = False) -> str:
    stream = f"WatchEvents commit-to-delivery, PostgreSQL LISTEN/NOTIFY, {stream_events} events"
    receiver = "HTTP/1.0 (a connection per delivery)" if http10 else "keep-alive"
    webhooks = (
        f"webhook deliveries, 1 worker process (default threads, Redis queue), loopback {receiver} receiver, "
        f"{deliveries} events"
    )
    return "\n".join(
        [
            "| scenario | result |",
            "|---|---|",
            f"| {stream} | p50 {results['stream_p50_ms']:.1f} ms, p99 {results['stream_p99_ms']:.1f} ms |",
            f"| {webhooks} | {results['webhooks_per_s']:.0f} deliveries/s |",
            "",
            f"Load average at the end: {os.getloadavg()[0]:.1f} (2 cores, shared).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--stream-events", type=int, default=300)
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument(
        "--http10-receiver",
        action="store_true",
        help="a receiver that answers HTTP/1.0 and closes each connection (no keep-alive)",
    )
    parser.add_argument(
        "--no-write", dest="write_results", action="store_false", help="leave RESULTS.md alone"
    )
    args = parser.parse_args(argv)
    results = measure(args.stream_events, args.deliveries, args.http10_receiver)
    table = section(results, args.stream_events, args.deliveries, args.http10_receiver)
    print(table)
    if args.write_results:
        write_section(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

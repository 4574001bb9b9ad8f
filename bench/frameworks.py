"""grpc's synchronous server against grpc.aio for the lookup's I/O (`python -m bench.frameworks`).

Whether moving the server to grpc.aio would pay on this machine, measured before anyone rewrites it.
Not the service: one small server answers GetReferralCodeByEmail the way the service's cache path does
(one Redis MGET of the entry and its generation; on a miss one indexed PostgreSQL read, then NOT_FOUND),
written twice with the same I/O and the same messages:

- sync: `grpc.server` with 4 threads (GRPC_MAX_WORKERS' default), redis-py, psycopg2 (a connection per
  thread);
- aio: `grpc.aio.server` on asyncio's loop, redis.asyncio, psycopg2 on a 4-thread executor (the design's
  driver has no asyncio API).

No interceptors, access log or metrics on either side: only what the framework and the drivers cost.
Each side behind its own Envoy from gateway/envoy.yaml (as the bench renders it), wrk with 16 connections
over REST, the sides alternating in bursts; CPU per request is the server process's own.
Its own database (`BENCH_DATABASE` + `_frameworks`, recreated) and Redis prefix (`BENCH_KEY_PREFIX` + `fw:`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import threading
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg2  # type: ignore[import-untyped]
import redis
import redis.asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from referral_grpc.devstack.locations import PROJECT_ROOT
from referral_grpc.gen import referral_service_pb2 as pb

from . import harness, load
from .harness import BENCH_DATABASE, BENCH_KEY_PREFIX, BENCH_REDIS_URL, PG_SERVER_URL
from .run import GRPC_HEALTH, rest_lookup_path

DATABASE = f"{BENCH_DATABASE}_frameworks"
PREFIX = f"{BENCH_KEY_PREFIX}fw:"
THREADS = 4
USERS = 10_000
CACHED = 1_000
LOOKUP = "GetReferralCodeByEmail"
SQL = "SELECT code, expires_at FROM fw_code WHERE email_key = %s AND expires_at > %s LIMIT 1"
NOT_FOUND = "no active referral code for that email"
SIDES = ("sync", "aio")


def _email(i: int) -> str:
    return f"user{i}@fw.example.com"


def _keys(email: str) -> list[str]:
    return [f"{PREFIX}code:{email}", f"{PREFIX}codegen:{email}"]


def _answer(raw: str) -> pb.GetReferralCodeByEmailResponse:
    code, _, expires = raw.partition("|")
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(expires))
    return pb.GetReferralCodeByEmailResponse(code=code, expires_at=stamp)


def _row_answer(row: tuple[str, datetime]) -> pb.GetReferralCodeByEmailResponse:
    stamp = Timestamp()
    stamp.FromDatetime(row[1])
    return pb.GetReferralCodeByEmailResponse(code=row[0], expires_at=stamp)


class _Reader:
    """One psycopg2 connection per thread, as the service's pool gives each worker thread."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._local = threading.local()

    def code(self, email: str) -> tuple[str, datetime] | None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = psycopg2.connect(self._dsn)
            conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(SQL, (email, datetime.now(UTC)))
            row: tuple[str, datetime] | None = cur.fetchone()
            return row


def _handlers(lookup: Any, check: Any) -> tuple[grpc.GenericRpcHandler, ...]:
    lookup_handler = grpc.unary_unary_rpc_method_handler(
        lookup,
        request_deserializer=pb.GetReferralCodeByEmailRequest.FromString,
        response_serializer=pb.GetReferralCodeByEmailResponse.SerializeToString,
    )
    check_handler = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    return (
        grpc.method_handlers_generic_handler("referral.v1.ReferralService", {LOOKUP: lookup_handler}),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": check_handler}),
    )


SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def serve_sync(port: int, dsn: str) -> None:
    cache = redis.Redis.from_url(BENCH_REDIS_URL, decode_responses=True)
    reader = _Reader(dsn)

    def lookup(request: pb.GetReferralCodeByEmailRequest, context: grpc.ServicerContext) -> Any:
        raw, _generation = cache.mget(_keys(request.email))
        if raw is not None:
            return _answer(str(raw))
        row = reader.code(request.email)
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)
        return _row_answer(row)

    def check(request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        return SERVING

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=THREADS))
    server.add_generic_rpc_handlers(_handlers(lookup, check))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def _serve_aio(port: int, dsn: str) -> None:
    cache = redis.asyncio.Redis.from_url(BENCH_REDIS_URL, decode_responses=True)
    reader = _Reader(dsn)
    executor = futures.ThreadPoolExecutor(max_workers=THREADS)
    loop = asyncio.get_running_loop()

    async def lookup(
        request: pb.GetReferralCodeByEmailRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        raw, _generation = await cache.mget(_keys(request.email))
        if raw is not None:
            return _answer(str(raw))
        row = await loop.run_in_executor(executor, reader.code, request.email)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, NOT_FOUND)
        return _row_answer(row)

    async def check(
        request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return SERVING

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(_handlers(lookup, check))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _seed(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    expires = datetime.now(UTC) + timedelta(days=30)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE fw_code (email_key text PRIMARY KEY, code text, expires_at timestamptz)")
        cur.execute(
            "INSERT INTO fw_code SELECT 'user' || i || '@fw.example.com', 'CODE' || i, %s"
            " FROM generate_series(0, %s) i",
            (expires, USERS - 1),
        )
        cur.execute("ANALYZE fw_code")
    conn.close()
    client = redis.Redis.from_url(BENCH_REDIS_URL, decode_responses=True)
    harness.flush_redis_prefix(client, PREFIX)
    with client.pipeline(transaction=False) as pipe:
        for i in range(CACHED):
            pipe.set(_keys(_email(i))[0], f"CODE{i}|{expires.isoformat()}", ex=3600)
        pipe.execute()
    client.close()


# Scenario -> (path after Envoy's address, wrk script, whether every answer is a 404 by design).
Scenarios = dict[str, tuple[str, str, bool]]


def _scenarios(workdir: Path) -> Scenarios:
    """The no-op, a cache hit, a miss read from PostgreSQL."""
    hit = load.write_request_lines(
        workdir / "hit.tsv", ((rest_lookup_path(_email(i)), "", "") for i in range(CACHED))
    )
    miss = load.write_request_lines(
        workdir / "miss.tsv",
        ((rest_lookup_path(f"nobody{i}@fw.example.com"), "", "") for i in range(USERS)),
    )
    return {
        "no-op (Health/Check)": (GRPC_HEALTH, load.static_script("POST", "{}"), False),
        "lookup, Redis hit": ("", load.cycle_script("GET", hit, 1), False),
        "lookup, unknown email (Redis + PostgreSQL)": ("", load.cycle_script("GET", miss, 1), True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frameworks", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="one burst (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per side and scenario (default 3)")
    parser.add_argument("--serve", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "sync":
        serve_sync(args.port, args.dsn)
        return 0
    if args.serve == "aio":
        asyncio.run(_serve_aio(args.port, args.dsn))
        return 0
    load.require_tools()
    dsn = harness.recreate_database(PG_SERVER_URL, DATABASE)
    _seed(dsn)
    workdir = harness.new_workdir("frameworks")
    descriptor = harness.bench_descriptor_set(workdir / "bench.pb")
    servers: dict[str, subprocess.Popen[bytes]] = {}
    envoys: dict[str, harness.BenchEnvoy] = {}
    try:
        for side in SIDES:
            port = harness.free_port()
            servers[side] = subprocess.Popen(  # noqa: S603 - our own interpreter
                [
                    sys.executable,
                    "-m",
                    "bench.frameworks",
                    "--serve",
                    side,
                    "--port",
                    str(port),
                    "--dsn",
                    dsn,
                ],
                cwd=PROJECT_ROOT,
            )
            side_dir = workdir / side
            side_dir.mkdir()
            config = harness.bench_envoy_config([("127.0.0.1", port)], descriptor)
            envoys[side] = harness.BenchEnvoy(config, side_dir, 1)
            envoys[side].wait_ready()
            envoys[side].wait_backends_healthy(1)
        results = _measure(_scenarios(workdir), envoys, servers, args.seconds, args.rounds)
    finally:
        for envoy in envoys.values():
            envoy.stop()
        for server in servers.values():
            server.terminate()
            server.wait(10)
        client = redis.Redis.from_url(BENCH_REDIS_URL)
        harness.flush_redis_prefix(client, PREFIX)
        client.close()
    _print(results, args)
    return 0


Sample = tuple[float, float, float, int]  # req/s, p99 ms, server CPU ms per request, unexpected statuses


def _measure(
    scenarios: Scenarios,
    envoys: dict[str, harness.BenchEnvoy],
    servers: dict[str, subprocess.Popen[bytes]],
    seconds: float,
    rounds: int,
) -> dict[str, dict[str, list[Sample]]]:
    results: dict[str, dict[str, list[Sample]]] = {name: {side: [] for side in SIDES} for name in scenarios}
    for name, (path, script, all_404) in scenarios.items():
        for side in SIDES:  # warm-up: connections, the executor's threads, PostgreSQL's plan cache
            load.run_wrk(envoys[side].url + path, script, connections=16, seconds=1)
        for round_ in range(rounds):
            # ABBA: neither side always runs first.
            order = SIDES if round_ % 2 == 0 else SIDES[::-1]
            for side in order:
                before = harness.cpu_seconds(servers[side].pid)
                result = load.run_wrk(envoys[side].url + path, script, connections=16, seconds=seconds)
                used = harness.cpu_seconds(servers[side].pid) - before
                # wrk counts every answer of 400 or more: the unknown emails' must all be (404), no other's.
                failed = result.requests - result.status_errors if all_404 else result.status_errors
                unexpected = failed + result.transport_errors
                sample = (result.rps, result.p99_ms, 1000 * used / max(result.requests, 1), unexpected)
                results[name][side].append(sample)
                print(f"{name:<45} {side:<5} {sample[0]:8.0f} req/s p99 {sample[1]:6.2f} ms", file=sys.stderr)
    return results


def _print(results: dict[str, dict[str, list[Sample]]], args: argparse.Namespace) -> None:
    print(
        "grpc sync (4 threads) vs grpc.aio, one server process each behind Envoy, wrk -c16, "
        f"{args.rounds} x {args.seconds:.0f} s bursts per side, medians; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
    )
    print(
        "| scenario | sync req/s | aio req/s | aio / sync | sync p99 ms | aio p99 ms "
        "| server CPU ms/req sync / aio |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, sides in results.items():
        med = {side: [statistics.median(s[k] for s in sides[side]) for k in range(3)] for side in SIDES}
        wrong = sum(s[3] for side in SIDES for s in sides[side])
        note = f" ({wrong} unexpected statuses)" if wrong else ""
        print(
            f"| {name}{note} | {med['sync'][0]:,.0f} | {med['aio'][0]:,.0f}"
            f" | {med['aio'][0] / med['sync'][0]:.2f}x"
            f" | {med['sync'][1]:.2f} | {med['aio'][1]:.2f} | {med['sync'][2]:.3f} / {med['aio'][2]:.3f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())

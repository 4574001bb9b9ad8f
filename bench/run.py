"""The benchmark run: start the stack, seed, run every scenario, sample RSS, profile, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import grpc
import psycopg2
import redis
from grpc_health.v1 import health_pb2

from referral_grpc.devstack.locations import PROJECT_ROOT
from referral_grpc.domain.passwords import PasswordHasher
from referral_grpc.gen import event_service_pb2, event_service_pb2_grpc, referral_service_pb2
from referral_grpc.settings import Settings

from . import events, harness, load, profile, report, seed
from .grpcload import write_bodies
from .load import LoadResult
from .options import Options


@dataclass
class Context:
    options: Options
    workdir: Path
    env: dict[str, str]
    database_url: str
    jwt_secret: str
    redis: redis.Redis
    servers: harness.Servers
    descriptor: Path
    server_log: IO[bytes]
    cpu: harness.CpuMeter
    envoy: harness.BenchEnvoy | None = None
    rows: list[report.Row] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)
    procs: int = 1
    _cpu_used: dict[str, float] | None = None

    def start_envoy(self, processes: int, backends: harness.Servers | None = None) -> harness.BenchEnvoy:
        """Envoy in front of the first `processes` servers (of `backends`, default the main ones)."""
        if self.envoy is not None:
            self.envoy.stop()
        servers = backends or self.servers
        config = harness.bench_envoy_config(servers.addresses[:processes], self.descriptor)
        self.envoy = harness.BenchEnvoy(config, self.workdir, self.options.envoy_concurrency)
        self.envoy.wait_ready()
        self.envoy.wait_backends_healthy(processes)
        self.procs = processes
        self.cpu.server_pids = servers.pids[:processes]
        self.cpu.envoy_pid = self.envoy.process.pid
        return self.envoy

    def measure(self, load_run: Callable[[], LoadResult]) -> LoadResult:
        """Run a load and keep the CPU each part of the stack used meanwhile, for the next row."""
        before = self.cpu.snapshot()
        result = load_run()
        self._cpu_used = harness.CpuMeter.used(before, self.cpu.snapshot())
        return result

    @property
    def url(self) -> str:
        assert self.envoy is not None
        return self.envoy.url

    @property
    def target(self) -> str:
        assert self.envoy is not None
        return f"127.0.0.1:{self.envoy.port}"

    def add(
        self,
        name: str,
        proto: str,
        connections: int,
        result: LoadResult,
        ceiling: str,
        note: str = "",
        expected_status: int = 0,
    ) -> None:
        row = report.Row(name, proto, connections, result, ceiling, note, procs=self.procs)
        row.cpu, self._cpu_used = self._cpu_used, None
        row.expected_status = expected_status
        self.rows.append(row)
        print(report.format_row(row), flush=True)


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextmanager
def _stack(options: Options) -> Iterator[Context]:
    workdir = harness.new_workdir("run")
    database_url = harness.recreate_database()
    env = {**harness.production_env(database_url), "BCRYPT_ROUNDS": str(options.bcrypt_rounds)}
    jwt_secret, pepper = env["JWT_SECRET"], env["PASSWORD_PEPPER"]
    # What ships: ENVIRONMENT=production with PostgreSQL and Redis and nothing else changed (ACCESS_LOG,
    # LOG_FORMAT, pools at their defaults). Other configurations are extra, labelled rows.
    if options.log_level.upper() != "INFO":
        env["LOG_LEVEL"] = options.log_level
    for name in ("ACCESS_LOG", "LOG_LEVEL", "LOG_FORMAT"):
        if name in os.environ and name not in env:
            del env[name]
    _say(f"workdir {workdir}; database {database_url}")
    harness.run_migrations(env)
    client = redis.Redis.from_url(harness.BENCH_REDIS_URL, decode_responses=True)
    harness.flush_redis_prefix(client)
    with (workdir / "servers.log").open("ab") as server_log:
        servers = harness.start_servers(env, options.processes, server_log)
        context = Context(
            options=options,
            workdir=workdir,
            env=env,
            database_url=database_url,
            jwt_secret=jwt_secret,
            redis=client,
            servers=servers,
            server_log=server_log,
            descriptor=harness.bench_descriptor_set(workdir / "bench.pb"),
            cpu=harness.CpuMeter(database_url, client, servers.pids),
        )
        context.facts["pepper"] = pepper
        context.facts["access_log_default"] = Settings.from_env(env).access_log
        try:
            yield context
        finally:
            if context.envoy is not None:
                context.envoy.stop()
            servers.stop()
            client.close()


def rest_lookup_path(email: str) -> str:
    return f"/referral/code/by-email?email={quote(email, safe='')}"


GRPC_LOOKUP = "/referral.v1.ReferralService/GetReferralCodeByEmail"
GRPC_HEALTH = "/grpc.health.v1.Health/Check"


def _lookup_body(email: str) -> bytes:
    return referral_service_pb2.GetReferralCodeByEmailRequest(email=email).SerializeToString()


def _python_grpc_load(ctx: Context, method: str, bodies: list[bytes], seconds: float) -> LoadResult:
    path = write_bodies(ctx.workdir / "grpc-bodies.bin", bodies)
    started = load.envoy_time()
    proc = subprocess.run(  # noqa: S603 - our own interpreter
        [
            sys.executable,
            "-m",
            "bench.grpcload",
            ctx.target,
            method,
            str(path),
            "--connections",
            str(ctx.options.connections),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    )
    data = json.loads(proc.stdout)
    return LoadResult(
        requests=data["requests"],
        seconds=data["seconds"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        status_errors=data["errors"],
        started=started,
        ended=load.envoy_time(),
        path_prefix=method,
    )


def run(options: Options) -> int:
    load.require_tools()
    seconds, conns = options.seconds, options.connections
    with _stack(options) as ctx:
        hasher = PasswordHasher(options.bcrypt_rounds, str(ctx.facts["pepper"]), 1)
        real_hash = hasher.hash(seed.BENCH_PASSWORD)
        bcrypt_s = seed.bcrypt_seconds(hasher, real_hash)
        ctx.facts["bcrypt_seconds"] = bcrypt_s
        plan = seed.SeedPlan(options.lookup_users, options.login_users, (1_000, options.big_owner))
        _say(f"seeding {plan} ...")
        seeded = seed.seed(ctx.database_url, plan, real_hash)
        ctx.facts["seed_seconds"] = seeded.seconds
        _say(
            f"seeded in {seeded.seconds:.1f} s; bcrypt cost {options.bcrypt_rounds}: {bcrypt_s * 1000:.0f} ms"
        )
        ctx.start_envoy(options.processes)
        with harness.RssSampler(ctx.servers.pids) as whole_run_rss:
            _scenarios(ctx, seeded, seconds, conns)
            if options.compare_processes:
                _compare_processes(ctx, seconds, conns)
            _soak(ctx, seeded)
            # The stream's latency with nothing else running, and one worker's webhook deliveries
            # (bench.events: its own database and worker).
            stream_events, deliveries = (50, 200) if options.smoke else (300, 2000)
            ctx.facts["events"] = events.measure(stream_events, deliveries)
            if options.write_results:
                events.write_section(events.section(ctx.facts["events"], stream_events, deliveries))
            if options.profile:
                profile_text = profile.profile_servers(
                    ctx.servers.pids, ctx.workdir, lambda: _hit_rest_load(ctx, max(seconds, 10), conns)
                )
                ctx.facts["profile"] = profile_text
                print(profile_text)
        ctx.facts["rss_whole_run"] = report.rss_summary(whole_run_rss.samples)
        assert ctx.envoy is not None
        ctx.envoy.stop()
        counts = load.access_log_errors(
            ctx.envoy.access_log,
            [row.result for row in ctx.rows],
            [row.expected_status for row in ctx.rows],
        )
        for row, (_, failed) in zip(ctx.rows, counts, strict=True):
            row.logged_errors = failed
        ctx.envoy = None
        machine = report.machine_description(ctx.database_url, ctx.redis)
        table = report.render(ctx.rows, ctx.facts, options, machine)
        print()
        print(table)
        if options.write_results:
            report.write_results(PROJECT_ROOT / "bench" / "RESULTS.md", table)
            _say("wrote bench/RESULTS.md")
        broken = [row.name for row in ctx.rows if row.result.requests == 0]
        if broken:
            _say(f"scenarios that completed no request: {', '.join(broken)}")
            return 1
    return 0


def _hit_rest_load(ctx: Context, seconds: float, conns: int) -> LoadResult:
    path = rest_lookup_path(seed.lookup_email(0))
    return load.run_wrk(
        ctx.url + path, load.static_script(), connections=conns, seconds=seconds, path_prefix="/referral/code"
    )


def _hit_grpc_load(ctx: Context, seconds: float, conns: int) -> LoadResult:
    return load.run_h2load(
        ctx.url + GRPC_LOOKUP,
        connections=conns,
        seconds=seconds,
        body=load.grpc_frame(_lookup_body(seed.lookup_email(0))),
        path_prefix=GRPC_LOOKUP,
    )


def _rest_ceiling(ctx: Context, conns: int) -> None:
    """The transcoded no-op RPC once more: repeated through the run, since it moves with the machine."""
    seconds = ctx.options.seconds if ctx.options.smoke else max(2.0, ctx.options.seconds / 2)
    result = ctx.measure(
        lambda: load.run_wrk(
            ctx.url + GRPC_HEALTH,
            load.static_script("POST", "{}"),
            connections=conns,
            seconds=seconds,
            path_prefix=GRPC_HEALTH,
        )
    )
    taken = sum(
        1 for row in ctx.rows if row.is_rpc_ceiling and row.proto == "REST" and row.procs == ctx.procs
    )
    ctx.add(f"{report.CEILING} transcoded ({ctx.procs}p) #{taken + 1}", "REST", conns, result, "-")


def _scenarios(ctx: Context, seeded: seed.Seeded, seconds: float, conns: int) -> None:
    opts = ctx.options
    procs = f"{opts.processes}p"
    # Warm-up: connections, code paths, the one cached entry; not measured.
    _hit_rest_load(ctx, 2, conns)

    # 1. Ceilings.
    ctx.add(
        "ceiling: Envoy direct_response (proxy only)",
        "REST",
        conns,
        ctx.measure(
            lambda: load.run_wrk(
                ctx.url + harness.NOOP_PATH,
                load.static_script(),
                connections=conns,
                seconds=seconds,
                path_prefix=harness.NOOP_PATH,
            )
        ),
        "-",
    )
    _rest_ceiling(ctx, conns)
    ctx.add(
        f"{report.CEILING} ({procs})",
        "gRPC",
        conns,
        ctx.measure(
            lambda: load.run_h2load(
                ctx.url + GRPC_HEALTH,
                connections=conns,
                seconds=seconds,
                body=load.grpc_frame(health_pb2.HealthCheckRequest().SerializeToString()),
                path_prefix=GRPC_HEALTH,
            )
        ),
        "-",
    )

    # 2. Cache hit: one email, cached after its first lookup. A short unmeasured burst first, so that
    #    warm-up is not what this row measures (the ceilings ran other paths just before).
    _hit_rest_load(ctx, 2, conns)
    hit = ctx.measure(lambda: _hit_rest_load(ctx, seconds, conns))
    ctx.add(f"lookup, cache hit ({procs})", "REST", conns, hit, "REST")
    ctx.add(
        f"lookup, cache hit ({procs})",
        "gRPC",
        conns,
        ctx.measure(lambda: _hit_grpc_load(ctx, seconds, conns)),
        "gRPC",
    )
    _rest_ceiling(ctx, conns)

    # 3. Cold cache: every request a different user, cache flushed first; then unknown emails.
    _cold(ctx, seconds, conns)
    _rest_ceiling(ctx, conns)

    # 4. ListReferrals, first and deep page, 1k and big owners; tokens through Login.
    _lists(ctx, seeded, seconds, conns)
    _rest_ceiling(ctx, conns)

    # 5. CreateReferralCode: many users, each rotating its code; tokens through Login.
    emails = [seed.login_email(i) for i in range(opts.login_users)]
    user_tokens = seed.login_all(ctx.target, emails)
    expires = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = json.dumps({"expires_at": expires})
    lines = load.write_request_lines(
        ctx.workdir / "create.tsv", (("/referral/code", t, body) for t in user_tokens)
    )
    create = ctx.measure(
        lambda: load.run_wrk(
            ctx.url,
            load.cycle_script("POST", lines, 1),
            connections=conns,
            seconds=seconds,
            path_prefix="/referral/code",
        )
    )
    ctx.add(f"CreateReferralCode, {len(user_tokens)} users rotating", "REST", conns, create, "REST")
    _rest_ceiling(ctx, conns)

    # 6. The access log, on and off, and the near cache, on and off, for the cached lookup.
    _access_log_ab(ctx, conns)
    _near_cache_ab(ctx, conns)
    _rest_ceiling(ctx, conns)

    # 7. Rewards: RecordEvent with an API key (qualifying and duplicate events), RedeemRewards.
    _rewards(ctx, seconds, conns)
    _rest_ceiling(ctx, conns)

    # 8. Login vs the bcrypt ceiling, and lookup latency while logins saturate the CPU.
    _logins(ctx, seconds)


def _cold(ctx: Context, seconds: float, conns: int) -> None:
    procs = f"{ctx.options.processes}p"
    users = ctx.options.lookup_users
    half = users // 2
    lines = load.write_request_lines(
        ctx.workdir / "cold.tsv", ((rest_lookup_path(seed.lookup_email(i)), "", "") for i in range(half))
    )
    harness.flush_redis_prefix(ctx.redis)
    cold = ctx.measure(
        lambda: load.run_wrk(
            ctx.url,
            load.cycle_script("GET", lines, 1),
            connections=conns,
            seconds=seconds,
            path_prefix="/referral/code",
        )
    )
    filled = harness.count_redis_keys(ctx.redis, f"{harness.BENCH_KEY_PREFIX}code:*")
    ctx.add(f"lookup, cold cache ({procs})", "REST", conns, cold, "REST", _cold_note(cold, filled))
    harness.flush_redis_prefix(ctx.redis)
    bodies = [_lookup_body(seed.lookup_email(i)) for i in range(half, users)]
    cold_grpc = ctx.measure(lambda: _python_grpc_load(ctx, GRPC_LOOKUP, bodies, seconds))
    filled = harness.count_redis_keys(ctx.redis, f"{harness.BENCH_KEY_PREFIX}code:*")
    ctx.add(
        f"lookup, cold cache ({procs})",
        "gRPC",
        conns,
        cold_grpc,
        "gRPC",
        _cold_note(cold_grpc, filled) + "; Python aio client",
    )
    unknown = load.write_request_lines(
        ctx.workdir / "unknown.tsv",
        ((rest_lookup_path(f"nobody{i}@{seed.DOMAIN}"), "", "") for i in range(10_000)),
    )
    miss = ctx.measure(
        lambda: load.run_wrk(
            ctx.url,
            load.cycle_script("GET", unknown, 1),
            connections=conns,
            seconds=seconds,
            path_prefix="/referral/code",
        )
    )
    ctx.add(
        f"lookup, unknown email ({procs})",
        "REST",
        conns,
        miss,
        "REST",
        "404 NOT_FOUND by design (not errors): a Redis read and a PostgreSQL read each",
        expected_status=404,
    )


def _lists(ctx: Context, seeded: seed.Seeded, seconds: float, conns: int) -> None:
    owners = sorted(seeded.owner_ids)
    tokens = seed.login_all(ctx.target, [seed.owner_email(n) for n in owners])
    for count, token in zip(owners, tokens, strict=True):
        owner_id = seeded.owner_ids[count]
        depth = count * 9 // 10
        page_token = seed.deep_page_token(ctx.database_url, ctx.jwt_secret, owner_id, depth)
        rows, more = seed.check_page(ctx.target, token, page_token)
        if rows != 50 or not more:
            raise RuntimeError(f"the deep page token of owner{count} does not give a full page")
        label = f"{count:,}" if count < 1_000_000 else f"{count // 1_000_000}M"
        for page, query in (("first page", ""), (f"page at row {depth:,}", f"?page_token={page_token}")):
            result = ctx.measure(
                lambda query=query, token=token: load.run_wrk(
                    ctx.url + "/referral/referrals" + query,
                    load.static_script(headers={"authorization": f"Bearer {token}"}),
                    connections=conns,
                    seconds=seconds,
                    path_prefix="/referral/referrals",
                )
            )
            ctx.add(f"ListReferrals {label} referrals, {page}", "REST", conns, result, "REST")


def _access_log_ab(ctx: Context, conns: int) -> None:
    """The cached lookup with ACCESS_LOG on and off."""
    default = "true" if ctx.facts.get("access_log_default", True) else "false"
    _ab(ctx, conns, report.AB_ACCESS_LOG, "ACCESS_LOG", {"on": "true", "off": "false"}, default)


def _near_cache_ab(ctx: Context, conns: int) -> None:
    """The cached lookup with the per-process near cache (the default) and without (every hit reads Redis)."""
    default = str(Settings.from_env(ctx.env).near_cache_entries)
    _ab(ctx, conns, report.AB_NEAR_CACHE, "NEAR_CACHE_ENTRIES", {"on": default, "off": "0"}, default)


def _ab(ctx: Context, conns: int, label: str, variable: str, sides: dict[str, str], default: str) -> None:
    """The cached lookup with `variable` set per side, in rounds of short bursts, fresh servers each round.

    Every round starts one server per side, the side started first alternating from round to round: on
    a 2-core machine the first-started of two servers with the same settings measured about 10% apart
    from the second, as much as the access log's whole budget, so each side gets each slot equally often
    (as `bench.ab` does for revisions). Within a round the bursts go in ABBA order (first-started,
    second, second, first): a drift of the machine weighs on both sides alike. The target check compares
    the medians of all bursts.
    """
    rounds = 1 if ctx.options.smoke else 4
    seconds = ctx.options.seconds if ctx.options.smoke else max(2.0, ctx.options.seconds / 2)
    try:
        for round_number in range(rounds):
            order = list(sides.items())
            if round_number % 2:
                order.reverse()
            started: dict[str, harness.Servers] = {}
            try:
                for side, value in order:
                    started[side] = harness.start_servers({**ctx.env, variable: value}, 1, ctx.server_log)
                first, second = (side for side, _ in order)
                for side in (first, second, second, first):
                    ctx.start_envoy(1, started[side])
                    _hit_rest_load(ctx, 1, conns)
                    result = ctx.measure(lambda: _hit_rest_load(ctx, seconds, conns))
                    shipped = " (the production default)" if sides[side] == default else ""
                    ctx.add(f"{label} {side}{shipped}, lookup, cache hit (1p)", "REST", conns, result, "REST")
            finally:
                for servers in started.values():
                    servers.stop()
    finally:
        ctx.start_envoy(ctx.options.processes)


# Enough distinct newcomers that a run never wraps around to its first line (each of the two
# RecordEvent rows takes half of them).
REWARD_EVENTS = 200_000
RECORD_EVENT_LOAD = "qualifying + duplicate 1:1, API key"
RECORD_EVENT_NOTE = "a WatchEvents stream is open on the server meanwhile (its CPU counts here)"


def _cli(ctx: Context, *args: str) -> str:
    return harness.run_cli(ctx.env, *args)


def _rewards(ctx: Context, seconds: float, conns: int) -> None:
    key = _cli(ctx, "apikey", "create", "--name", "bench", "--scope", "events:write",
               "--scope", "rewards:redeem", "--scope", "events:read").splitlines()[-1]  # fmt: skip
    # Paid at once (no hold), so that the redemptions below have money to spend.
    # The seeded users signed up over the past years: a window as long as the rules allow.
    _cli(ctx, "program", "set", "--currency", "USD", "--referrer-reward-minor", "500",
         "--referee-reward-minor", "100", "--hold-days", "0", "--attribution-days", "3650")  # fmt: skip
    with psycopg2.connect(ctx.database_url) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT id FROM users WHERE referrer_id IS NOT NULL ORDER BY id LIMIT %s", (REWARD_EVENTS // 2,)
        )
        newcomers = [row[0] for row in cursor.fetchall()]
    headers = f"x-api-key={key}"

    def purchase(n: int) -> str:
        return json.dumps(
            {
                "event_id": f"bench-order-{n}",
                "user_id": str(newcomers[n]),
                "type": "purchase",
                "amount_minor": "4900",
                "currency": "USD",
            }
        )

    def event_lines(name: str, first: int) -> Path:
        # Every other request a retry of the previous one: a first (qualifying) event, then its duplicate.
        # The newcomers from `first` on: no newcomer's event is recorded by both rows.
        count = len(newcomers) - first
        rows = [("/events", "", purchase(first + n // 2), headers) for n in range(2 * count)]
        return load.write_request_lines(ctx.workdir / name, rows)

    def record_events(lines: Path) -> LoadResult:
        return ctx.measure(
            lambda: load.run_wrk(
                ctx.url,
                load.cycle_script("POST", lines, 1),
                connections=conns,
                seconds=seconds,
                path_prefix="/events",
            )
        )

    # First the load with no stream open: what recording costs where nothing watches the log live. First,
    # because a server's LISTEN connection stays for a while after its last stream ends (IDLE_AFTER).
    lines = event_lines("events-unwatched.tsv", len(newcomers) // 2)
    unwatched = record_events(lines)
    ctx.add(f"RecordEvent with {report.UNWATCHED}, {RECORD_EVENT_LOAD}", "REST", conns, unwatched, "REST")
    lines = event_lines("events.tsv", 0)
    with WatchLatency(ctx.servers.addresses[0], key) as watch:
        events = record_events(lines)
    ctx.add(f"RecordEvent, {RECORD_EVENT_LOAD}", "REST", conns, events, "REST", RECORD_EVENT_NOTE)
    ctx.facts["watch_latency_ms"] = watch.percentiles()
    with psycopg2.connect(ctx.database_url) as conn, conn.cursor() as cursor:
        # Exactly once: a referral's reward of each kind at most once, whatever the retries did.
        cursor.execute(
            "SELECT count(*) FROM (SELECT 1 FROM ledger_entries WHERE kind IN"
            " ('referrer_reward', 'referee_reward') GROUP BY referral_user_id, kind HAVING count(*) > 1) AS d"
        )
        ctx.facts["duplicate_credits"] = int(cursor.fetchone()[0])

    # Each rewarded newcomer spends 1 cent at a time, every call with its own Idempotency-Key.
    with psycopg2.connect(ctx.database_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT user_id FROM ledger_entries WHERE kind = 'referee_reward' ORDER BY id")
        paid = [row[0] for row in cursor.fetchall()]
    if not paid:
        raise RuntimeError("RecordEvent credited nobody: nothing to redeem")
    rounds = max(1, REWARD_EVENTS // len(paid))
    redeem_rows = (
        (
            "/rewards/redeem",
            "",
            json.dumps({"user_id": str(user), "amount_minor": "1", "currency": "USD"}),
            f"{headers};idempotency-key=bench-{r}-{user}",
        )
        for r in range(min(rounds, 100))
        for user in paid
    )
    lines = load.write_request_lines(ctx.workdir / "redeem.tsv", redeem_rows)
    redeem = load.run_wrk(
        ctx.url,
        load.cycle_script("POST", lines, 1),
        connections=conns,
        seconds=seconds,
        path_prefix="/rewards/redeem",
    )
    ctx.add(f"RedeemRewards, {len(paid):,} users, Idempotency-Key each", "REST", conns, redeem, "REST")


class WatchLatency:
    """A WatchEvents stream on the server while a load runs: how long after `occurred_at` each event arrives.

    `occurred_at` is taken when the recording transaction starts, so this is an upper bound of
    commit-to-delivery (it includes the transaction). Read straight from the server: Envoy's route
    timeout would cut a long stream, and the figure is about the service.
    """

    def __init__(self, address: harness.Address, api_key: str) -> None:
        self._channel = grpc.insecure_channel(f"{address[0]}:{address[1]}")
        stub = event_service_pb2_grpc.EventServiceStub(self._channel)
        self._call = stub.WatchEvents(
            event_service_pb2.WatchEventsRequest(after_cursor=self._last_cursor(stub, api_key)),
            metadata=(("x-api-key", api_key),),
        )
        self._latencies_ms: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)

    @staticmethod
    def _last_cursor(stub: Any, api_key: str) -> int:
        cursor, metadata = 0, (("x-api-key", api_key),)
        while True:
            page = stub.ListEvents(
                event_service_pb2.ListEventsRequest(after_cursor=cursor, page_size=1000), metadata=metadata
            )
            if not page.events:
                return cursor
            cursor = page.next_cursor

    def _read(self) -> None:
        try:
            for event in self._call:
                arrived = time.time()
                self._latencies_ms.append((arrived - event.occurred_at.ToNanoseconds() / 1e9) * 1000)
        except grpc.RpcError:
            pass

    def __enter__(self) -> WatchLatency:
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # the last commits' events are on their way
        self._call.cancel()
        self._reader.join(5)
        self._channel.close()

    def percentiles(self) -> dict[str, float]:
        values = sorted(self._latencies_ms)
        if not values:
            return {}
        return {
            "events": len(values),
            "p50": values[len(values) // 2],
            "p99": values[min(len(values) - 1, int(0.99 * len(values)))],
        }


def _cold_note(result: LoadResult, filled: int) -> str:
    return f"{filled:,} distinct users filled ({filled / max(1, result.requests):.0%} of requests missed)"


def _logins(ctx: Context, seconds: float) -> None:
    cores = os.cpu_count() or 1
    bcrypt_s = float(str(ctx.facts["bcrypt_seconds"]))
    ceiling = cores / bcrypt_s
    ctx.facts["login_ceiling"] = ceiling
    login_conns = max(4, 2 * cores * ctx.options.processes)
    login_seconds = max(seconds, 10.0) if not ctx.options.smoke else seconds
    # Every login user in turn, so no account has more than one login in flight: the per-account
    # throttle counts attempts before the password is checked, and one account hammered from every
    # connection (with the previous row's cancelled logins still hashing) went over its limit and
    # got fast 429s (the 35 errors of "Login, during the probe" in an idle run).
    bodies = (
        ("/auth/login", "", json.dumps({"email": seed.login_email(i), "password": seed.BENCH_PASSWORD}))
        for i in range(ctx.options.login_users)
    )
    login_lines = load.write_request_lines(ctx.workdir / "logins.tsv", bodies)
    login_script = load.cycle_script("POST", login_lines, 1)
    # A fixed-rate probe (open loop): its latency shows what logins do to other requests, not how
    # closed-loop clients share the CPU.
    probe_rate, probe_conns = 200, 4
    probe_url = ctx.url + rest_lookup_path(seed.lookup_email(0))

    def probe(duration: float) -> LoadResult:
        return load.run_h2load(
            probe_url,
            connections=probe_conns,
            seconds=duration,
            grpc=False,
            rps_per_connection=probe_rate / probe_conns,
            path_prefix="/referral/code",
        )

    idle = probe(seconds)
    ctx.add(f"lookup probe {probe_rate}/s, idle", "REST", probe_conns, idle, "-")
    ctx.add(
        f"Login, {login_conns} conns (bcrypt cost {ctx.options.bcrypt_rounds})",
        "REST",
        login_conns,
        ctx.measure(
            lambda: load.run_wrk(
                ctx.url,
                login_script,
                connections=login_conns,
                seconds=login_seconds,
                path_prefix="/auth/login",
            )
        ),
        "bcrypt",
    )
    results: dict[str, LoadResult] = {}

    def login_load() -> None:
        results["login"] = load.run_wrk(
            ctx.url,
            login_script,
            connections=login_conns,
            seconds=login_seconds + 2,
            path_prefix="/auth/login",
        )

    _in_background(login_load, lambda: time.sleep(1.0) or results.__setitem__("probe", probe(login_seconds)))
    ctx.add(f"lookup probe {probe_rate}/s, during logins", "REST", probe_conns, results["probe"], "probe")
    ctx.add("Login, during the probe", "REST", login_conns, results["login"], "bcrypt")


def _in_background(background: Callable[[], None], foreground: Callable[[], object]) -> None:
    import threading

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    foreground()
    thread.join()


def _compare_processes(ctx: Context, seconds: float, conns: int) -> None:
    other = 1 if ctx.options.processes > 1 else 2
    if other > len(ctx.servers.processes):
        harness.start_servers(ctx.env, other - len(ctx.servers.processes), ctx.server_log, ctx.servers)
    ctx.start_envoy(other)
    _hit_rest_load(ctx, 2, conns)
    _rest_ceiling(ctx, conns)
    hit = ctx.measure(lambda: _hit_rest_load(ctx, seconds, conns))
    ctx.add(f"lookup, cache hit ({other}p)", "REST", conns, hit, "REST")
    hit_grpc = ctx.measure(lambda: _hit_grpc_load(ctx, seconds, conns))
    ctx.add(f"lookup, cache hit ({other}p)", "gRPC", conns, hit_grpc, "gRPC")
    _rest_ceiling(ctx, conns)
    ctx.start_envoy(ctx.options.processes)


def _soak(ctx: Context, seeded: seed.Seeded) -> None:
    """A mixed load for --soak seconds while the servers' RSS is sampled every second."""
    opts = ctx.options
    owner = min(seeded.owner_ids)
    token = seed.login_all(ctx.target, [seed.owner_email(owner)])[0]
    rows: list[tuple[str, str, str]] = []
    for i in range(opts.lookup_users):
        rows.append((rest_lookup_path(seed.lookup_email(i)), "", ""))
        if i % 4 == 0:
            rows.append(("/referral/referrals", token, ""))
    lines = load.write_request_lines(ctx.workdir / "soak.tsv", rows)
    pids = ctx.servers.pids[: opts.processes]
    # Warm-up with the same load, not sampled: more than one pass over the lookup users, so that the
    # bounded caches (the near cache fills on a user's second lookup, up to NEAR_CACHE_ENTRIES) are full
    # before the baseline and the soak measures steady state, not a cache filling to its bound.
    load.run_wrk(
        ctx.url,
        load.cycle_script("GET", lines, 1),
        connections=opts.connections,
        seconds=min(opts.soak / 2, 150),
        path_prefix="/referral",
    )
    with harness.RssSampler(pids) as sampler:
        result = ctx.measure(
            lambda: load.run_wrk(
                ctx.url,
                load.cycle_script("GET", lines, 1),
                connections=opts.connections,
                seconds=opts.soak,
                path_prefix="/referral",
            )
        )
    ctx.facts["rss_soak"] = report.rss_summary(sampler.samples)
    ctx.add(f"soak {opts.soak:.0f} s: mixed lookups + lists", "REST", opts.connections, result, "REST")

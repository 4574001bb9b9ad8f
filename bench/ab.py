"""A/B of two versions of the server on one scenario: `python -m bench.ab BASE [HEAD] [--scenario S]`.

BASE and HEAD are git revisions (HEAD defaults to the working tree, uncommitted changes included). Each
runs from its own checkout (a detached worktree under var/bench/ab/, removed afterwards), with the same
production settings as `make bench`, against one seeded database, each server process behind its own copy
of the bench's Envoy. A pair is two bursts of the one scenario for each side in ABBA order (BAAB in every
other pair), and every pair starts both sides afresh, in alternating order: on a 2-core machine the
first-started "slot" measured ~10% apart from the second with the same code on both (an A/A run), so each
side gets each slot equally often. The result is the geometric mean of the pairs' HEAD/BASE ratios, with
each side's medians and server / Envoy / PostgreSQL CPU per request. Run the same revision on both sides
to see what this machine's noise is.

The servers are started from their checkout's directory: `python -m` puts the working directory first on
sys.path, so a side started from elsewhere with PYTHONPATH would import the other side's code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import redis

from referral_grpc.devstack.locations import PROJECT_ROOT
from referral_grpc.domain.passwords import PasswordHasher

from . import harness, load, seed
from .run import WatchLatency, rest_lookup_path

SCENARIOS = ("events", "hit", "cold", "list")
# Newcomers (RecordEvent) or users (cold lookup) each burst takes; none is used twice.
PER_BURST = 3_000
AB_DATABASE = os.environ.get("BENCH_AB_DATABASE", "referral_bench_ab")


@dataclass
class Side:
    name: str
    revision: str
    root: Path
    rates: list[float] = field(default_factory=list)
    # CPU milliseconds per request of each part of the stack, per burst.
    cpu: list[dict[str, float]] = field(default_factory=list)
    # The events scenario: the WatchEvents stream's latency percentiles (ms), per burst.
    watch: list[dict[str, float]] = field(default_factory=list)


@contextmanager
def checkout(revision: str, side: str) -> Iterator[Path]:
    """The directory to run `revision` from: the working tree for "", else a detached worktree that is
    removed again afterwards."""
    if not revision:
        yield PROJECT_ROOT
        return
    sha = _git("rev-parse", "--verify", f"{revision}^{{commit}}").strip()
    path = PROJECT_ROOT / "var" / "bench" / "ab" / f"{side}-{sha[:12]}-{os.getpid()}"
    _git("worktree", "add", "--detach", "--force", str(path), sha)
    try:
        yield path
    finally:
        _git("worktree", "remove", "--force", str(path))


def _git(*args: str) -> str:
    git = shutil.which("git") or "git"
    return subprocess.run(  # noqa: S603 - git with fixed arguments
        [git, *args], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True
    ).stdout


@dataclass
class Stack:
    env: dict[str, str]
    database_url: str
    workdir: Path
    descriptor: Path
    redis: redis.Redis
    api_key: str = ""
    access_token: str = ""
    # The events scenario: the last burst's WatchEvents latency percentiles.
    last_watch: dict[str, float] = field(default_factory=dict)
    newcomers: list[int] = field(default_factory=list)
    used: int = 0

    def take(self, count: int) -> list[int]:
        chunk = self.newcomers[self.used : self.used + count]
        if len(chunk) < count:
            raise SystemExit("bench.ab: out of seeded newcomers: fewer --pairs or more --seed-referrals")
        self.used += count
        return chunk

    @contextmanager
    def side(self, side: Side, log_name: str) -> Iterator[tuple[harness.Servers, harness.BenchEnvoy]]:
        """One server process of `side` (run from its checkout) behind its own Envoy."""
        workdir = self.workdir / log_name
        workdir.mkdir(parents=True, exist_ok=True)
        with (workdir / "server.log").open("ab") as log:
            servers = harness.start_servers(self.env, 1, log, cwd=side.root)
            try:
                envoy = harness.BenchEnvoy(
                    harness.bench_envoy_config(servers.addresses, self.descriptor), workdir, 1
                )
                try:
                    envoy.wait_ready()
                    envoy.wait_backends_healthy(1)
                    yield servers, envoy
                finally:
                    envoy.stop()
            finally:
                servers.stop()


def _stack(workdir: Path, referrals: int) -> Stack:
    database_url = harness.recreate_database(name=AB_DATABASE)
    env = harness.production_env(database_url)
    harness.run_migrations(env)
    client = redis.Redis.from_url(harness.BENCH_REDIS_URL, decode_responses=True)
    harness.flush_redis_prefix(client)
    hasher = PasswordHasher(12, env["PASSWORD_PEPPER"], 1)
    seed.seed(database_url, seed.SeedPlan(100_000, 4, (1_000, referrals)), hasher.hash(seed.BENCH_PASSWORD))
    return Stack(env, database_url, workdir, harness.bench_descriptor_set(workdir / "bench.pb"), client)


def _cli(stack: Stack, *args: str) -> str:
    return harness.run_cli(stack.env, *args)


def _prepare_events(stack: Stack) -> None:
    stack.api_key = _cli(stack, "apikey", "create", "--name", "ab", "--scope", "events:write",
                         "--scope", "events:read").splitlines()[-1]  # fmt: skip
    _cli(stack, "program", "set", "--currency", "USD", "--referrer-reward-minor", "500",
         "--referee-reward-minor", "100", "--hold-days", "0", "--attribution-days", "3650")  # fmt: skip
    with psycopg2.connect(stack.database_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT id FROM users WHERE referrer_id IS NOT NULL ORDER BY id")
        stack.newcomers = [row[0] for row in cursor.fetchall()]


def _burst(
    stack: Stack,
    scenario: str,
    servers: harness.Servers,
    envoy: harness.BenchEnvoy,
    label: str,
    seconds: float,
) -> tuple[load.LoadResult, dict[str, float]]:
    """One burst of the scenario; its result and the CPU seconds each part used meanwhile."""
    meter = harness.CpuMeter(stack.database_url, stack.redis, servers.pids, envoy.process.pid)
    if scenario == "events":
        newcomers = stack.take(PER_BURST)

        def body(index: int) -> str:
            return json.dumps({"event_id": f"ab-{label}-{index}", "user_id": str(newcomers[index]),
                               "type": "purchase", "amount_minor": "4900", "currency": "USD"})  # fmt: skip

        # As the bench: every other request the retry of the one before, a WatchEvents stream open.
        rows = [("/events", "", body(n // 2), f"x-api-key={stack.api_key}") for n in range(2 * PER_BURST)]
        lines = load.write_request_lines(stack.workdir / f"{label}.tsv", rows)
        with WatchLatency(servers.addresses[0], stack.api_key) as watch:
            measured = _measured(meter, lambda: _wrk(envoy, "POST", lines, "/events", seconds))
        stack.last_watch = watch.percentiles()
        return measured
    if scenario == "list":
        if not stack.access_token:
            host, port = servers.addresses[0]
            [stack.access_token] = seed.login_all(f"{host}:{port}", [seed.owner_email(1_000)])
        # As the bench: the first page (50 rows) of the owner of 1,000 referrals, over REST.
        script = load.static_script(headers={"authorization": f"Bearer {stack.access_token}"})
        path = "/referral/referrals"
        return _measured(
            meter,
            lambda: load.run_wrk(envoy.url + path, script, connections=16, seconds=seconds, path_prefix=path),
        )
    if scenario == "cold":
        users = stack.take(PER_BURST)
        harness.flush_redis_prefix(stack.redis)
        paths = [rest_lookup_path(seed.lookup_email(user % 100_000)) for user in users]
    else:
        paths = [rest_lookup_path(seed.lookup_email(0))]
    lines = load.write_request_lines(stack.workdir / f"{label}.tsv", ((path, "", "") for path in paths))
    return _measured(meter, lambda: _wrk(envoy, "GET", lines, "/referral/code", seconds))


def _wrk(envoy: harness.BenchEnvoy, method: str, lines: Path, prefix: str, seconds: float) -> load.LoadResult:
    script = load.cycle_script(method, lines, 1)
    return load.run_wrk(envoy.url, script, connections=16, seconds=seconds, path_prefix=prefix)


def _measured(
    meter: harness.CpuMeter, run: Callable[[], load.LoadResult]
) -> tuple[load.LoadResult, dict[str, float]]:
    before = meter.snapshot()
    result = run()
    return result, harness.CpuMeter.used(before, meter.snapshot())


def _cpu_range(side: Side, part: str) -> str:
    values = [burst[part] for burst in side.cpu]
    return f"{min(values):.2f}-{max(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="git revision of side A")
    parser.add_argument("head", nargs="?", default="", help="git revision of side B (default: working tree)")
    parser.add_argument("--scenario", choices=SCENARIOS, default="events")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0, help="one burst (default 4)")
    parser.add_argument("--seed-referrals", type=int, default=100_000, help="newcomers to record events of")
    args = parser.parse_args(argv)
    load.require_tools()
    with checkout(args.base, "A") as base, checkout(args.head, "B") as head:
        sides = [Side("A", args.base, base), Side("B", args.head or "working tree", head)]
        _compare(sides, args)
    return 0


def _compare(sides: list[Side], args: argparse.Namespace) -> None:
    workdir = harness.new_workdir("ab")
    print(f"bench.ab: A = {sides[0].revision} ({sides[0].root}), B = {sides[1].revision} ({sides[1].root})")
    stack = _stack(workdir, args.seed_referrals)
    if args.scenario == "events":
        _prepare_events(stack)
    else:
        stack.newcomers = list(range(100_000))
    for pair in range(args.pairs):
        first, second = (sides[0], sides[1]) if pair % 2 == 0 else (sides[1], sides[0])
        with ExitStack() as running:
            started = {side.name: running.enter_context(stack.side(side, f"p{pair}-{side.name}"))
                       for side in (first, second)}  # fmt: skip
            for side in (first, second):  # warm-up, not measured
                _burst(stack, args.scenario, *started[side.name], f"p{pair}-warm-{side.name}", 2.0)
            for index, side in enumerate((first, second, second, first)):
                label = f"p{pair}-{index}"
                result, used = _burst(stack, args.scenario, *started[side.name], label, args.seconds)
                side.rates.append(result.rps)
                side.cpu.append({part: 1000 * cpu / max(result.requests, 1) for part, cpu in used.items()})
                if stack.last_watch:
                    side.watch.append(stack.last_watch)
                errors = result.transport_errors + result.status_errors
                print(f"pair {pair + 1} {side.name}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.1f} ms, "
                      f"{errors} errors", flush=True)  # fmt: skip
    a, b = sides
    ratios = [rb / ra for ra, rb in zip(a.rates, b.rates, strict=True)]
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
    print(
        f"\nscenario {args.scenario}, {args.pairs} pairs of {args.seconds:g} s bursts, each side twice a pair"
    )
    for side in sides:
        parts = ", ".join(f"{part} {_cpu_range(side, part)}" for part in ("server", "envoy", "postgres"))
        median = statistics.median(side.rates)
        print(f"{side.name} ({side.revision}): median {median:,.0f} req/s; CPU ms/req {parts}")
        if side.watch:
            p50, p99 = (statistics.median(burst[p] for burst in side.watch) for p in ("p50", "p99"))
            print(
                f"  WatchEvents commit-to-delivery, medians of the bursts: p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            )
    print(f"B/A: geo-mean {geo:.3f} (per burst: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    sys.exit(main())

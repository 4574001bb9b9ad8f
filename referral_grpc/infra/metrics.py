"""Prometheus metrics: RPC counts and latency, cache hits, Hunter results, the email outbox."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator

import peewee as pw
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..domain.ports import Clock, EmailVerifier
from .hunter import RESULTS, HunterVerifier
from .outbox import outbox_stats

log = logging.getLogger(__name__)

# Unary RPCs here take from ~0.2 ms (cached lookup) to a few hundred ms (bcrypt): the default
# buckets start at 5 ms and would put every cheap call in one bucket.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CacheCollector(Collector):  # type: ignore[misc]
    """The code cache's own counters, read on each scrape, plus hits / (hits + misses).

    Any cache with a `stats() -> {"hits": n, "misses": n, ...}` method is reported; one without is
    simply absent, so a cache swapped in by tests or a future backend cannot break the scrape.
    """

    def __init__(self, cache: object) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        stats_method = getattr(self._cache, "stats", None)
        if not callable(stats_method):
            return
        stats = stats_method()
        if not isinstance(stats, dict):
            return
        # near_hits: the hits served from this process's near cache (counted in hits too).
        for name in ("hits", "misses", "errors", "bypassed", "near_hits"):
            if isinstance(stats.get(name), int):
                yield CounterMetricFamily(
                    f"referral_cache_{name}", f"Code cache {name} since the process started.", stats[name]
                )
        hits, misses = stats.get("hits", 0), stats.get("misses", 0)
        if hits + misses:
            yield GaugeMetricFamily(
                "referral_cache_hit_ratio",
                "Code cache hits / (hits + misses) since start.",
                hits / (hits + misses),
            )


class HunterCollector(Collector):  # type: ignore[misc]
    """What became of each email verification, by result, and whether Hunter's breaker is open.

    Every result is reported from the start, at 0 too, so a rate alert on any of them has a series.
    """

    def __init__(self, verifier: HunterVerifier) -> None:
        self._verifier = verifier

    def collect(self) -> Iterator[Metric]:
        results = self._verifier.results()
        family = CounterMetricFamily(
            "referral_hunter_verifications",
            "Email verifications since the process started, by result: ok, no_verdict (Hunter has none "
            "yet), timeout, http_401, http_429, 5xx, error, breaker_open (skipped), busy (all slots taken).",
            labels=["result"],
        )
        for result in RESULTS:
            family.add_metric([result], results[result])
        yield family
        yield GaugeMetricFamily(
            "referral_hunter_breaker_open",
            "1 while Hunter's circuit breaker is open (signups proceed unverified).",
            int(self._verifier.breaker.is_open),
        )


class OutboxCollector(Collector):  # type: ignore[misc]
    """Pending emails, the age of the oldest one and the failed ones by kind, queried on each scrape.

    Depth alone cannot tell a busy queue from a stuck one; the oldest pending age (lag) can. Failed
    rows are counted in the database, not in the worker, so every server reports them and they
    survive restarts; a rise is the alert.
    """

    def __init__(self, db: pw.Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        try:
            with self._db.connection_context():
                stats = outbox_stats(self._clock.now())
        except Exception as exc:
            # The scrape still reports everything else; a missing series is the alert.
            log.warning("metrics: could not read the email outbox: %s", type(exc).__name__)
            return
        yield GaugeMetricFamily("referral_email_outbox_pending", "Emails waiting to be sent.", stats.depth)
        yield GaugeMetricFamily(
            "referral_email_outbox_lag_seconds",
            "Age of the oldest email waiting to be sent (0 when none is).",
            stats.lag_seconds,
        )
        failed = GaugeMetricFamily(
            "referral_email_outbox_failed",
            "Emails that failed for good (refused, out of attempts, or expired unsent), by kind.",
            labels=["kind"],
        )
        for kind, count in sorted(stats.failed.items()):
            failed.add_metric([kind], count)
        yield failed


class RpcCollector(Collector):  # type: ignore[misc]
    """RPC counts and latency, observed on the RPC's thread as a deque append (no lock).

    The Prometheus counter and histogram take a lock and look their labels up on every update:
    ~3 us, which on the RPC's own thread cost ~4% of a cached lookup's throughput (A/B, one server,
    direct gRPC). Queued observations are applied in a batch when the metrics are read (a scrape,
    or a test reading the registry) and, so that the queue stays bounded, by the RPC that fills it.
    """

    MAX_QUEUED = 4096

    def __init__(self) -> None:
        self.requests = Counter(
            "referral_rpc_requests",
            "Unary RPCs handled, by full method name and gRPC status code.",
            ["method", "code"],
            registry=None,
        )
        self.latency = Histogram(
            "referral_rpc_duration_seconds",
            "Time spent handling unary RPCs, by full method name.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        # Rare, so counted at once (the counter's own lock), on the thread that learns of it.
        self.abandoned = Counter(
            "referral_rpc_abandoned",
            "Unary RPCs whose caller left (cancelled, or the server's shutdown grace ran out) before"
            " the handler finished, by full method name.",
            ["method"],
            registry=None,
        )
        self._queued: deque[tuple[str, str, float]] = deque()
        self._lock = threading.Lock()

    def abandon(self, method: str) -> None:
        self.abandoned.labels(method).inc()

    def observe(self, method: str, code: str, seconds: float) -> None:
        queued = self._queued
        queued.append((method, code, seconds))
        if len(queued) >= self.MAX_QUEUED:
            self.apply_queued()

    def apply_queued(self) -> None:
        """Apply every queued observation (any thread; one applier at a time)."""
        queued = self._queued
        with self._lock:
            counts: dict[tuple[str, str], int] = {}
            by_method: dict[str, list[float]] = {}
            while queued:
                method, code, seconds = queued.popleft()
                counts[method, code] = counts.get((method, code), 0) + 1
                by_method.setdefault(method, []).append(seconds)
            for (method, code), count in counts.items():
                self.requests.labels(method, code).inc(count)
            for method, durations in by_method.items():
                histogram = self.latency.labels(method)
                for seconds in durations:
                    histogram.observe(seconds)

    def describe(self) -> Iterator[Metric]:
        yield from self.requests.describe()
        yield from self.latency.describe()
        yield from self.abandoned.describe()

    def collect(self) -> Iterator[Metric]:
        self.apply_queued()
        yield from self.requests.collect()
        yield from self.latency.collect()
        yield from self.abandoned.collect()


class Metrics:
    """One registry per server, so several servers in one process (tests) never share counters."""

    def __init__(
        self,
        *,
        cache: object = None,
        verifier: EmailVerifier | None = None,
        db: pw.Database | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc = RpcCollector()
        self.registry.register(self.rpc)
        self.database_up = Gauge(
            "referral_database_up", "1 when the last database health probe succeeded.", registry=self.registry
        )
        if cache is not None:
            self.registry.register(CacheCollector(cache))
        # Without HUNTER_API_KEY nothing is verified, and there is nothing to report.
        if isinstance(verifier, HunterVerifier):
            self.registry.register(HunterCollector(verifier))
        if db is not None and clock is not None:
            self.registry.register(OutboxCollector(db, clock))


class MetricsServer:
    """The /metrics HTTP endpoint on a daemon thread; port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

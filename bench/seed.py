"""Bench data: lookup users with codes, referral owners of 1k and 1M referrals, login users; tokens."""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg2

from referral_grpc.domain.passwords import PasswordHasher
from referral_grpc.domain.tokens import PageTokens
from referral_grpc.gen import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    referral_service_pb2,
    referral_service_pb2_grpc,
)

BENCH_PASSWORD = "bench-password-not-secret"  # noqa: S105 - a password of throwaway bench accounts
# Seeded rows that never log in get this; bcrypt never sees it.
DUMMY_HASH = "$2b$12$bench.dummy.hash.never.checked.by.anything.........."
DOMAIN = "bench.example.com"


def lookup_email(index: int) -> str:
    return f"user{index}@{DOMAIN}"


def login_email(index: int) -> str:
    return f"login{index}@{DOMAIN}"


def owner_email(referrals: int) -> str:
    return f"owner{referrals}@{DOMAIN}"


@dataclass(frozen=True)
class SeedPlan:
    lookup_users: int
    login_users: int
    owners: tuple[int, ...]  # referral counts, one owner each


@dataclass
class Seeded:
    owner_ids: dict[int, int]
    seconds: float


def seed(database_url: str, plan: SeedPlan, real_hash: str) -> Seeded:
    """Fast inserts with generate_series; created_at differs per row so keyset order is total."""
    started = time.monotonic()
    conn = psycopg2.connect(database_url, options="-c timezone=UTC")
    conn.autocommit = False
    owner_ids: dict[int, int] = {}
    with conn, conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO users (email, email_key, password_hash, token_version, created_at, email_status,
                               email_recheck)
            SELECT 'user' || g || '@bench.example.com', 'user' || g || '@bench.example.com', %s, 0,
                   now() - interval '30 days' + g * interval '1 ms', 'unchecked', false
            FROM generate_series(0, %s - 1) g
            """,
            (DUMMY_HASH, plan.lookup_users),
        )
        cur.execute(
            """
            INSERT INTO referral_codes (user_id, code, created_at, expires_at, is_active)
            SELECT id, 'B' || lpad(id::text, 9, '0'), now(), now() + interval '300 days', true
            FROM users WHERE email_key LIKE 'user%%'
            """
        )
        # Verified owners: the bench runs with the production default EMAIL_VERIFICATION=required, which
        # hides an unverified owner's code from the lookup.
        cur.execute("UPDATE users SET email_verified_at = created_at WHERE email_key LIKE 'user%%'")
        cur.execute(
            """
            INSERT INTO users (email, email_key, password_hash, token_version, created_at, email_status,
                               email_recheck)
            SELECT 'login' || g || '@bench.example.com', 'login' || g || '@bench.example.com', %s, 0, now(),
                   'unchecked', false
            FROM generate_series(0, %s - 1) g
            """,
            (real_hash, plan.login_users),
        )
        for count in plan.owners:
            cur.execute(
                """
                INSERT INTO users (email, email_key, password_hash, token_version, created_at, email_status,
                                   email_recheck)
                VALUES (%s, %s, %s, 0, now() - interval '3 years', 'unchecked', false) RETURNING id
                """,
                (owner_email(count), owner_email(count), real_hash),
            )
            owner_id = cur.fetchone()[0]
            owner_ids[count] = owner_id
            cur.execute(
                """
                INSERT INTO users (email, email_key, password_hash, token_version, referrer_id, created_at,
                                   email_status, email_recheck)
                SELECT 'ref' || %s || '-' || g || '@bench.example.com',
                       'ref' || %s || '-' || g || '@bench.example.com',
                       %s, 0, %s, timestamptz '2024-01-01' + g * interval '1 second', 'unchecked', false
                FROM generate_series(1, %s) g
                """,
                (count, count, DUMMY_HASH, owner_id, count),
            )
        # Verified owners and newcomers, so their referrals count for rewards under the production
        # default EMAIL_VERIFICATION=required (the RecordEvent and RedeemRewards rows need credits).
        cur.execute(
            "UPDATE users SET email_verified_at = created_at WHERE id = ANY(%s)", (list(owner_ids.values()),)
        )
        cur.execute(
            "UPDATE users SET email_verified_at = created_at, referral_qualified_at = created_at"
            " WHERE referrer_id IS NOT NULL"
        )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE users")
        cur.execute("VACUUM ANALYZE referral_codes")
        # The bulk load's dirty pages written now, not by the checkpointer and the kernel while the
        # first rows are measured (those rows ran 10-20% below the same scenario later in a run).
        with contextlib.suppress(psycopg2.errors.InsufficientPrivilege):
            cur.execute("CHECKPOINT")
    conn.close()
    os.sync()
    return Seeded(owner_ids=owner_ids, seconds=time.monotonic() - started)


def deep_page_token(database_url: str, jwt_secret: str, owner_id: int, depth: int) -> str:
    """A real page token (the API's PageTokens, the bench's JWT secret) for the page after row `depth`."""
    conn = psycopg2.connect(database_url, options="-c timezone=UTC")
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT created_at, id FROM users WHERE referrer_id = %s ORDER BY created_at DESC, id DESC "
            "OFFSET %s LIMIT 1",
            (owner_id, depth),
        )
        created_at, row_id = cur.fetchone()
    conn.close()
    return PageTokens(jwt_secret).encode(owner_id, created_at, row_id)


def bcrypt_seconds(hasher: PasswordHasher, password_hash: str, repeats: int = 3) -> float:
    """Median time of one bcrypt check at the configured cost, on an otherwise idle machine."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        hasher.verify(BENCH_PASSWORD, password_hash)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def login_all(target: str, emails: list[str], parallel: int = 4) -> list[str]:
    """Access tokens through the real Login RPC (native gRPC through Envoy)."""
    with grpc.insecure_channel(target) as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)

        def login(email: str) -> str:
            reply: Any = stub.Login(
                auth_service_pb2.LoginRequest(email=email, password=BENCH_PASSWORD), timeout=60
            )
            return str(reply.access_token)

        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(login, emails))


def check_page(target: str, token: str, page_token: str) -> tuple[int, bool]:
    """One ListReferrals call: (rows, has next page) - proves a page token is real before the load."""
    with grpc.insecure_channel(target) as channel:
        stub = referral_service_pb2_grpc.ReferralServiceStub(channel)
        reply: Any = stub.ListReferrals(
            referral_service_pb2.ListReferralsRequest(page_token=page_token),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=30,
        )
    return len(reply.referrals), bool(reply.next_page_token)

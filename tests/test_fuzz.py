"""Schemathesis against gateway/openapi.json through a real Envoy in front of a real server on PostgreSQL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import peewee as pw
import pytest
import requests
from playhouse.db_url import connect
from support import TEST_JWT_SECRET
from support.envoy import (
    Envoy,
    create_api_key,
    migrate,
    running_envoy,
    running_server,
    server_env,
    set_program,
)

from referral_grpc.devstack.locations import PROJECT_ROOT

DOCUMENT = PROJECT_ROOT / "gateway" / "openapi.json"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
PASSWORD = "correct horse battery"
SEED = "20261126"
# Per operation and phase: the whole module (server and Envoy start included) takes about 20 s here.
MAX_EXAMPLES = "100"
# Seconds for one schemathesis run; a test makes up to two (the suite's default timeout is 120 s).
SCHEMATHESIS_TIMEOUT = 240
pytestmark = pytest.mark.timeout(2 * SCHEMATHESIS_TIMEOUT + 60)


@pytest.fixture(scope="module")
def env(module_pg_url: str) -> dict[str, str]:
    # Webhook URLs the generator makes up may point at loopback (Envoy itself, this machine's services):
    # such addresses are refused (400), whatever the caller's environment says; and no worker runs here,
    # so the endpoints created are never sent anything.
    values = server_env(
        DATABASE_URL=module_pg_url, JWT_SECRET=TEST_JWT_SECRET, WEBHOOK_ALLOW_PRIVATE_NETWORKS="false"
    )
    migrate(values)
    # The administration operations (BlockUser, AdjustBalance...) are fuzzed with generated user ids,
    # mostly small numbers: the users this run signs in as get ids far above them, so a generated block
    # cannot lock the run out of its own session.
    database = connect(module_pg_url)
    assert isinstance(database, pw.PostgresqlDatabase)
    with database:
        database.execute_sql(f"ALTER SEQUENCE users_id_seq RESTART WITH {FIRST_USER_ID}")
    set_program(values, *PROGRAM_OPTIONS)
    return values


# A program that pays at once, and generously enough that generated redemptions can succeed.
PROGRAM_OPTIONS = ("--currency=USD", f"--referrer-reward-minor={10**12}", "--hold-days=0")
PROGRAM = {
    "currency": "USD",
    "event_types": ["purchase"],
    "attribution_days": 30,
    "referrer_reward_minor": str(10**12),
    "hold_days": 0,
    # Every signup of a run comes from one client address (this machine, through Envoy): the fraud
    # signals that count per address are recorded, not enforced, or the second friend would be rejected.
    "fraud": {"self_referral": "shadow", "velocity": "shadow"},
}
# Not a round number: the coverage phase tries round ones (10^9 among them) as ids.
FIRST_USER_ID = 7_340_519_263


@pytest.fixture(scope="module")
def api_key(env: dict[str, str]) -> str:
    scopes = ("events:write", "rewards:read", "rewards:redeem", "admin:read", "admin:write")
    return create_api_key(env, "fuzz", *scopes, "events:read", "webhooks:manage")


@pytest.fixture(scope="module")
def envoy(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    workdir = tmp_path_factory.mktemp("fuzz-stack")
    with (
        running_server(env, workdir / "server.log") as (_, address),
        running_envoy([address], workdir) as gw,
    ):
        yield gw


@dataclass(frozen=True)
class Known:
    """Real values, so that generated requests also reach the success paths and their response schemas."""

    access_token: str
    api_key: str
    email: str
    user_id: str
    page_token: str
    expires_at: str
    webhook_id: str


def known_values(base: str, api_key: str) -> Known:
    """A user with an active code and two referrals, one of which earned them an available reward; a
    second page of referrals; a valid expiry."""

    def post(path: str, body: dict[str, str], token: str = "", key: str = "") -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers |= {"x-api-key": key} if key else {}
        response = requests.post(base + path, json=body, headers=headers, timeout=15)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    # A run fuzzes UpdateProgram too: the generous program again (a new version), as the module began.
    restored = requests.put(base + "/admin/program", json=PROGRAM, headers={"x-api-key": api_key}, timeout=15)
    assert restored.status_code == 200, restored.text
    email = f"fuzz-{uuid.uuid4().hex[:10]}@example.com"
    tokens = post("/auth/register", {"email": email, "password": PASSWORD})
    in_30_days = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    code = post("/referral/code", {"expires_at": in_30_days.isoformat()}, tokens["access_token"])["code"]
    friends = [f"fuzz-friend-{uuid.uuid4().hex[:10]}@example.com" for _ in range(2)]
    for friend in friends:
        post("/auth/register", {"email": friend, "password": PASSWORD, "referral_code": code})
    # The first friend's: the second came from the owner's own address too (every client here is
    # 127.0.0.1), more than the fraud rules' shared_address_allowance, so that referral was rejected.
    purchase = {"event_id": uuid.uuid4().hex, "email": friends[0], "type": "purchase", "currency": "USD"}
    assert post("/events", purchase, key=api_key)["rewards"]
    page = requests.get(
        base + "/referral/referrals",
        params={"page_size": 1},
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=15,
    ).json()
    assert page["next_page_token"], page
    in_7_days = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    # Not a private address, so the server takes it; no worker runs, so nothing is ever sent to it.
    webhook = post("/webhooks", {"url": "https://hooks.example.com/referrals"}, key=api_key)
    return Known(
        access_token=tokens["access_token"],
        api_key=api_key,
        email=email,
        user_id=tokens["user_id"],
        page_token=page["next_page_token"],
        expires_at=in_7_days.isoformat().replace("+00:00", "Z"),
        webhook_id=webhook["endpoint"]["id"],
    )


@pytest.fixture(scope="module")
def known(envoy: Envoy, api_key: str) -> Known:
    """Once per module: the fraud rules hold (for review) the referrals of an address that registered
    more than registrations_per_address_per_day newcomers, and every client here is 127.0.0.1."""
    return known_values(envoy.url, api_key)


# Every exception below names its operations and says why the check cannot hold there. Statuses other
# than the listed ones still fail the check; not_a_server_error still fails any 5xx.
CONFIG = """
[phases.coverage]
# The methods tried on every path for unsupported_method, less QUERY (an IETF draft): Envoy's HTTP/1
# codec refuses QUERY without a body (400) before any route could answer 405.
unexpected-methods = ["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE"]

# Real values the generator mixes into its own, so that the success paths and their response schemas
# are fuzzed too: an email with an active code, a valid page token, a valid expiry.
[dictionaries]
owner_email = {{ values = [{email}] }}
page_token = {{ values = [{page_token}] }}
expires_at = {{ values = [{expires_at}] }}
user_id = {{ values = [{user_id}] }}
currency = {{ values = ["USD"] }}
webhook_id = {{ values = [{webhook_id}] }}

[[operations]]
include-operation-id = "AuthService_Register"
# 400 for input the schema cannot rule out: a password on the common-password blocklist (NIST
# SP 800-63B), an address email-validator refuses though idn-email allows it (the generator uses
# special-use domains such as .test), a referral code that does not exist.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = ["AuthService_Login", "AuthService_RequestPasswordReset"]
# 400 for an address email-validator refuses though idn-email allows it (special-use domains such as
# .test, which the generator uses).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "ReferralService_GetReferralCodeByEmail"
parameters = {{ "query.email" = {{ dictionary = "owner_email", probability = 0.5 }} }}
# 400 for an address email-validator refuses though idn-email allows it (as above).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "ReferralService_ListReferrals"
parameters = {{ "query.page_token" = {{ dictionary = "page_token", probability = 0.5 }} }}
# A page token is signed by the server: any other value the schema allows is PAGE_TOKEN_INVALID (400).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "ReferralService_CreateReferralCode"
parameters = {{ "body.expires_at" = {{ dictionary = "expires_at", probability = 0.5 }} }}
# The expiry must lie between now and the configured horizon: relative to the clock, not expressible
# in the schema, so most generated date-times are EXPIRY_IN_PAST or EXPIRY_TOO_FAR (400).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = ["AuthService_ChangePassword", "AuthService_DeleteMyAccount"]
# 400 for a wrong current password (WRONG_PASSWORD: the real one cannot be generated, and must not be:
# a change or an erasure would end the session this run uses) and for a new password on the blocklist.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "AuthService_ResetPassword"
# 400 for a reset token that was never issued (RESET_TOKEN_INVALID: real ones only exist in an email)
# and for a new password on the blocklist.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "AuthService_VerifyEmail"
# 400 for a verification token that was never issued (VERIFICATION_TOKEN_INVALID: real ones only exist
# in an email).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "RewardService_RecordEvent"
parameters."body.user_id" = {{ dictionary = "user_id", probability = 0.3 }}
parameters."body.currency" = {{ dictionary = "currency", probability = 0.5 }}
# 400 for rules across fields or beyond the schema: exactly one of user_id and email, refunds_event_id
# only with type "refund", a currency code that is not in ISO 4217, a type outside its character set
# (lower-case letters, digits, _ . -), an amount above 10^15, occurred_at more than 5 minutes ahead.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = ["RewardService_GetBalance", "RewardService_ListLedgerEntries"]
parameters = {{ "query.user_id" = {{ dictionary = "user_id", probability = 0.5 }} }}
# 400 without user_id: it is required with an API key (the credential used here) and refused with a
# user's token, which a schema cannot make depend on the credential; ListLedgerEntries' page token is
# signed by the server (PAGE_TOKEN_INVALID).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "RewardService_RedeemRewards"
parameters."body.user_id" = {{ dictionary = "user_id", probability = 0.5 }}
parameters."body.currency" = {{ dictionary = "currency", probability = 0.5 }}
# 400 for an amount above the available balance (INSUFFICIENT_BALANCE: state, not schema) and for a
# currency code that is not in ISO 4217.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = ["AdminService_GetUser", "AdminService_GetUser_1"]
parameters = {{ "query.email" = {{ dictionary = "owner_email", probability = 0.5 }} }}
# 400 without a user: user_id 0 and no email (FIELD_REQUIRED: "one of the two" is beyond the schema),
# for an email the server cannot parse (no format is documented: empty means none), and for an id beyond
# the largest int64 (the pattern has no upper bound; Envoy cannot transcode it).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}
# A schema-violating query string (an over-long id and email) can pass the gateway's 8 KiB for the URL
# and headers: HEADERS_TOO_LARGE (431, documented) answers before anything else looks at it.
checks.negative_data_rejection.expected-statuses = {rejected_and_431}

[[operations]]
include-operation-id = ["AdminService_BlockUser", "AdminService_UnblockUser"]
# 400 for an id beyond the largest int64 (the pattern has no upper bound; Envoy cannot transcode it).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}
# The note is optional, and ProtoJSON (Envoy's transcoder) reads null as a field's default: a null note
# is no note, a request the schema's types call invalid. Every answer must still match the document.
checks.negative_data_rejection.expected-statuses = {null_is_default}

[[operations]]
include-operation-id = "AdminService_AdjustBalance"
parameters."body.currency" = {{ dictionary = "currency", probability = 0.5 }}
# 400 for an amount beyond 10^15 either way or a currency code that is not in ISO 4217 (AMOUNT_INVALID,
# CURRENCY_INVALID), and a reason of spaces alone (FIELD_REQUIRED).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "AdminService_UpdateProgram"
parameters."body.currency" = {{ dictionary = "currency", probability = 0.5 }}
# 400 for rules across fields or beyond the schema (programs.validate): a fixed reward and basis points
# together, a cap without basis points, upper bounds (10^15, 10000 bps, 3650 days, 1000000), a currency
# not in ISO 4217, event types outside their character set or "refund", no event type, a fraud mode that
# is not reject, review, shadow or off.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}
# ProtoJSON (Envoy's transcoder) reads null as a field's default: a null threshold in the fraud rules is
# stored as 0, a request the schema's types call invalid. Every answer must still match the document.
checks.negative_data_rejection.expected-statuses = {null_is_default}

[[operations]]
include-operation-id = ["AdminService_ListReferralsForReview", "AdminService_ListAuditEvents"]
# 400 for a state that is not review, allow or reject (FIELD_INVALID), and for a page token the server
# did not sign (PAGE_TOKEN_INVALID).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "AdminService_DecideReferral"
# 400 for REVIEW_DECISION_UNSPECIFIED (in the enum, refused as no decision), for a referral that is not
# held for review (REFERRAL_NOT_IN_REVIEW: state, not schema) and for an id beyond the largest int64.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}
# A null note is no note (ProtoJSON), as for BlockUser.
checks.negative_data_rejection.expected-statuses = {null_is_default}

[[operations]]
include-operation-id = "WebhookService_CreateWebhookEndpoint"
# 400 for a URL that is not an absolute http(s) URL or that points at a loopback or private address
# (WEBHOOK_URL_INVALID): a string pattern cannot say that.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "EventService_ListEvents"
# 400 for an after_cursor beyond the largest int64, which the digit pattern of a 64-bit integer allows
# (the gateway's INVALID_QUERY_PARAMETER).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = [
  "WebhookService_GetWebhookEndpoint",
  "WebhookService_DeleteWebhookEndpoint",
  "WebhookService_RotateWebhookSecret",
  "WebhookService_ListWebhookDeliveries",
  "WebhookService_EnableWebhookEndpoint",
]
parameters = {{ "path.id" = {{ dictionary = "webhook_id", probability = 0.5 }} }}
# 400 for an id beyond the largest int64, which the digit pattern of a 64-bit integer allows.
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}

[[operations]]
include-operation-id = "WebhookService_RedeliverEvents"
parameters = {{ "path.id" = {{ dictionary = "webhook_id", probability = 0.5 }} }}
# 400 for an id or after_cursor beyond the largest int64 (as above).
checks.positive_data_acceptance.expected-statuses = {accepted_and_400}
# Event ids are ASCII ("evt_" and hex digits). The server refuses format, private-use and unassigned
# characters in one (400), which the document's pattern cannot list (see protoc-gen-openapi).
generation.codec = "ascii"

[[operations]]
include-operation-id = ["AuthService_RefreshToken", "AuthService_Logout"]
# Tokens are ASCII (URL-safe base64). The server also refuses format, private-use and unassigned
# characters in them (400), which the document's pattern cannot list (see protoc-gen-openapi): ASCII
# strings keep every generated value inside what the pattern really describes.
generation.codec = "ascii"
"""

# positive_data_acceptance's own default, plus 400.
ACCEPTED_AND_400 = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
# negative_data_rejection's own default, plus 431.
REJECTED_AND_431 = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "431", "5xx"]
# ...and plus 2xx, where a null (ProtoJSON's "default") in an optional field is a request the server takes.
# (`enabled = false` cannot switch a check named by --checks off for one operation.)
NULL_IS_DEFAULT = [*REJECTED_AND_431, "2xx"]


def write_config(path: Path, known: Known) -> Path:
    # JSON strings of ASCII text are valid TOML basic strings.
    path.write_text(
        CONFIG.format(
            user_id=json.dumps(known.user_id),
            email=json.dumps(known.email),
            page_token=json.dumps(known.page_token),
            expires_at=json.dumps(known.expires_at),
            webhook_id=json.dumps(known.webhook_id),
            accepted_and_400=json.dumps(ACCEPTED_AND_400),
            rejected_and_431=json.dumps(REJECTED_AND_431),
            null_is_default=json.dumps(NULL_IS_DEFAULT),
        )
    )
    return path


def schemathesis(base: str, config: Path, known: Known, *args: str) -> subprocess.CompletedProcess[str]:
    """Both credentials on every request: a user's token, and a backend's key with every rewards and admin
    scope (operations that take a key judge the call by it; the others ignore it)."""
    return subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(config),
            "run",
            str(DOCUMENT),
            "--url",
            base,
            "--header",
            f"Authorization: Bearer {known.access_token}",
            "--header",
            f"x-api-key: {known.api_key}",
            "--seed",
            SEED,
            "--max-examples",
            MAX_EXAMPLES,
            "--generation-database",
            "none",
            "--workers",
            "1",
            "--no-color",
            *args,
        ],
        cwd=config.parent,
        capture_output=True,
        text=True,
        # A run takes 15 s on a fast machine and over a minute on a slow one (2 cores shared with the
        # server and Envoy); a hung one fails instead of stalling CI.
        timeout=SCHEMATHESIS_TIMEOUT,
        check=False,
    )


# Operations run apart, without two checks that cannot hold for them (schemathesis's `--checks all`
# overrides a check disabled per operation in CONFIG):
# - negative_data_rejection: the gateway reads JSON null as an unset field (ProtoJSON), so
#   `"description": null` or `"event_id": null` is a valid request though the document types the field
#   as a string; where a required field makes the call fail without it (or a 409 follows), the others
#   never meet this, and these two succeed with any optional field unset;
# - ensure_resource_availability: a retry with an Idempotency-Key the generator used before gets the
#   first answer again, an endpoint a later call may have deleted; and RedeliverEvents' 404 for an
#   event_id no event has (EVENT_NOT_FOUND) is taken for the endpoint just created gone missing.
NULL_TAKING_OPERATIONS = ("WebhookService_CreateWebhookEndpoint", "WebhookService_RedeliverEvents")


def test_schemathesis_all_checks_positive_and_negative_data(
    envoy: Envoy, known: Known, tmp_path: Path
) -> None:
    """Every check, valid and invalid data, every phase that applies: no 5xx, no response that breaks the
    document, no 2xx for input the document rules out, no 4xx for input it allows (but the exceptions
    in CONFIG and NULL_TAKING_OPERATIONS)."""
    config = write_config(tmp_path / "schemathesis.toml", known)
    apart = [arg for name in NULL_TAKING_OPERATIONS for arg in ("--include-operation-id", name)]
    runs = [
        schemathesis(
            envoy.url,
            config,
            known,
            "--checks",
            "all",
            "--mode",
            "all",
            *[arg.replace("include", "exclude") for arg in apart],
        ),
        schemathesis(
            envoy.url,
            config,
            known,
            "--checks",
            "all",
            "--exclude-checks",
            "negative_data_rejection,ensure_resource_availability",
            "--mode",
            "all",
            *apart,
        ),
    ]
    tested = 0
    for result in runs:
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        count = re.search(r"Tested: (\d+)\n", result.stdout)
        assert count is not None, result.stdout[-2000:]
        tested += int(count[1])
    operations = sum(len(item) for item in json.loads(DOCUMENT.read_text())["paths"].values())
    assert tested == operations
    summary = re.search(r"(\d+) generated, (\d+) passed", runs[0].stdout)
    assert summary is not None and int(summary[1]) > 1000, runs[0].stdout[-2000:]


def test_undeclared_methods_are_405_with_allow(envoy: Envoy, known: Known, tmp_path: Path) -> None:
    config = write_config(tmp_path / "schemathesis.toml", known)
    result = schemathesis(
        envoy.url,
        config,
        known,
        "--checks",
        "unsupported_method,allow_header_conformance",
        "--phases",
        "coverage",
    )
    assert re.search(r"\d+ generated", result.stdout), result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

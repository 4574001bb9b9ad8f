"""gateway/openapi/protoc-gen-openapi run through protoc: a valid OpenAPI 3.1 document true to the protos."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import google.api
import pytest
from google.api import annotations_pb2
from openapi_spec_validator import validate

from referral_grpc.api import idempotency
from referral_grpc.api.errors import CODES
from referral_grpc.api.policy import SERVICES, Policy, policy_for, public_methods
from referral_grpc.devstack.envoy_config import load_envoy_config, rate_limited_routes
from referral_grpc.domain import errors, events, fraud, programs, rewards, webhooks
from referral_grpc.domain import validation as limits
from referral_grpc.domain.errors import InvalidArgument
from referral_grpc.store import models

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "gateway" / "openapi" / "run-plugin"
COMMITTED = ROOT / "gateway" / "openapi.json"
GOOGLEAPIS = Path(next(iter(google.api.__path__))).parent.parent
PROTOS = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "proto" / "referral" / "v1").glob("*.proto"))


def run_plugin(out: Path, protos: list[str], include: str = "proto", options: str = "") -> dict[str, Any]:
    """protoc (in the project root) with the plugin as the Makefile runs it; returns the document."""
    out.mkdir(parents=True, exist_ok=True)
    opt = [f"--openapi_opt={options}"] if options else []
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{include}",
            f"-I{GOOGLEAPIS}",
            f"--plugin=protoc-gen-openapi={PLUGIN}",
            f"--openapi_out={out}",
            *opt,
            *protos,
        ],
        cwd=ROOT,
        env={**os.environ, "OPENAPI_PLUGIN_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads((out / "openapi.json").read_text())
    return document


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("openapi")
    return run_plugin(out, PROTOS), out / "openapi.json"


@pytest.fixture(scope="module")
def document(generated: tuple[dict[str, Any], Path]) -> dict[str, Any]:
    return generated[0]


def http_rules() -> dict[tuple[str, str], str]:
    """(verb, path) -> full method name, read from the compiled descriptors (independently of the plugin)."""
    rules = {}
    for service in SERVICES:
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            for binding in (rule, *rule.additional_bindings):
                verb = binding.WhichOneof("pattern")
                if verb is None:  # gRPC only (the event stream): no REST route.
                    continue
                rules[(verb, getattr(binding, verb))] = method.full_name
    return rules


def policy_of(full_name: str) -> Policy:
    """The server's policy of a method by full name (pkg.Service.Method)."""
    service, method = full_name.rsplit(".", 1)
    return policy_for(f"/{service}/{method}")


def schema_of(document: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["components"]["schemas"][name]
    return schema


def test_plugin_output_is_valid_openapi_31_and_equals_the_committed_file(
    generated: tuple[dict[str, Any], Path],
) -> None:
    document, path = generated
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert path.read_bytes() == COMMITTED.read_bytes(), "gateway/openapi.json is stale: run make generate"


def test_every_http_rule_is_a_path_with_an_operation_id(document: dict[str, Any]) -> None:
    documented = {(verb, path) for path, item in document["paths"].items() for verb in item}
    rules = http_rules()
    assert documented == set(rules)
    assert len(rules) == 39
    operation_ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(set(operation_ids)) == len(operation_ids)
    assert document["paths"]["/auth/register"]["post"]["operationId"] == "AuthService_Register"
    assert document["paths"]["/referral/referrals"]["get"]["tags"] == ["ReferralService"]


def fields_of(operation: dict[str, Any]) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = operation.get("parameters", [])
    return parameters


def test_get_and_delete_fields_are_query_parameters_with_proto_names(document: dict[str, Any]) -> None:
    by_email = document["paths"]["/referral/code/by-email"]["get"]
    assert fields_of(by_email) == [
        {
            "name": "email",
            "in": "query",
            "schema": {"type": "string", "minLength": 1, "maxLength": 254, "format": "idn-email"},
            "example": "ada@example.com",
            "description": (
                "The email address of the code's owner, in any letter case (at most 254 characters). "
                "For example `ada@example.com`."
            ),
            "required": True,
        }
    ]
    assert "requestBody" not in by_email
    listing = fields_of(document["paths"]["/referral/referrals"]["get"])
    assert [(p["name"], p["in"], p["schema"], p.get("required", False)) for p in listing] == [
        ("page_size", "query", {"type": "integer", "format": "int32", "minimum": 0}, False),
        ("page_token", "query", {"type": "string", "maxLength": 512}, False),
    ]
    delete = document["paths"]["/referral/code"]["delete"]
    assert fields_of(delete) == [] and "requestBody" not in delete


def test_bodies_use_proto_field_names_required_from_field_behavior(document: dict[str, Any]) -> None:
    register = document["paths"]["/auth/register"]["post"]
    assert register["requestBody"] == {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/RegisterRequest"},
                # The required fields only: an example referral code would fail for whoever tries it.
                "example": {"email": "ada@example.com", "password": "correct horse battery staple"},
            }
        },
    }
    request = schema_of(document, "RegisterRequest")
    assert list(request["properties"]) == ["email", "password", "referral_code"]
    assert request["required"] == ["email", "password"]
    assert "validated, normalised" in request["properties"]["email"]["description"]
    assert schema_of(document, "ChangePasswordRequest")["required"] == ["current_password", "new_password"]
    create = schema_of(document, "CreateReferralCodeRequest")
    assert create["properties"]["expires_at"]["type"] == "string"
    assert create["properties"]["expires_at"]["format"] == "date-time"
    assert create["required"] == ["expires_at"]


def test_response_schemas_match_what_envoy_prints(document: dict[str, Any]) -> None:
    ok = document["paths"]["/auth/login"]["post"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AuthTokens"}
    tokens = schema_of(document, "AuthTokens")
    # int64 is a JSON string; OUTPUT_ONLY is readOnly; always_print_primitive_fields prints every field.
    assert tokens["properties"]["user_id"]["type"] == "string"
    assert tokens["properties"]["user_id"]["format"] == "int64"
    assert tokens["properties"]["expires_in"]["type"] == "integer"
    assert all(prop["readOnly"] for prop in tokens["properties"].values())
    assert tokens["required"] == list(tokens["properties"])
    code = schema_of(document, "ReferralCode")
    assert code["properties"]["created_at"] == {
        "type": "string",
        "format": "date-time",
        "examples": ["2026-11-26T12:00:00Z"],
        "description": "The moment the code was created. For example `2026-11-26T12:00:00Z`.",
        "readOnly": True,
    }
    # A message field is only printed when set: not required.
    assert code["required"] == ["code"]
    page = schema_of(document, "ListReferralsResponse")
    assert page["properties"]["referrals"]["type"] == "array"
    assert page["properties"]["referrals"]["items"] == {"$ref": "#/components/schemas/Referral"}
    assert page["required"] == ["referrals", "next_page_token"]
    assert schema_of(document, "LogoutResponse")["properties"] == {}


def test_errors_are_google_rpc_status(document: dict[str, Any]) -> None:
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["responses"]["4XX"] == {"$ref": "#/components/responses/Error"}
            assert operation["responses"]["5XX"] == {"$ref": "#/components/responses/Error"}
    error = document["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Status"}
    status = schema_of(document, "Status")
    assert status["required"] == ["code", "message", "details"]
    assert status["properties"]["details"]["items"] == {"$ref": "#/components/schemas/Any"}
    assert schema_of(document, "Any")["required"] == ["@type"]


def test_bearer_auth_on_every_route_but_the_public_ones(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "AuthTokens.access_token, sent as `Authorization: Bearer <access_token>`.",
    }
    assert {k: v for k, v in schemes["apiKeyAuth"].items() if k != "description"} == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
    }
    # The server's interceptor enforces the policies; the document must say the same: no credentials
    # on public RPCs, an API key with the RPC's scopes where one is taken (or else a user's token where
    # that is allowed too), a user's token everywhere else.
    server_public = {name.strip("/").replace("/", ".") for name in public_methods() if "referral.v1" in name}
    rules = http_rules()
    key_operations = set()
    for path, item in document["paths"].items():
        for verb, operation in item.items():
            method = rules[(verb, path)]
            policy = policy_of(method)
            expected = []
            if policy.takes_api_key:
                key_operations.add(method)
                expected.append({"apiKeyAuth": sorted(policy.api_key_scopes)})
            if method not in server_public and (not policy.takes_api_key or policy.user_token_allowed):
                expected.append({"bearerAuth": []})
            assert operation.get("security") == (expected or None), (verb, path)
    assert len(server_public) == 7
    rest_methods = set(rules.values())
    backend_services = ("RewardService", "AdminService", "EventService", "WebhookService")
    assert key_operations == {method for method in rest_methods if method.split(".")[2] in backend_services}
    assert {
        "referral.v1.RewardService.RecordEvent",
        "referral.v1.AdminService.DecideReferral",
        "referral.v1.EventService.ListEvents",
        "referral.v1.WebhookService.CreateWebhookEndpoint",
    } <= key_operations


def test_idempotency_key_header_where_the_policy_honours_it(document: dict[str, Any]) -> None:
    rules = http_rules()
    for path, item in document["paths"].items():
        for verb, operation in item.items():
            method = rules[(verb, path)]
            policy = policy_of(method)
            headers = [p for p in operation.get("parameters", []) if p["in"] == "header"]
            if not policy.idempotency:
                assert headers == [], (verb, path)
                continue
            [header] = headers
            assert header["name"] == "Idempotency-Key"
            assert header.get("required", False) == (policy.idempotency == "required"), (verb, path)
    required = [
        op["operationId"]
        for item in document["paths"].values()
        for op in item.values()
        if any(p["in"] == "header" and p.get("required") for p in op.get("parameters", []))
    ]
    assert required == ["AdminService_AdjustBalance", "RewardService_RedeemRewards"]


def test_descriptions_come_from_proto_comments(document: dict[str, Any]) -> None:
    login = document["paths"]["/auth/login"]["post"]
    assert login["summary"] == "Login exchanges an email and password for a fresh set of tokens."
    assert "same UNAUTHENTICATED error" in login["description"]
    tags = {tag["name"]: tag["description"] for tag in document["tags"]}
    assert tags["ReferralService"].startswith("ReferralService manages referral codes")


# --- input limits: written once in the proto comments, turned into JSON Schema by the plugin ---------


def request_fields(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The schema of every field a client sends, by "<operationId>.<field>" (parameters and body)."""
    fields = {}
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in fields_of(operation):
                fields[f"{operation['operationId']}.{parameter['name']}"] = parameter["schema"]
            if "requestBody" in operation:
                body = operation["requestBody"]["content"]["application/json"]["schema"]
                fields |= body_fields(document, body, f"{operation['operationId']}.")
    return fields


def body_fields(document: dict[str, Any], body: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    """The fields of a request body, nested messages as `a.b` (UpdateProgram's fraud rules); read-only
    (OUTPUT_ONLY) fields are not inputs, so they are left out."""
    if "$ref" in body:
        body = schema_of(document, body["$ref"].rsplit("/", 1)[1])
    fields = {}
    for name, schema in body["properties"].items():
        if schema.get("readOnly"):
            continue
        if "$ref" in schema:
            fields |= body_fields(document, schema, f"{prefix}{name}.")
        else:
            fields[f"{prefix}{name}"] = schema
    return fields


def test_every_request_string_and_integer_states_its_limits(document: dict[str, Any]) -> None:
    """The convention is the only source of the limits: a field without one in its comment fails here."""
    for name, schema in request_fields(document).items():
        if schema["type"] == "string" and schema.get("format") == "int64":
            # A 64-bit integer travels as a string of digits: its lower bound is a pattern.
            # A signed amount (AdminService.AdjustBalance) says "non-zero" instead.
            patterns = (INT64_0_OR_MORE, INT64_1_OR_MORE, INT64_NON_ZERO)
            assert schema["pattern"] in patterns, f'{name}: say "N or more" or "non-zero"'
        elif schema["type"] == "array":
            assert "maxLength" in schema["items"], f'{name}: say "at most N characters" of each item'
        elif schema["type"] == "string" and schema.get("format") != "date-time" and "enum" not in schema:
            assert "maxLength" in schema, f'{name}: its proto comment must say "at most N characters"'
        if schema["type"] == "integer":
            assert "minimum" in schema, f'{name}: its proto comment must say "N or more"'


NO_NUL = "^[^\\u0000]*$"
INT64_0_OR_MORE = "^[0-9]+$"
INT64_1_OR_MORE = "^[0-9]*[1-9][0-9]*$"
INT64_NON_ZERO = "^-?[0-9]*[1-9][0-9]*$"
# Printable ASCII without surrounding spaces (HTTP drops those from a header value).
PRINTABLE_ASCII = "^[!-~]([ -~]*[!-~])?$"
NO_CONTROL = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
LIMIT_KEYWORDS = {"minLength", "maxLength", "pattern", "format", "minimum", "maximum"}


def test_request_limits_are_the_ones_the_server_enforces(document: dict[str, Any]) -> None:
    email = {"minLength": 1, "maxLength": limits.MAX_EMAIL_LENGTH, "format": "idn-email"}
    password = {"minLength": 1, "maxLength": limits.MAX_PASSWORD_LENGTH, "pattern": NO_NUL}
    new_password = {
        "minLength": limits.MIN_PASSWORD_LENGTH,
        "maxLength": limits.MAX_PASSWORD_LENGTH,
        "pattern": NO_NUL,
    }
    token = {"minLength": 1, "maxLength": limits.MAX_TOKEN_LENGTH, "pattern": NO_CONTROL}
    # Every ISO 4217 code is three letters; the server refuses codes not in its list.
    currency = {"minLength": 1, "maxLength": 3}
    idempotency_key = {"minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH, "pattern": PRINTABLE_ASCII}
    # An administrator's note or reason: free text but NUL (validation.check_no_nul).
    note = {"maxLength": rewards.MAX_NOTE_LENGTH, "pattern": NO_NUL}
    # A path parameter: ids start at 1.
    endpoint_id = {"format": "int64", "pattern": INT64_1_OR_MORE}
    expected = {
        "AuthService_Register.email": email,
        "AuthService_Register.password": new_password,
        "AuthService_Register.referral_code": {
            "maxLength": limits.MAX_CODE_INPUT_LENGTH,
            "pattern": NO_CONTROL,
        },
        "AuthService_Login.email": email,
        "AuthService_Login.password": password,
        "AuthService_RefreshToken.refresh_token": token,
        "AuthService_Logout.refresh_token": token,
        "AuthService_RequestPasswordReset.email": email,
        "AuthService_ResetPassword.token": token,
        "AuthService_ResetPassword.new_password": new_password,
        "AuthService_VerifyEmail.token": token,
        "AuthService_ChangePassword.current_password": password,
        "AuthService_ChangePassword.new_password": new_password,
        "ReferralService_CreateReferralCode.expires_at": {"format": "date-time"},
        "ReferralService_GetReferralCodeByEmail.email": email,
        "ReferralService_ListReferrals.page_size": {"format": "int32", "minimum": 0},
        "ReferralService_ListReferrals.page_token": {"maxLength": limits.MAX_PAGE_TOKEN_LENGTH},
        "RewardService_RecordEvent.event_id": {
            "minLength": 1,
            "maxLength": rewards.MAX_EVENT_ID_LENGTH,
            "pattern": NO_CONTROL,
        },
        "RewardService_RecordEvent.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "RewardService_RecordEvent.email": {"maxLength": limits.MAX_EMAIL_LENGTH, "format": "idn-email"},
        "RewardService_RecordEvent.type": {"minLength": 1, "maxLength": programs.MAX_EVENT_TYPE_LENGTH},
        "RewardService_RecordEvent.amount_minor": {"format": "int64", "pattern": INT64_0_OR_MORE},
        "RewardService_RecordEvent.currency": currency,
        "RewardService_RecordEvent.occurred_at": {"format": "date-time"},
        "RewardService_RecordEvent.refunds_event_id": {"maxLength": rewards.MAX_EVENT_ID_LENGTH},
        "RewardService_GetBalance.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "RewardService_ListLedgerEntries.page_size": {"format": "int32", "minimum": 0},
        "RewardService_ListLedgerEntries.page_token": {"maxLength": limits.MAX_PAGE_TOKEN_LENGTH},
        "RewardService_ListLedgerEntries.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "RewardService_RedeemRewards.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "RewardService_RedeemRewards.amount_minor": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "RewardService_RedeemRewards.currency": currency,
        "AuthService_Register.Idempotency-Key": idempotency_key,
        "ReferralService_CreateReferralCode.Idempotency-Key": idempotency_key,
        "RewardService_RedeemRewards.Idempotency-Key": idempotency_key,
        # AdminService: the API key's scopes are its credential; every field below is checked by the
        # domain (admin.py, rewards.py, programs.py, fraud.py) with these constants.
        "AdminService_GetUser.user_id": {"format": "int64", "pattern": INT64_0_OR_MORE},
        # No format: empty is "none" (the lookup is by id then), which idn-email would refuse.
        "AdminService_GetUser.email": {"maxLength": limits.MAX_EMAIL_LENGTH},
        "AdminService_GetUser_1.user_id": {"format": "int64", "pattern": INT64_0_OR_MORE},
        "AdminService_GetUser_1.email": {"maxLength": limits.MAX_EMAIL_LENGTH},
        "AdminService_BlockUser.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "AdminService_BlockUser.note": note,
        "AdminService_UnblockUser.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "AdminService_UnblockUser.note": note,
        "AdminService_AdjustBalance.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "AdminService_AdjustBalance.amount_minor": {"format": "int64", "pattern": INT64_NON_ZERO},
        "AdminService_AdjustBalance.currency": currency,
        "AdminService_AdjustBalance.reason": {"minLength": 1, **note},
        "AdminService_AdjustBalance.Idempotency-Key": idempotency_key,
        **program_fields(),
        "AdminService_ListReferralsForReview.state": {"maxLength": max(map(len, fraud.DECISIONS))},
        "AdminService_ListReferralsForReview.page_size": {"format": "int32", "minimum": 0},
        "AdminService_ListReferralsForReview.page_token": {"maxLength": limits.MAX_PAGE_TOKEN_LENGTH},
        "AdminService_DecideReferral.user_id": {"format": "int64", "pattern": INT64_1_OR_MORE},
        "AdminService_DecideReferral.decision": {},
        "AdminService_DecideReferral.note": note,
        "AdminService_ListAuditEvents.page_size": {"format": "int32", "minimum": 0},
        "AdminService_ListAuditEvents.page_token": {"maxLength": limits.MAX_PAGE_TOKEN_LENGTH},
        "AdminService_ListAuditEvents.actor": {
            "maxLength": models.AuditEvent.actor.max_length,
            "pattern": NO_NUL,
        },
        "AdminService_ListAuditEvents.target": {
            "maxLength": models.AuditEvent.target.max_length,
            "pattern": NO_NUL,
        },
        # The data rights: the caller's current password, checked like ChangePassword's.
        "AuthService_DeleteMyAccount.current_password": password,
        "EventService_ListEvents.after_cursor": {"format": "int64", "pattern": INT64_0_OR_MORE},
        "EventService_ListEvents.types": {},  # an array: its elements' limits are below
        "EventService_ListEvents.page_size": {
            "format": "int32",
            "minimum": 0,
            "maximum": events.MAX_PAGE_SIZE,
        },
        "WebhookService_CreateWebhookEndpoint.url": {
            "minLength": 1,
            "maxLength": webhooks.MAX_URL_LENGTH,
            "pattern": NO_CONTROL,
        },
        "WebhookService_CreateWebhookEndpoint.event_types": {},
        "WebhookService_CreateWebhookEndpoint.description": {
            "maxLength": webhooks.MAX_DESCRIPTION_LENGTH,
            "pattern": NO_CONTROL,
        },
        "WebhookService_CreateWebhookEndpoint.Idempotency-Key": idempotency_key,
        "WebhookService_GetWebhookEndpoint.id": endpoint_id,
        "WebhookService_DeleteWebhookEndpoint.id": endpoint_id,
        "WebhookService_RotateWebhookSecret.id": endpoint_id,
        "WebhookService_RotateWebhookSecret.Idempotency-Key": idempotency_key,
        "WebhookService_ListWebhookDeliveries.id": endpoint_id,
        "WebhookService_ListWebhookDeliveries.page_size": {
            "format": "int32",
            "minimum": 0,
            "maximum": webhooks.MAX_PAGE_SIZE,
        },
        "WebhookService_RedeliverEvents.id": endpoint_id,
        "WebhookService_RedeliverEvents.after_cursor": {"format": "int64", "pattern": INT64_0_OR_MORE},
        "WebhookService_RedeliverEvents.event_id": {
            "maxLength": events.EVENT_ID_LENGTH,
            "pattern": NO_CONTROL,
        },
        "WebhookService_EnableWebhookEndpoint.id": endpoint_id,
    }
    fields = request_fields(document)
    assert set(fields) == set(expected), "a new request field: add its limits (validation.py) here"
    for name, keywords in expected.items():
        assert {k: v for k, v in fields[name].items() if k in LIMIT_KEYWORDS} == keywords, name
    # Each event type name a request lists: a known name is never longer than the longest one.
    event_type = {"minLength": 1, "maxLength": events.MAX_TYPE_NAME_LENGTH, "pattern": NO_CONTROL}
    for name in ("EventService_ListEvents.types", "WebhookService_CreateWebhookEndpoint.event_types"):
        items = fields[name]["items"]
        assert {k: v for k, v in items.items() if k in LIMIT_KEYWORDS} == event_type, name
        assert items["enum"] == list(events.EVENT_TYPES), name


def program_fields() -> dict[str, dict[str, Any]]:
    """UpdateProgram's body (a Program, its version and created_at output only): programs.validate's and
    fraud.validate_fraud_rules' bounds (a 32-bit integer's upper bound too; a 64-bit one's stays in prose)."""
    prefix = "AdminService_UpdateProgram."
    int64_0 = {"format": "int64", "pattern": INT64_0_OR_MORE}
    expected: dict[str, dict[str, Any]] = {
        "currency": {"minLength": 1, "maxLength": 3},
        "event_types": {},
        "min_amount_minor": int64_0,
        "attribution_days": {"format": "int32", "minimum": 1, "maximum": programs.MAX_DAYS},
        "referrer_reward_minor": int64_0,
        "referrer_reward_bps": {"format": "int32", "minimum": 0, "maximum": programs.MAX_BPS},
        "referrer_reward_cap_minor": int64_0,
        "referee_reward_minor": int64_0,
        "referee_reward_bps": {"format": "int32", "minimum": 0, "maximum": programs.MAX_BPS},
        "referee_reward_cap_minor": int64_0,
        "hold_days": {"format": "int32", "minimum": 0, "maximum": programs.MAX_DAYS},
        "max_rewarded_referrals": {"format": "int32", "minimum": 0},
    }
    for name, default in fraud.FraudRules().as_dict().items():
        if isinstance(default, str):
            expected[f"fraud.{name}"] = {"maxLength": max(map(len, fraud.MODES))}
        else:
            expected[f"fraud.{name}"] = {"format": "int32", "minimum": 0, "maximum": fraud.MAX_THRESHOLD}
    return {prefix + name: keywords for name, keywords in expected.items()}


def test_program_event_types_are_each_an_event_type(document: dict[str, Any]) -> None:
    items = request_fields(document)["AdminService_UpdateProgram.event_types"]["items"]
    assert (items["minLength"], items["maxLength"]) == (1, programs.MAX_EVENT_TYPE_LENGTH)


def test_the_documented_control_characters_are_ones_the_server_refuses() -> None:
    """NO_CONTROL is exactly Unicode's Cc; the server refuses those (and the rest of category C)."""
    for codepoint in range(0x100):
        character = chr(codepoint)
        documented_ok = re.search(NO_CONTROL, f"a{character}b") is not None
        assert documented_ok == (unicodedata.category(character) != "Cc"), hex(codepoint)
        if not documented_ok:
            with pytest.raises(InvalidArgument):
                limits.check_printable(f"a{character}b", "token")
    assert re.search(NO_NUL, "any Unicode \u202e\uffff") and not re.search(NO_NUL, "a\x00b")


CONVENTION = """
syntax = "proto3";
package notes.v1;
import "google/api/annotations.proto";
import "google/api/field_behavior.proto";

service NoteService {
  // CreateNote stores a note.
  rpc CreateNote(CreateNoteRequest) returns (Note) {
    option (google.api.http) = {post: "/v1/{parent=users/*}/notes" body: "*"};
  }
  // ListNotes lists notes.
  rpc ListNotes(ListNotesRequest) returns (Note) {
    option (google.api.http) = {get: "/v1/notes"};
  }
}

message CreateNoteRequest {
  // The owner (at most 40 characters).
  string parent = 1 [(google.api.field_behavior) = REQUIRED];
  // The text: 2 to 500
  // characters, no NUL characters.
  string text = 2 [(google.api.field_behavior) = REQUIRED];
  // Whom to notify, by email address.
  repeated string notify = 3;
  // A label (at most 16 characters, no control characters).
  string label = 4;
  // Free text, no limit stated.
  string extra = 5;
}

message ListNotesRequest {
  // How many notes to return (1 or more).
  int32 page_size = 1;
}

// A note.
message Note {
  // The text (at most 500 characters).
  string text = 1 [(google.api.field_behavior) = OUTPUT_ONLY];
}
"""


def test_limit_phrases_become_schema_keywords_on_a_synthetic_api(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    (protos / "notes" / "v1").mkdir(parents=True)
    (protos / "notes" / "v1" / "notes.proto").write_text(CONVENTION)
    document = run_plugin(tmp_path / "out", ["notes/v1/notes.proto"], include=str(protos))
    validate(document)
    create = document["paths"]["/v1/{parent}/notes"]["post"]
    # A path parameter keeps its limits (a required string is a non-empty one), not its description.
    assert fields_of(create)[0]["schema"] == {"type": "string", "minLength": 1, "maxLength": 40}
    body = create["requestBody"]["content"]["application/json"]["schema"]
    # The path's field may not come again in the body (the transcoder refuses that: MALFORMED_JSON).
    assert body["propertyNames"] == {"minLength": 1, "not": {"enum": ["parent"]}}
    fields = body["properties"]
    assert fields["text"]["minLength"] == 2 and fields["text"]["maxLength"] == 500
    assert fields["text"]["pattern"] == NO_NUL
    assert fields["notify"]["items"] == {"type": "string", "format": "idn-email"}
    assert fields["label"]["pattern"] == NO_CONTROL and fields["label"]["maxLength"] == 16
    assert fields["extra"] == {"type": "string", "description": "Free text, no limit stated."}
    listing = fields_of(document["paths"]["/v1/notes"]["get"])
    assert listing == [
        {
            "name": "page_size",
            "in": "query",
            "schema": {"type": "integer", "format": "int32", "minimum": 1},
            "description": "How many notes to return (1 or more).",
        }
    ]
    # The phrases mean the same in responses; only request objects carry propertyNames.
    note = schema_of(document, "Note")
    assert note["properties"]["text"]["maxLength"] == 500
    assert "propertyNames" not in note


SYNTHETIC = """
syntax = "proto3";
package demo.v2;
import "google/api/annotations.proto";
import "google/api/field_behavior.proto";
import "google/protobuf/duration.proto";

// Shelves hold books.
service ShelfService {
  // GetBook returns one book.
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = {
      get: "/v2/{name=shelves/*/books/*}"
      additional_bindings {get: "/v2/books/{name}"}
    };
  }
  // UpdateBook replaces the book.
  rpc UpdateBook(UpdateBookRequest) returns (Book) {
    option (google.api.http) = {patch: "/v2/{book.name=shelves/*/books/*}" body: "book"};
  }
  // Not exposed over REST.
  rpc Internal(GetBookRequest) returns (Book);
}

enum Genre {
  GENRE_UNSPECIFIED = 0;
  GENRE_POETRY = 1;
}

message Filter {
  string author = 1;
  repeated Genre genres = 2;
}

message GetBookRequest {
  string name = 1 [(google.api.field_behavior) = REQUIRED];
  Filter filter = 2;
  uint64 revision = 3;
}

message UpdateBookRequest {
  Book book = 1 [(google.api.field_behavior) = REQUIRED];
}

// A book.
message Book {
  // The resource name.
  string name = 1 [(google.api.field_behavior) = IDENTIFIER];
  Genre genre = 2;
  map<string, int64> counts = 3;
  google.protobuf.Duration loan = 4;
  bytes cover = 5;
  optional double rating = 6;
  Book sequel = 7;
  string isbn10 = 8 [deprecated = true];
}
"""


def test_generic_mappings_on_a_synthetic_api(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    (protos / "demo" / "v2").mkdir(parents=True)
    (protos / "demo" / "v2" / "shelf.proto").write_text(SYNTHETIC)
    document = run_plugin(
        tmp_path / "out", ["demo/v2/shelf.proto"], include=str(protos), options="title=Demo,version=2.1"
    )
    validate(document)
    assert document["info"]["title"] == "Demo" and document["info"]["version"] == "2.1"
    assert set(document["paths"]) == {"/v2/{name}", "/v2/books/{name}", "/v2/{book.name}"}
    get = document["paths"]["/v2/{name}"]["get"]
    assert get["operationId"] == "ShelfService_GetBook"
    assert document["paths"]["/v2/books/{name}"]["get"]["operationId"] == "ShelfService_GetBook_1"
    params = {(p["name"], p["in"]): p for p in fields_of(get)}
    assert set(params) == {
        ("name", "path"),
        ("filter.author", "query"),
        ("filter.genres", "query"),
        ("revision", "query"),
    }
    assert params[("filter.genres", "query")]["schema"] == {
        "type": "array",
        "items": {"type": "string", "enum": ["GENRE_UNSPECIFIED", "GENRE_POETRY"]},
    }
    assert params[("revision", "query")]["schema"]["type"] == "string"
    update = document["paths"]["/v2/{book.name}"]["patch"]
    assert update["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Book"
    }
    assert [p["name"] for p in fields_of(update)] == ["book.name"]
    book = schema_of(document, "Book")["properties"]
    assert book["counts"]["additionalProperties"]["type"] == "string"
    assert book["loan"]["type"] == "string" and book["loan"]["pattern"].endswith("s$")
    assert book["cover"] == {"type": "string", "contentEncoding": "base64"}
    assert book["sequel"] == {"$ref": "#/components/schemas/Book"}
    assert book["isbn10"] == {"type": "string", "deprecated": True}
    assert [name for name, field in book.items() if field.get("deprecated")] == ["isbn10"]
    # Book is only ever a response of GetBook, but UpdateBook also sends it: nothing is forced required.
    assert "required" not in schema_of(document, "Book")
    assert "securitySchemes" in document["components"]


# --- examples, statuses and reasons, headers, security: what "Try it out" and clients rely on -----------


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    return schema_of(document, schema["$ref"].rsplit("/", 1)[1]) if "$ref" in schema else schema


def test_every_request_and_response_has_an_example_of_its_schema(document: dict[str, Any]) -> None:
    for item in document["paths"].values():
        for operation in item.values():
            name = operation["operationId"]
            if "requestBody" in operation:
                body = operation["requestBody"]["content"]["application/json"]
                schema = resolve(document, body["schema"])
                if schema["properties"]:
                    # Every required field, and nothing the request does not have.
                    assert (
                        set(schema.get("required", [])) <= set(body["example"]) <= set(schema["properties"])
                    ), name
            for parameter in fields_of(operation):
                if parameter.get("required"):
                    assert "example" in parameter, f"{name}.{parameter['name']}"
            ok = operation["responses"]["200"]["content"]["application/json"]
            schema = resolve(document, ok["schema"])
            if schema["properties"]:
                assert set(ok["example"]) == set(schema["properties"]), name


def test_examples_are_plausible_values(document: dict[str, Any]) -> None:
    register = document["paths"]["/auth/register"]["post"]["requestBody"]["content"]["application/json"]
    email, password = register["example"]["email"], register["example"]["password"]
    assert limits.normalize_email(email)[0] == email
    limits.check_password(password, "password")  # long enough, not a common password
    code = document["paths"]["/referral/code"]["post"]["responses"]["200"]["content"]["application/json"]
    assert re.fullmatch(r"[23456789ABCDEFGHJKMNPQRSTUVWXYZ]{10}", code["example"]["code"])
    assert code["example"]["created_at"] < code["example"]["expires_at"]


def test_a_new_codes_expiry_example_is_relative_to_the_moment_of_use(document: dict[str, Any]) -> None:
    """The document is static: the far-future placeholder is marked, and the docs page computes the date."""
    body = document["paths"]["/referral/code"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"] == {"expires_at": "2099-01-01T00:00:00Z"}
    assert body["x-example-days-from-now"] == {"expires_at": 30}
    field = schema_of(document, "CreateReferralCodeRequest")["properties"]["expires_at"]
    assert field["x-example-days-from-now"] == 30
    assert "x-example-days-from-now" in (ROOT / "gateway" / "docs" / "docs.js").read_text()


def reasons_by_status(operation: dict[str, Any]) -> dict[int, list[str]]:
    return {
        int(status): response["x-error-reasons"]
        for status, response in operation["responses"].items()
        if "x-error-reasons" in response
    }


def test_each_operation_lists_its_statuses_with_the_reasons_they_carry(document: dict[str, Any]) -> None:
    register = reasons_by_status(document["paths"]["/auth/register"]["post"])
    # The service's statuses, and the gateway's own answers to a call with a JSON body (GATEWAY_REASONS).
    assert set(register) == {400, 409, 429, 503, 504} | {404, 405, 413, 415, 431, 502}
    assert register[413] == ["PAYLOAD_TOO_LARGE"] and register[415] == ["UNSUPPORTED_MEDIA_TYPE"]
    assert register[431] == ["HEADERS_TOO_LARGE"]
    assert {"MALFORMED_JSON", "QUERY_PARAMETERS_NOT_ALLOWED"} <= set(register[400])
    # Register honours an Idempotency-Key (IDEMPOTENCY_OPTIONAL).
    assert register[409] == ["EMAIL_TAKEN", "IDEMPOTENCY_KEY_REUSED", "IDEMPOTENCY_KEY_IN_USE"]
    assert {"EMAIL_INVALID", "PASSWORD_TOO_COMMON", "REFERRAL_CODE_UNKNOWN", "REFERRAL_CODE_EXPIRED"} <= set(
        register[400]
    )
    assert {"SERVER_OVERLOADED", "RATE_LIMITED"} <= set(register[429])
    login = reasons_by_status(document["paths"]["/auth/login"]["post"])
    assert login[401] == ["INVALID_CREDENTIALS", "ACCOUNT_BLOCKED"] and "TOO_MANY_ATTEMPTS" in login[429]
    lookup = reasons_by_status(document["paths"]["/referral/code/by-email"]["get"])
    assert lookup[404] == ["REFERRAL_CODE_NOT_FOUND", "UNKNOWN_PATH"]
    assert 401 not in lookup  # public
    # No body: nothing too large or of the wrong media type, but its query parameters are checked.
    assert 413 not in lookup and 415 not in lookup and lookup[431] == ["HEADERS_TOO_LARGE"]
    assert "INVALID_QUERY_PARAMETER" in lookup[400] and "MALFORMED_JSON" not in lookup[400]
    listing = reasons_by_status(document["paths"]["/referral/referrals"]["get"])
    assert listing[401] == ["INVALID_TOKEN"] and "USER_NOT_FOUND" in listing[404]
    assert "RATE_LIMITED" not in listing[429]  # authenticated calls are limited per account instead
    for status, response in document["paths"]["/auth/login"]["post"]["responses"].items():
        if "x-error-reasons" in response:
            examples = response["content"]["application/json"]["examples"]
            assert list(examples) == response["x-error-reasons"]
            for reason, example in examples.items():
                info = example["value"]["details"][0]
                assert info == {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": "referral.v1",
                    "metadata": {},
                }
            if status == "429":
                assert "retry-after" in response["headers"]


# Reasons only the operator's `apikey` command prints (no RPC manages API keys), and proof of that: the
# gRPC edge never touches the service that raises them.
COMMAND_LINE_REASONS = {"API_KEY_NAME_TAKEN", "API_KEY_NOT_FOUND", "SCOPE_UNKNOWN"}


def test_api_key_management_is_out_of_reach_of_the_rpcs() -> None:
    for path in (ROOT / "referral_grpc" / "api").rglob("*.py"):
        assert not re.search(r"ApiKeyService|check_scopes|\.revoke\(", path.read_text()), path


def test_every_reason_the_service_sends_is_under_some_operation(document: dict[str, Any]) -> None:
    listed = {
        reason
        for item in document["paths"].values()
        for operation in item.values()
        for reasons in reasons_by_status(operation).values()
        for reason in reasons
    }
    # Only a client that has gone away gets REQUEST_CANCELLED.
    assert set(errors.Reason) - {"REQUEST_CANCELLED"} - COMMAND_LINE_REASONS <= listed
    assert not COMMAND_LINE_REASONS & listed
    assert listed <= set(schema_of(document, "ErrorReason")["enum"]) | {"RATE_LIMITED"}


# The gRPC code of each domain error class (api/errors.py) and the HTTP status Envoy's transcoder gives it.
HTTP_OF_CODE = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def raised_reasons() -> set[tuple[str, str]]:
    """(domain error class, reason) of every `Class("REASON", ...)` and `Class.for_field(..., "REASON")`
    in the runtime code, read from its syntax tree."""
    found = set()
    classes = {cls.__name__ for cls in CODES}
    for path in (ROOT / "referral_grpc").rglob("*.py"):
        if "gen" in path.parts or "devstack" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value if isinstance(func, ast.Attribute) else None
            literals = [
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
            reasons = [value for value in literals if value in set(errors.Reason)]
            if name in classes and reasons[:1]:
                found.add((name, reasons[0]))
            elif name == "for_field" and reasons and isinstance(owner, ast.Name) and owner.id in classes:
                found.add((owner.id, reasons[-1]))
    return found


def test_each_reasons_status_is_the_one_the_server_answers_with(document: dict[str, Any]) -> None:
    status_of: dict[str, set[int]] = {}
    for item in document["paths"].values():
        for operation in item.values():
            for status, reasons in reasons_by_status(operation).items():
                for reason in reasons:
                    status_of.setdefault(reason, set()).add(status)
    raised = raised_reasons()
    assert len(raised) > 20
    by_name = {cls.__name__: code for cls, code in CODES.items()}
    for cls, reason in raised - {(cls, reason) for cls, reason in raised if reason in COMMAND_LINE_REASONS}:
        assert status_of[reason] == {HTTP_OF_CODE[by_name[cls].name]}, (cls, reason)


def test_rate_limit_headers_on_exactly_the_routes_envoy_limits(document: dict[str, Any]) -> None:
    config = load_envoy_config()
    limited = rate_limited_routes(config)
    routes = [
        route
        for host in config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]["route_config"]["virtual_hosts"]
        for route in host["routes"]
        if route.get("name") in limited
    ]

    def is_limited(rpc: str) -> bool:
        path = "/" + rpc.rsplit(".", 1)[0] + "/" + rpc.rsplit(".", 1)[1]
        for route in routes:
            match = route["match"]
            if (
                match.get("path") == path
                or path.startswith(match.get("prefix", "\0"))
                or ("safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path))
            ):
                return True
        return False

    rules = http_rules()
    for (verb, path), rpc in rules.items():
        operation = document["paths"][path][verb]
        headers = operation["responses"]["200"]["headers"]
        assert headers["x-request-id"] == {"$ref": "#/components/headers/RequestId"}
        assert ("x-ratelimit-limit" in headers) == is_limited(rpc), rpc
        assert ("RATE_LIMITED" in reasons_by_status(operation).get(429, [])) == is_limited(rpc), rpc
    assert "x-request-id" in document["info"]["description"]


def test_the_api_key_scheme_is_declared_beside_bearer(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["apiKeyAuth"]["type"] == "apiKey"
    assert schemes["apiKeyAuth"]["in"] == "header" and schemes["apiKeyAuth"]["name"] == "x-api-key"
    assert schemes["bearerAuth"]["scheme"] == "bearer"

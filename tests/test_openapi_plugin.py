"""gateway/openapi/protoc-gen-openapi run through protoc: a valid OpenAPI 3.1 document true to the protos."""

from __future__ import annotations

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
from referral_grpc.api.policy import SERVICES, Policy, policy_for, public_methods
from referral_grpc.domain import programs, rewards
from referral_grpc.domain import validation as limits
from referral_grpc.domain.errors import InvalidArgument

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
            verb = rule.WhichOneof("pattern")
            rules[(verb, getattr(rule, verb))] = method.full_name
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
    assert len(rules) == 18
    operation_ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(set(operation_ids)) == len(operation_ids)
    assert document["paths"]["/auth/register"]["post"]["operationId"] == "AuthService_Register"
    assert document["paths"]["/referral/referrals"]["get"]["tags"] == ["ReferralService"]


def test_get_and_delete_fields_are_query_parameters_with_proto_names(document: dict[str, Any]) -> None:
    by_email = document["paths"]["/referral/code/by-email"]["get"]
    assert by_email["parameters"] == [
        {
            "name": "email",
            "in": "query",
            "schema": {"type": "string", "minLength": 1, "maxLength": 254, "format": "idn-email"},
            "description": (
                "The email address of the code's owner, in any letter case (at most 254 characters)."
            ),
            "required": True,
        }
    ]
    assert "requestBody" not in by_email
    listing = document["paths"]["/referral/referrals"]["get"]["parameters"]
    assert [(p["name"], p["in"], p["schema"], p.get("required", False)) for p in listing] == [
        ("page_size", "query", {"type": "integer", "format": "int32", "minimum": 0}, False),
        ("page_token", "query", {"type": "string", "maxLength": 512}, False),
    ]
    delete = document["paths"]["/referral/code"]["delete"]
    assert "parameters" not in delete and "requestBody" not in delete


def test_bodies_use_proto_field_names_required_from_field_behavior(document: dict[str, Any]) -> None:
    register = document["paths"]["/auth/register"]["post"]
    assert register["requestBody"] == {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RegisterRequest"}}},
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
        "description": "The moment the code was created.",
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
    assert key_operations == {
        "referral.v1.RewardService.RecordEvent",
        "referral.v1.RewardService.GetBalance",
        "referral.v1.RewardService.ListLedgerEntries",
        "referral.v1.RewardService.RedeemRewards",
    }


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
    assert required == ["RewardService_RedeemRewards"]


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
            for parameter in operation.get("parameters", []):
                fields[f"{operation['operationId']}.{parameter['name']}"] = parameter["schema"]
            if "requestBody" in operation:
                body = operation["requestBody"]["content"]["application/json"]["schema"]
                if "$ref" in body:
                    body = schema_of(document, body["$ref"].rsplit("/", 1)[1])
                for name, schema in body["properties"].items():
                    fields[f"{operation['operationId']}.{name}"] = schema
    return fields


def test_every_request_string_and_integer_states_its_limits(document: dict[str, Any]) -> None:
    """The convention is the only source of the limits: a field without one in its comment fails here."""
    for name, schema in request_fields(document).items():
        if schema["type"] == "string" and schema.get("format") == "int64":
            # A 64-bit integer travels as a string of digits: its lower bound is a pattern.
            assert schema["pattern"] in (INT64_0_OR_MORE, INT64_1_OR_MORE), f'{name}: say "N or more"'
        elif schema["type"] == "string" and schema.get("format") != "date-time":
            assert "maxLength" in schema, f'{name}: its proto comment must say "at most N characters"'
        if schema["type"] == "integer":
            assert "minimum" in schema, f'{name}: its proto comment must say "N or more"'


NO_NUL = "^[^\\u0000]*$"
INT64_0_OR_MORE = "^[0-9]+$"
INT64_1_OR_MORE = "^[0-9]*[1-9][0-9]*$"
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
    }
    fields = request_fields(document)
    assert set(fields) == set(expected), "a new request field: add its limits (validation.py) here"
    for name, keywords in expected.items():
        assert {k: v for k, v in fields[name].items() if k in LIMIT_KEYWORDS} == keywords, name


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
    assert create["parameters"][0]["schema"] == {"type": "string", "minLength": 1, "maxLength": 40}
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body["propertyNames"] == {"minLength": 1}
    fields = body["properties"]
    assert fields["text"]["minLength"] == 2 and fields["text"]["maxLength"] == 500
    assert fields["text"]["pattern"] == NO_NUL
    assert fields["notify"]["items"] == {"type": "string", "format": "idn-email"}
    assert fields["label"]["pattern"] == NO_CONTROL and fields["label"]["maxLength"] == 16
    assert fields["extra"] == {"type": "string", "description": "Free text, no limit stated."}
    listing = document["paths"]["/v1/notes"]["get"]["parameters"]
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
    params = {(p["name"], p["in"]): p for p in get["parameters"]}
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
    assert [p["name"] for p in update["parameters"]] == ["book.name"]
    book = schema_of(document, "Book")["properties"]
    assert book["counts"]["additionalProperties"]["type"] == "string"
    assert book["loan"]["type"] == "string" and book["loan"]["pattern"].endswith("s$")
    assert book["cover"] == {"type": "string", "contentEncoding": "base64"}
    assert book["sequel"] == {"$ref": "#/components/schemas/Book"}
    # Book is only ever a response of GetBook, but UpdateBook also sends it: nothing is forced required.
    assert "required" not in schema_of(document, "Book")
    assert "securitySchemes" in document["components"]

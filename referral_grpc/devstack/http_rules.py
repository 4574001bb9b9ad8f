"""REST paths and their HTTP methods, read from the google.api.http rules of a descriptor set."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2


def _bindings(rule: http_pb2.HttpRule) -> Iterator[tuple[str, str]]:
    """(METHOD, path) of a rule and of its additional bindings."""
    pattern = rule.WhichOneof("pattern")
    if pattern == "custom":
        yield rule.custom.kind.upper(), rule.custom.path
    elif pattern is not None:
        yield pattern.upper(), getattr(rule, pattern)
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


def path_regex(path: str) -> str:
    """An anchored regex for a REST path whose `{variable}` segments match any one segment."""
    return "^" + re.sub(r"\\\{[a-z_.]+\\\}", "[^/]+", re.escape(path)) + "$"


def rest_methods(descriptor_set: Path, services: Iterable[str]) -> dict[str, list[str]]:
    """REST path -> its HTTP methods, for the RPCs of `services` (full names, e.g. referral.v1.AuthService).

    Paths and methods keep the order of the protos (services as given, then methods as declared).
    """
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    declared = {f"{file.package}.{service.name}": service for file in files.file for service in file.service}
    methods: dict[str, list[str]] = {}
    for name in services:
        if name not in declared:
            raise ValueError(f"{descriptor_set} declares no service {name}")
        for rpc in declared[name].method:
            for verb, path in _bindings(rpc.options.Extensions[annotations_pb2.http]):
                if "=" in path or "*" in path:
                    # path_regex() turns only single-segment variables such as /v1/{name} into a regex.
                    raise ValueError(
                        f"{name}.{rpc.name}: multi-segment path templates are not supported: {path}"
                    )
                if verb not in methods.setdefault(path, []):
                    methods[path].append(verb)
    return methods

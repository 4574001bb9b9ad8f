"""Envoy configs rendered from gateway/envoy.yaml: addresses, rate limits, 405 routes, the docker variant."""

from __future__ import annotations

import base64
import copy
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..settings import Settings, declared_settings
from .http_rules import path_regex, rest_methods
from .locations import Address, gateway_dir

# Keys of the Envoy config that name files (relative to the project root in gateway/envoy.yaml).
_FILE_KEYS = frozenset({"filename", "proto_descriptor"})
LISTENER = "api"
CLUSTER = "referral_grpc"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
CORS_FILTER = "envoy.filters.http.cors"
# Route family (route name in gateway/envoy.yaml) -> the infix of its RATE_LIMIT_<X>_PER_MINUTE and
# RATE_LIMIT_<X>_BURST settings.
RATE_LIMIT_FAMILIES = {"public-auth": "auth", "password-reset": "reset", "code-lookup": "lookup"}
# The pages Envoy serves (the docs) may run their own inline scripts, named by hash, and the bundled
# assets; nothing from elsewhere, and no framing by another site (clickjacking).
_PAGE_POLICY = (
    "default-src 'self'; script-src 'self'{scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
# The route gateway/envoy.yaml holds as the template of every REST path's 405 route.
METHOD_NOT_ALLOWED = "method-not-allowed"
DOCKER_BACKEND: Address = ("server", 50051)
# Inside the container every interface is the container network's; compose decides what the host sees.
CONTAINER_ANY = "0.0.0.0"  # noqa: S104


def load_envoy_config(source: Path | None = None) -> dict[str, Any]:
    config = yaml.safe_load((source or gateway_dir() / "envoy.yaml").read_text())
    if not isinstance(config, dict):
        raise ValueError("the Envoy config is not a mapping")
    return config


def _socket_address(address: Address) -> dict[str, Any]:
    return {"socket_address": {"address": address[0], "port_value": address[1]}}


def _named(items: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise ValueError(f"the Envoy config has no {kind} named {name!r}")


def _absolute_files(node: Any, root: Path) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _FILE_KEYS and isinstance(value, str) and not Path(value).is_absolute():
                node[key] = str(root / value)
            else:
                _absolute_files(value, root)
    elif isinstance(node, list):
        for item in node:
            _absolute_files(item, root)


@dataclass(frozen=True)
class TokenBucket:
    """A per-client limit of one route family: `burst` requests at once, then `per_fill` more every
    `fill_interval` seconds (Envoy's max_tokens, tokens_per_fill, fill_interval)."""

    burst: int
    per_fill: int
    fill_interval: float

    @classmethod
    def from_envoy(cls, bucket: Mapping[str, Any]) -> TokenBucket:
        interval = str(bucket["fill_interval"])
        if not interval.endswith("s"):
            raise ValueError(f"fill_interval {interval!r} is not in seconds")
        return cls(int(bucket["max_tokens"]), int(bucket.get("tokens_per_fill", 1)), float(interval[:-1]))

    def to_envoy(self) -> dict[str, Any]:
        return {
            "max_tokens": self.burst,
            "tokens_per_fill": self.per_fill,
            "fill_interval": f"{self.fill_interval:g}s",
        }

    @classmethod
    def per_minute(cls, rate: int, burst: int) -> TokenBucket:
        """`rate` requests a minute, one token at a time, after a burst of `burst`."""
        return cls(burst, 1, 60 / rate)

    @property
    def retry_after(self) -> int:
        """Whole seconds until the next token at the latest: what HTTP Retry-After can say."""
        return max(1, math.ceil(self.fill_interval))


def _connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = _named(config["static_resources"]["listeners"], LISTENER, "listener")
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def rate_limited_routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Route name -> its per-client LocalRateLimit config (the dicts inside `config`, not copies)."""
    limited = {}
    for host in _connection_manager(config)["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            limit = route.get("typed_per_filter_config", {}).get(RATE_LIMIT_FILTER)
            if limit is not None:
                limited[route["name"]] = limit
    return limited


def _set_token_bucket(limit: dict[str, Any], bucket: TokenBucket) -> None:
    """One bucket per client address and the same for the (addressless) default; retry-after to match."""
    [descriptor] = limit["descriptors"]
    descriptor["token_bucket"] = bucket.to_envoy()
    limit["token_bucket"] = bucket.to_envoy()
    for header in limit["response_headers_to_add"]:
        if header["header"]["key"] == "retry-after":
            header["header"]["value"] = str(bucket.retry_after)


def token_buckets(settings: Settings) -> dict[str, TokenBucket]:
    """Route family -> its per-client bucket, from the RATE_LIMIT_* settings."""
    return {
        route: TokenBucket.per_minute(
            getattr(settings, f"rate_limit_{infix}_per_minute"),
            getattr(settings, f"rate_limit_{infix}_burst"),
        )
        for route, infix in RATE_LIMIT_FAMILIES.items()
    }


def default_token_buckets() -> dict[str, TokenBucket]:
    """The buckets of the RATE_LIMIT_* defaults (the docker variant has no environment to read)."""
    defaults = {name: setting.default for name, setting in declared_settings()}
    return {
        route: TokenBucket.per_minute(
            defaults[f"rate_limit_{infix}_per_minute"], defaults[f"rate_limit_{infix}_burst"]
        )
        for route, infix in RATE_LIMIT_FAMILIES.items()
    }


def _set_cors_origins(config: dict[str, Any], origins: Sequence[str]) -> None:
    """The virtual host's CORS policy allows exactly `origins` (`*`: any)."""
    for host in _connection_manager(config)["route_config"]["virtual_hosts"]:
        policy = host["typed_per_filter_config"][CORS_FILTER]
        policy["allow_origin_string_match"] = [
            {"safe_regex": {"regex": ".*"}} if origin == "*" else {"exact": origin} for origin in origins
        ]


def page_policy(page: Path) -> str:
    """The Content-Security-Policy of an HTML page: its inline scripts allowed by their SHA-256."""
    scripts = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(page.read_text(encoding="utf-8"))
    )
    return _PAGE_POLICY.format(scripts=scripts)


def _add_page_policies(config: dict[str, Any], root: Path) -> None:
    """Every route serving an .html file gets that page's Content-Security-Policy, unless the route
    declares its own (the account pages' stricter one): a page has exactly one policy."""
    for host in _connection_manager(config)["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            filename = route.get("direct_response", {}).get("body", {}).get("filename", "")
            declared = {h["header"]["key"] for h in route.get("response_headers_to_add", [])}
            if filename.endswith(".html") and "content-security-policy" not in declared:
                header = {"key": "content-security-policy", "value": page_policy(root / filename)}
                # A new list: YAML anchors share one between routes.
                route["response_headers_to_add"] = [
                    *route.get("response_headers_to_add", []),
                    {"header": header, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                ]


def _without_rate_limits(config: dict[str, Any]) -> None:
    manager = _connection_manager(config)
    manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != RATE_LIMIT_FILTER]
    for host in manager["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            per_filter = route.get("typed_per_filter_config", {})
            per_filter.pop(RATE_LIMIT_FILTER, None)
            if "typed_per_filter_config" in route and not per_filter:
                del route["typed_per_filter_config"]


def _method_not_allowed_route(template: dict[str, Any], path: str, methods: Sequence[str]) -> dict[str, Any]:
    """The template for one path: every method but `methods` is answered 405 with them in Allow."""
    route = copy.deepcopy(template)
    route["name"] = f"{METHOD_NOT_ALLOWED} {path}"
    if "{" in path:
        del route["match"]["path"]
        route["match"]["safe_regex"] = {"regex": path_regex(path)}
    else:
        route["match"]["path"] = path
    [method] = route["match"]["headers"]
    method["string_match"]["safe_regex"]["regex"] = f"^({'|'.join(map(re.escape, methods))})$"
    [allow] = route["response_headers_to_add"]
    allow["header"]["value"] = ", ".join(methods)
    return route


def _render_method_not_allowed(config: dict[str, Any], root: Path) -> None:
    """Replace the template route by one route per REST path of the services the transcoder serves."""
    manager = _connection_manager(config)
    transcoder = _named(manager["http_filters"], TRANSCODER_FILTER, "http filter")["typed_config"]
    descriptor = Path(transcoder["proto_descriptor"])
    paths = rest_methods(
        descriptor if descriptor.is_absolute() else root / descriptor, transcoder["services"]
    )
    for host in manager["route_config"]["virtual_hosts"]:
        routes = host["routes"]
        template = _named(routes, METHOD_NOT_ALLOWED, "route")
        at = routes.index(template)
        routes[at : at + 1] = [
            _method_not_allowed_route(template, path, methods) for path, methods in paths.items()
        ]


def render_envoy_config(
    *,
    listen: Address,
    admin: Address,
    backends: Sequence[Address],
    files_root: Path | None = None,
    rate_limits: bool = True,
    token_buckets: Mapping[str, TokenBucket] | None = None,
    cors_origins: Sequence[str] = (),
    descriptors_root: Path | None = None,
) -> dict[str, Any]:
    """gateway/envoy.yaml with other addresses: the listener, the admin, the gRPC backend endpoints.

    Its 405 template route becomes one route per REST path of the descriptor set's google.api.http
    rules, so the paths are written once, in the protos.

    With `files_root`, the files the config names (descriptor, OpenAPI, docs) become absolute paths
    under it, so Envoy can run from any working directory.

    The per-client rate limits of the public routes are the file's unless `rate_limits` is false
    (no local_ratelimit at all: load tests and test clients all come from one loopback address) or
    `token_buckets` replaces some of them by route name (tests use small limits).

    `cors_origins` are the browser origins the CORS policy allows (none by default).

    Every HTML page served gets a Content-Security-Policy that names its inline scripts by hash.

    The descriptor set is read below `descriptors_root` (default: the project root), so a freshly
    generated one can be checked before it replaces the committed file.
    """
    if not backends:
        raise ValueError("at least one backend is needed")
    config = load_envoy_config()
    config["admin"]["address"] = _socket_address(admin)
    resources = config["static_resources"]
    _named(resources["listeners"], LISTENER, "listener")["address"] = _socket_address(listen)
    cluster = _named(resources["clusters"], CLUSTER, "cluster")
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": {"address": _socket_address(backend)}} for backend in backends]}
    ]
    _render_method_not_allowed(config, descriptors_root or gateway_dir().parent)
    _add_page_policies(config, gateway_dir().parent)
    _set_cors_origins(config, cors_origins)
    if token_buckets:
        if not rate_limits:
            raise ValueError("token_buckets given with rate_limits off")
        limited = rate_limited_routes(config)
        unknown = set(token_buckets) - set(limited)
        if unknown:
            raise ValueError(f"no rate-limited route named {sorted(unknown)}; there are {sorted(limited)}")
        for name, bucket in token_buckets.items():
            _set_token_bucket(limited[name], bucket)
    if not rate_limits:
        _without_rate_limits(config)
    if files_root is not None:
        _absolute_files(config, files_root)
    return config


def dump_envoy_config(config: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=110, allow_unicode=True)
    return header + body


def docker_envoy_config(descriptors_root: Path | None = None) -> str:
    """The config docker-compose mounts: every address inside the container network."""
    config = render_envoy_config(
        listen=(CONTAINER_ANY, 8080),
        admin=(CONTAINER_ANY, 9901),
        backends=[DOCKER_BACKEND],
        token_buckets=default_token_buckets(),
        descriptors_root=descriptors_root,
    )
    header = (
        "# GENERATED by `make generate` from gateway/envoy.yaml and gateway/referral.pb\n"
        "# (referral_grpc/devstack/envoy_config.py): do not edit.\n"
        "# docker-compose variant: listener and admin on 0.0.0.0 inside the container (compose publishes\n"
        "# the admin port on the host's loopback only), backend `server:50051` (every replica). Files are\n"
        "# relative to /etc/envoy, the container's working directory. Rate limits are the RATE_LIMIT_*\n"
        "# defaults; no CORS origin is allowed (CORS_ALLOWED_ORIGINS is empty in production).\n"
    )
    return dump_envoy_config(config, header)


def server_addresses(settings: Settings) -> list[Address]:
    """One address per server process of `make run`: consecutive ports from GRPC_PORT (0: each picks a
    free one).

    Each process is its own Envoy endpoint, balanced per request and health-checked on its own. One
    shared SO_REUSEPORT port would balance connections, not requests: Envoy keeps one HTTP/2
    connection per worker thread, so most processes could sit idle.
    """
    port = settings.grpc_port
    return [(settings.grpc_host, port + index if port else 0) for index in range(settings.server_processes)]


def local_envoy_config(settings: Settings, backends: Sequence[Address]) -> dict[str, Any]:
    """`make run`'s config: ENVOY_PORT and ENVOY_ADMIN_PORT on loopback, in front of `backends`, with
    the RATE_LIMITS / RATE_LIMIT_* limits and the CORS_ALLOWED_ORIGINS origins."""
    return render_envoy_config(
        listen=("127.0.0.1", settings.envoy_port),
        admin=("127.0.0.1", settings.envoy_admin_port),
        backends=backends,
        files_root=gateway_dir().parent,
        rate_limits=settings.rate_limits,
        token_buckets=token_buckets(settings) if settings.rate_limits else None,
        cors_origins=settings.cors_origins,
    )

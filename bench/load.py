"""Load generators: wrk (REST, Lua scripts) and h2load (native gRPC, fixed-rate probes), and their results."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

WRK_TIMEOUT = "10s"
_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
    .. '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class LoadResult:
    """What one load generator measured (latencies in milliseconds)."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    transport_errors: int = 0
    status_errors: int = 0
    started: str = ""
    ended: str = ""
    path_prefix: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def envoy_time(moment: datetime | None = None) -> str:
    """A moment in Envoy's %START_TIME% format, so access-log lines can be matched to a scenario."""
    moment = moment or datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def tool(name: str) -> str:
    """The absolute path of a load tool on PATH."""
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed")
    return path


def require_tools() -> None:
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"missing load tools: {', '.join(missing)} "
            "(make bench installs them: apt-get install wrk nghttp2-client)"
        )


def static_script(method: str = "GET", body: str = "", headers: dict[str, str] | None = None) -> str:
    """The same request every time (the URL gives the path): the cheapest wrk script."""
    lines = [f'wrk.method = "{method}"']
    if body:
        lines.append(f"wrk.body = {json.dumps(body)}")
        lines.append('wrk.headers["content-type"] = "application/json"')
    for key, value in (headers or {}).items():
        lines.append(f'wrk.headers["{key}"] = {json.dumps(value)}')
    return "\n".join(lines) + "\n" + _DONE


def write_request_lines(path: Path, rows: Iterable[tuple[str, ...]]) -> Path:
    """One request per line for cycle_script: path, bearer token (or ""), JSON body (or ""), and optionally
    more headers as "name=value;name=value"."""
    with path.open("w") as out:
        for request_path, token, body, *headers in rows:
            out.write(f"{request_path}\t{token}\t{body}\t{''.join(headers)}\n")
    return path


def cycle_script(method: str, lines: Path, threads: int) -> str:
    """Cycles through pre-formatted requests; wrk thread k takes every line i with i % threads == k."""
    return (
        f"""
local method, lines_file, nthreads = "{method}", {json.dumps(str(lines))}, {threads}
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
local reqs, n, i = {{}}, 0, 0
function init(args)
  local k = 0
  for line in io.lines(lines_file) do
    if k % nthreads == tid then
      local path, token, body, more = line:match("^([^\\t]*)\\t([^\\t]*)\\t([^\\t]*)\\t(.*)$")
      local headers = {{}}
      for name, value in more:gmatch("([^=;]+)=([^;]*)") do headers[name] = value end
      if token ~= "" then headers["authorization"] = "Bearer " .. token end
      if body == "" then body = nil else headers["content-type"] = "application/json" end
      n = n + 1
      reqs[n] = wrk.format(method, path, headers, body)
    end
    k = k + 1
  end
end
function request()
  i = i % n + 1
  return reqs[i]
end
"""
        + _DONE
    )


def run_wrk(
    url: str, script: str, *, connections: int, seconds: float, threads: int = 1, path_prefix: str = ""
) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as lua:
        lua.write(script)
        lua.flush()
        started = envoy_time()
        proc = subprocess.run(  # noqa: S603 - wrk from PATH, fixed arguments
            [
                tool("wrk"),
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{max(1, round(seconds))}s",
                "--timeout",
                WRK_TIMEOUT,
                "-s",
                lua.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        ended = envoy_time()
    match = re.search(r"^BENCH (\{.*\})$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    data = json.loads(match.group(1))
    return LoadResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        transport_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        status_errors=data["status"],
        started=started,
        ended=ended,
        path_prefix=path_prefix,
    )


def grpc_frame(message: bytes) -> bytes:
    """The gRPC length-prefixed message: no compression flag, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run_h2load(
    url: str,
    *,
    connections: int,
    seconds: float,
    body: bytes | None = None,
    headers: Sequence[str] = (),
    grpc: bool = True,
    rps_per_connection: float | None = None,
    path_prefix: str = "",
) -> LoadResult:
    """h2load for `seconds`; latencies from its per-request log, since it prints no percentiles itself."""
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        args = [
            tool("h2load"),
            "-t",
            "1",
            "-c",
            str(connections),
            "-m",
            "1",
            "-D",
            str(max(1, round(seconds))),
        ]
        args += ["--log-file", f"{tmp}/requests.log"]
        if body is not None:
            Path(tmp, "body").write_bytes(body)
            args += ["-d", f"{tmp}/body"]
        if grpc:
            args += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        else:
            args += ["--h1"]
        for header in headers:
            args += ["-H", header]
        if rps_per_connection is not None:
            args += ["--rps", str(rps_per_connection)]
        args.append(url)
        started = envoy_time()
        proc = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603
        ended = envoy_time()
        if proc.returncode != 0:
            raise RuntimeError(
                f"h2load failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
            )
        latencies: list[float] = []
        bad_status = 0
        for line in Path(tmp, "requests.log").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                latencies.append(int(parts[2]) / 1000)
                bad_status += parts[1] != "200"
    finished = re.search(r"finished in ([\d.]+)s", proc.stdout)
    counts = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", proc.stdout)
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        seconds=float(finished.group(1)) if finished else seconds,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        transport_errors=sum(int(n) for n in counts.groups()) if counts else 0,
        status_errors=bad_status,
        started=started,
        ended=ended,
        path_prefix=path_prefix,
    )


_ACCESS_LINE = re.compile(r'^\[(\S+)\] "\S+ (\S+) \S+" (\d+) grpc=(\S+) (\S+) ')


def access_log_errors(
    log: Path, results: Sequence[LoadResult], expected: Sequence[int] = ()
) -> list[tuple[int, int]]:
    """(requests, failures) per result from Envoy's access log: HTTP >= 400 or a gRPC status other than OK.

    `expected` gives, per result, an HTTP status that is the right answer there (0: none), e.g. the
    404 of a lookup of an unknown email.

    Native gRPC failures are HTTP 200 with grpc-status in the trailers, which h2load does not read;
    Envoy logs the status of every request, so this counts them for both REST and gRPC.
    """
    counts = [[0, 0] for _ in results]
    expected = list(expected) or [0] * len(results)
    if not log.is_file():
        return [(0, 0) for _ in results]
    with log.open(errors="replace") as lines:
        for line in lines:
            match = _ACCESS_LINE.match(line)
            if match is None:
                continue
            moment, path, status, grpc_status, flags = match.groups()
            if "DC" in flags:
                # The client closed the connection: wrk and h2load do that to requests in flight
                # when their time is up. Not a failure of the service.
                continue
            for index, result in enumerate(results):
                if result.started <= moment <= result.ended and path.startswith(result.path_prefix):
                    counts[index][0] += 1
                    if expected[index] and int(status) == expected[index]:
                        continue
                    failed = int(status) >= 400 or grpc_status not in ("0", "-")
                    counts[index][1] += failed
    return [(total, failed) for total, failed in counts]

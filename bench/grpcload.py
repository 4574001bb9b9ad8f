"""A small grpc.aio load client for requests h2load cannot vary (one body per request); run as a process."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc


def read_bodies(path: Path) -> list[bytes]:
    """Pre-serialised request messages, each as a 4-byte big-endian length and the bytes."""
    data = path.read_bytes()
    bodies, offset = [], 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        bodies.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return bodies


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    with path.open("wb") as out:
        for body in bodies:
            out.write(len(body).to_bytes(4, "big") + body)
    return path


async def _run(
    target: str, method: str, bodies: list[bytes], connections: int, seconds: float
) -> dict[str, object]:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    channels = [
        # A local subchannel pool per channel: one HTTP/2 connection each, like h2load -c N -m 1.
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections)
    ]

    async def worker(index: int, channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(method)  # raw bytes in and out: no client-side protobuf work
        position = index
        while time.monotonic() < deadline:
            body = bodies[position % len(bodies)]
            position += connections
            started = time.perf_counter()
            try:
                await call(body, timeout=10)
                statuses["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                statuses[exc.code().name] += 1
            latencies.append((time.perf_counter() - started) * 1000)

    began = time.monotonic()
    await asyncio.gather(*(worker(i, ch) for i, ch in enumerate(channels)))
    elapsed = time.monotonic() - began
    for channel in channels:
        await channel.close()
    latencies.sort()

    def pct(fraction: float) -> float:
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] if latencies else 0.0

    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": sum(n for status, n in statuses.items() if status != "OK"),
        "statuses": dict(statuses),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpcload")
    parser.add_argument("target")
    parser.add_argument("method")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = asyncio.run(
        _run(args.target, args.method, read_bodies(args.bodies), args.connections, args.seconds)
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of the benchmark: `python -m bench [--smoke] [--seconds S] [--soak S] [--profile]`."""

from __future__ import annotations

import argparse
import sys

from .options import Options
from .run import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--smoke", action="store_true", help="~2 s per scenario, small data; asserts no timing"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each scenario (default 10)")
    parser.add_argument(
        "--soak", type=float, default=30.0, help="mixed load with RSS sampling (full run: 300)"
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--processes", type=int, default=1, help="server processes of the main run")
    parser.add_argument(
        "--no-compare-processes",
        dest="compare_processes",
        action="store_false",
        help="skip the cache-hit rows with the other process count (1 vs 2)",
    )
    parser.add_argument("--bcrypt-rounds", type=int, default=12)
    parser.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="Envoy worker threads (default 1, as `make run`: the 2 cores are better left to the servers; "
        "0 = one per core)",
    )
    parser.add_argument("--log-level", default="info", help="servers' LOG_LEVEL (info: production default)")
    parser.add_argument("--profile", action="store_true", help="py-spy the servers under the cache-hit load")
    parser.add_argument("--big-owner", type=int, default=1_000_000, help="referrals of the big owner")
    parser.add_argument("--lookup-users", type=int, default=100_000)
    parser.add_argument("--login-users", type=int, default=32)
    parser.add_argument(
        "--no-write",
        dest="write_results",
        action="store_false",
        help="print the table but leave bench/RESULTS.md alone",
    )
    args = parser.parse_args(argv)
    options = Options.build(**vars(args))
    return run(options)


if __name__ == "__main__":
    sys.exit(main())

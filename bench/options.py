"""What one benchmark run does: durations, sizes, process counts (`python -m bench` options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    smoke: bool
    seconds: float
    soak: float
    connections: int
    processes: int
    compare_processes: bool
    bcrypt_rounds: int
    envoy_concurrency: int | None
    log_level: str
    profile: bool
    write_results: bool
    big_owner: int
    lookup_users: int
    login_users: int

    @classmethod
    def build(cls, *, smoke: bool, **values: object) -> Options:
        if smoke:
            values.update(seconds=2.0, soak=2.0, profile=False, compare_processes=True)
            values.update(big_owner=20_000, lookup_users=5_000, login_users=4, write_results=False)
        return cls(smoke=smoke, **values)  # type: ignore[arg-type]

"""The README's "Running a referral program" walk, run verbatim with bash through a real Envoy and server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import TEST_JWT_SECRET
from support.envoy import Envoy, migrate, running_envoy, running_server, server_env

from referral_grpc.devstack.locations import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
WALK = re.compile(r"<!-- rewards-walk:begin -->\n```bash\n(.*?)```\n<!-- rewards-walk:end -->", re.DOTALL)
DOCUMENTED_BASE = "API=http://127.0.0.1:8080\n"


def walk_script() -> str:
    match = WALK.search(README.read_text(encoding="utf-8"))
    assert match, "README lost its rewards walk markers"
    script = match.group(1)
    assert script.startswith(DOCUMENTED_BASE)
    return script


def documented_outputs(script: str) -> list[Any]:
    """The outputs the README shows in full: comment lines that are one JSON document each."""
    outputs = []
    for line in script.splitlines():
        if line.startswith("# {") and line.endswith("}"):
            outputs.append(json.loads(line[2:]))
    return outputs


def documents(stdout: str) -> list[Any]:
    decoder = json.JSONDecoder()
    found, index = [], 0
    while index < len(stdout):
        if stdout[index].isspace():
            index += 1
            continue
        value, index = decoder.raw_decode(stdout, index)
        found.append(value)
    return found


@pytest.fixture
def stack(pg_url: str, tmp_path: Path) -> Iterator[tuple[Envoy, dict[str, str]]]:
    env = server_env(
        DATABASE_URL=pg_url, JWT_SECRET=TEST_JWT_SECRET, HUEY_SQLITE_PATH=str(tmp_path / "huey.db")
    )
    migrate(env)
    with (
        running_server(env, tmp_path / "server.log") as (_, address),
        running_envoy([address], tmp_path) as envoy,
    ):
        yield envoy, env


def test_the_readme_walk_runs_as_written(stack: tuple[Envoy, dict[str, str]], tmp_path: Path) -> None:
    envoy, env = stack
    script = walk_script()
    runnable = script.replace(DOCUMENTED_BASE, f"API={envoy.url}\n", 1)
    # `referral-grpc` as installed by `make install`, next to this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", runnable],
        env={**env, "PATH": path},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    program, purchase, retry, alice, bob, refund, alice_after = documents(result.stdout)
    assert program["version"] == 1 and program["referee"] == {
        "fixed_minor": 0,
        "bps": 1000,
        "cap_minor": 2000,
    }
    assert (purchase["referral_state"], purchase["duplicate"], purchase["skipped"]) == (
        "QUALIFIED",
        False,
        [],
    )
    rewards = [(r["kind"], r["amount_minor"]) for r in purchase["rewards"]]
    assert rewards == [("REFERRER_REWARD", "500"), ("REFEREE_REWARD", "490")]
    # Every output the README shows in full is exactly what came out.
    assert [retry, alice, bob, refund, alice_after] == documented_outputs(script)
    print("\n" + result.stdout)

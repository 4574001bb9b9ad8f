"""The README's curl walk-through, run as it stands with bash against a real Envoy and server."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import TEST_JWT_SECRET
from support.envoy import Envoy, migrate, running_envoy, running_server, server_env

README = Path(__file__).resolve().parents[1] / "README.md"


def walkthrough() -> str:
    """The bash block between the README's walkthrough markers, verbatim."""
    text = README.read_text()
    match = re.search(
        r"<!-- walkthrough:start -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", text, flags=re.DOTALL
    )
    assert match, "README.md lost its walkthrough markers"
    return match[1]


@pytest.fixture
def envoy(module_pg_url: str, tmp_path: Path) -> Iterator[Envoy]:
    env = server_env(
        DATABASE_URL=module_pg_url,
        JWT_SECRET=TEST_JWT_SECRET,
        REDIS_URL="",
        HUEY_SQLITE_PATH=str(tmp_path / "huey.db"),
    )
    migrate(env)
    # With the per-client rate limits users get: the walk-through stays within them.
    with (
        running_server(env, tmp_path / "server.log") as (_, backend),
        running_envoy([backend], tmp_path, rate_limits=True) as running,
    ):
        yield running


def test_the_readme_walkthrough_runs_as_written(envoy: Envoy) -> None:
    script = walkthrough()
    assert "--fail-with-body" in script and "CODE=$(" in script
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "API": envoy.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    code = re.search(r"^Alice's code: ([23456789A-Z]{10})$", result.stdout, flags=re.MULTILINE)
    assert code, result.stdout
    # The lookup found the code just created, Bob registered with it, the delete used the new token.
    assert f'{{"code":"{code[1]}","expires_at":' in result.stdout
    assert '"referrals":[{"user_id":' in result.stdout
    assert '"reason":"EMAIL_INVALID"' in result.stdout

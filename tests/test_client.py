"""The typed client distribution: server-free dependencies, the README example type-checks and runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import make_settings
from support.api import Api, bearer, running_api, ts

from referral_grpc.gen import referral_service_pb2 as ref_pb

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "client"
EXAMPLE = re.compile(r"<!-- client-example:start -->\n```python\n(.*?)```\n<!-- client-example:end -->", re.S)


def readme_example() -> str:
    match = EXAMPLE.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert match is not None, "the README lost its client example"
    return match.group(1)


def test_the_client_depends_on_nothing_of_the_server() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {
        re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower()
        for requirement in project["dependencies"]
    }
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}


# As for an installed package, mypy reports nothing inside referral_client itself, only in the caller.
MYPY_CONFIG = "[mypy]\nstrict = True\n\n[mypy-referral_client.*]\nignore_errors = True\n"


def mypy_strict(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    example = tmp_path / "example.py"
    example.write_text(source, encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text(MYPY_CONFIG, encoding="utf-8")
    # Only the client folder on the path: the example cannot lean on the server package.
    env = {**os.environ, "MYPYPATH": str(CLIENT)}
    command = [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(config), str(example)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)


def test_the_readme_example_passes_mypy_strict(tmp_path: Path) -> None:
    result = mypy_strict(tmp_path, readme_example())
    assert result.returncode == 0, result.stdout + result.stderr


def test_results_are_typed_not_any(tmp_path: Path) -> None:
    # A misspelt field of a response must be caught: it would pass if the stubs returned Any.
    broken = readme_example().replace("tokens.access_token", "tokens.acces_token")
    result = mypy_strict(tmp_path, broken)
    assert result.returncode == 1
    assert '"AuthTokens" has no attribute "acces_token"' in result.stdout


@pytest.mark.parametrize("password", ["correct horse battery", "wrong password here"])
def test_the_readme_example_runs_against_a_real_server(
    sqlite_url: str, tmp_path: Path, password: str
) -> None:
    with running_api(make_settings(database_url=sqlite_url)) as api:
        alice = api.register("alice@example.com")
        api.register("bob@example.com", code=_code_of(api, alice.access_token))
        script = tmp_path / "run_example.py"
        script.write_text(
            readme_example()
            + f"\ntarget = '127.0.0.1:{api.server.port}'\n"
            + f"print('\\n'.join(show_referrals(target, 'alice@example.com', {password!r})))\n",
            encoding="utf-8",
        )
        # A clean interpreter with only the client folder importable from this repository.
        env = {**os.environ, "PYTHONPATH": str(CLIENT)}
        result = subprocess.run(
            [
                sys.executable,
                "-I",
                "-c",
                f"import sys; sys.path.insert(0, {str(CLIENT)!r}); exec(open({str(script)!r}).read())",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    if password == "correct horse battery":
        assert re.fullmatch(r"2 bob@example\.com \d{4}-\d{2}-\d{2}\n", result.stdout), result.stdout
    else:
        assert result.stdout == "login failed: UNAUTHENTICATED INVALID_CREDENTIALS None\n"


def _code_of(api: Api, token: str) -> str:
    created = api.referrals.CreateReferralCode(
        ref_pb.CreateReferralCodeRequest(expires_at=ts(datetime.now(UTC) + timedelta(days=30))),
        metadata=bearer(token),
    )
    return str(created.code)

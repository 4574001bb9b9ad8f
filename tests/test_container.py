"""The image's processes from an installed wheel, as an unprivileged uid in a root-owned read-only folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import setuptools
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import PG_SERVER_URL, REDIS_URL, create_pg_database, drop_pg_database, wait_until

ROOT = Path(__file__).resolve().parents[1]
# The image's user (Dockerfile: USER 10001:10001).
UID = 10001
AS_IMAGE_USER = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"


def _readable_dir(prefix: str) -> Path:
    """A root-owned folder the image user may read but not write (mkdtemp makes them 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel built from a copy of the tracked sources, installed into a target folder."""
    if os.geteuid() != 0:
        pytest.fail("this test switches to uid 10001 with setpriv: run it as root (as CI does)")
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        check=True,
        timeout=300,
    )
    [wheel] = dist.glob("referral_grpc-*.whl")
    # A plain Python as in the image (python:3.11-slim) with `pip install` of the wheel and its
    # dependencies, no stack extra. Debian's interpreter: this venv's may live where uid 10001 cannot
    # read (a pyenv under /root).
    target = _readable_dir("referral-wheel-")
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(target)], check=True, timeout=60)
    subprocess.run(
        [*pip, "--python", str(target / "bin" / "python"), "install", str(wheel)], check=True, timeout=600
    )
    try:
        yield target
    finally:
        shutil.rmtree(target)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """The image's /app: root-owned, read-only to the process, and empty."""
    path = _readable_dir("referral-app-")
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)
        shutil.rmtree(path)


@pytest.fixture
def env(installed: Path, workdir: Path) -> Iterator[dict[str, str]]:
    database = create_pg_database(PG_SERVER_URL)
    try:
        yield {
            "PATH": f"{installed / 'bin'}:/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/nonexistent",
            "ENVIRONMENT": "production",
            "DATABASE_URL": database,
            "REDIS_URL": REDIS_URL,
            "REDIS_KEY_PREFIX": f"container-test-{os.getpid()}:",
            "JWT_SECRET": os.urandom(32).hex(),
            "PASSWORD_PEPPER": os.urandom(32).hex(),
            "GRPC_HOST": "127.0.0.1",
            "LOG_FORMAT": "json",
        }
    finally:
        drop_pg_database(database)


def _as_image_user(
    args: list[str], env: dict[str, str], cwd: Path, **kwargs: object
) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [*AS_IMAGE_USER, *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (SigCgt in /proc, a bit mask from signal 1)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_the_package_list_holds_every_package_and_the_migrations() -> None:
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = setuptools.find_packages(str(ROOT), include=["referral_grpc", "referral_grpc.*"])
    assert sorted(listed) == sorted([*found, "referral_grpc.migrations"])


def test_the_wheel_runs_migrate_serve_and_worker_as_the_image_user(
    installed: Path, workdir: Path, env: dict[str, str]
) -> None:
    migrate = _as_image_user(["referral-grpc", "migrate"], env, workdir)
    output, _ = migrate.communicate(timeout=120)
    print(output)
    assert migrate.returncode == 0, output
    assert "001_initial" in output
    # It ran the installed copy, not the checkout's.
    where = _as_image_user(
        ["python", "-c", "import referral_grpc.store.migrate as m; print(m.migrations_dir())"],
        env,
        workdir,
    )
    site_packages = installed / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    assert where.communicate(timeout=60)[0].strip() == str(site_packages / "referral_grpc" / "migrations")

    port = _free_port()
    server = _as_image_user(["referral-grpc", "serve"], {**env, "GRPC_PORT": str(port)}, workdir)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    print(output)
    assert server.returncode == 0, output

    worker = _as_image_user(["referral-grpc", "worker"], env, workdir)
    # Huey installs its SIGTERM handler after it logs its start: wait for the handler itself.
    wait_until(lambda: _catches(worker.pid, signal.SIGTERM) or worker.poll() is not None, 60, "the worker")
    assert worker.poll() is None
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    print(output)
    assert worker.returncode == 0, output
    assert "Worker started" in output
    assert "Worker stopped" in output
    assert list(workdir.iterdir()) == []

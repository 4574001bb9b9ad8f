"""Child processes with prefixed output and a ready line, and `python -m referral_grpc serve` as one."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO

from .locations import Address

log = logging.getLogger(__name__)

SERVER_READY = re.compile(r"serving gRPC on (\S+):(\d+)")
START_TIMEOUT = 30.0


class StackError(RuntimeError):
    """A process of the stack failed to start or died."""


class Child:
    """A child process whose output is echoed line by line with a name prefix, like compose does."""

    _echo_lock = threading.Lock()

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        output: IO[str] | None = None,
        ready: re.Pattern[str] | None = None,
    ) -> None:
        self.name = name
        self._output = output if output is not None else sys.stdout
        self._ready_pattern = ready
        self._ready = threading.Event()
        self.ready_match: re.Match[str] | None = None
        # Its own process group: Ctrl-C reaches only us, and we stop the children in order.
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and Envoy, fixed arguments
            list(args),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            process_group=0,
        )
        self._reader = threading.Thread(target=self._pump, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._echo_lock:
                self._output.write(f"{self.name:<9}| {line}")
                self._output.flush()
            if self._ready_pattern is not None and not self._ready.is_set():
                match = self._ready_pattern.search(line)
                if match:
                    self.ready_match = match
                    self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait for the ready line; fail if the process exits or stays silent too long."""
        if not self._ready.wait(timeout):
            raise StackError(f"{self.name} printed no ready line within {timeout:.0f} s")
        if self.ready_match is None:
            self.process.wait()
            raise StackError(f"{self.name} exited with code {self.process.returncode} before it was ready")
        return self.ready_match

    def poll(self) -> int | None:
        return self.process.poll()

    def send(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit; SIGKILL after `timeout`. Returns the exit code."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=2)
        if self.process.stdout is not None and not self._reader.is_alive():
            self.process.stdout.close()
        return self.process.returncode

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.send(signum)
        return self.wait(timeout)


def python_child(
    name: str,
    command: str,
    env: Mapping[str, str],
    *,
    output: IO[str] | None = None,
    ready: re.Pattern[str] | None = None,
) -> Child:
    """`python -m referral_grpc <command>` (serve, worker, migrate) with this interpreter."""
    return Child(name, [sys.executable, "-m", "referral_grpc", command], env=env, output=output, ready=ready)


def start_server(
    env: Mapping[str, str],
    *,
    name: str = "server",
    output: IO[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> tuple[Child, Address]:
    """`python -m referral_grpc serve` with `env`; returns once it serves, with the address it bound."""
    child = python_child(name, "serve", env, output=output, ready=SERVER_READY)
    try:
        match = child.wait_ready(timeout)
    except StackError:
        child.stop(signal.SIGKILL, timeout=5)
        raise
    return child, (match.group(1), int(match.group(2)))

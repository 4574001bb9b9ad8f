"""py-spy record on the server processes during a load, summarised as the top frames."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from .load import LoadResult

SAMPLE_RATE = 97
_LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """py-spy from PATH or next to this interpreter (the venv's bin/, where the dev extra installs it)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


def _record(pid: int, seconds: int, output: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - py-spy from PATH, fixed arguments
        [
            py_spy() or "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(SAMPLE_RATE),
            "--format",
            "raw",
            "--output",
            str(output),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def top_frames(collapsed: Sequence[Path], limit: int = 18) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, self samples per frame, inclusive samples per frame) over py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in collapsed:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")[1:]]  # [0] is the thread
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    return total, own, inclusive


def profile_servers(pids: Sequence[int], workdir: Path, run_load: Callable[[], LoadResult]) -> str:
    """Profile every server process while `run_load` runs; return a text summary of the top frames."""
    if py_spy() is None:
        return "py-spy is not installed (pip install -e '.[dev]'): no profile"
    result: dict[str, LoadResult] = {}
    thread = threading.Thread(target=lambda: result.__setitem__("load", run_load()), daemon=True)
    thread.start()
    outputs = [workdir / f"profile-{pid}.txt" for pid in pids]
    recorders = [_record(pid, 8, output) for pid, output in zip(pids, outputs, strict=True)]
    for recorder in recorders:
        recorder.wait()
    thread.join()
    total, own, inclusive = top_frames(outputs)
    if not total:
        return "py-spy recorded no samples (ptrace not permitted?)"
    lines = [f"py-spy, {total} samples of non-idle Python threads in {len(pids)} server process(es):", ""]
    lines.append("| self % | frame |")
    lines.append("|---:|---|")
    lines += [f"| {100 * n / total:.1f} | `{frame}` |" for frame, n in own.most_common(15)]
    lines += ["", "| inclusive % | frame |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{frame}` |" for frame, n in inclusive.most_common(25)]
    return "\n".join(lines)

"""Where the broker's time goes: py-spy, recorded from outside the process.

``Recording(pid, path)`` starts ``py-spy record --nonblocking`` (sampling the
Python stacks without pausing the broker, so it barely slows it) and
``stop()`` ends it and sums the samples: each function's share of the
samples as the innermost frame ("self") and anywhere on the stack
("total"). py-spy sees the Python thread only; libzmq's I/O thread shows in
the per-thread CPU of each step instead. Without py-spy installed
(``pip install py-spy``) the recording says so and yields nothing.

Defines: ``Recording``, ``summarize``, ``render``.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Recording", "render", "summarize"]

TOP = 12
_LOCATION = re.compile(r" \(([^():]*?)(?::\d+)?\)$")


class Recording:
    """A py-spy recording of one process, into a raw (collapsed stacks) file."""

    def __init__(self, pid: int, path: Path, rate: int = 200) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("py-spy")
        if exe is None:
            self.status = "py-spy not installed (pip install py-spy): no profile"
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(path),
             "--rate", str(rate), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.status = f"py-spy recording pid {pid} into {path}"

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {"error": self.status}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.path.exists():
            return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
        return {"file": str(self.path), **summarize(self.path.read_text())}


def _frame(raw: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``."""
    match = _LOCATION.search(raw)
    if not match:
        return raw
    return raw[:match.start()] + f" ({Path(match.group(1)).name})"


def summarize(raw: str, top: int = TOP) -> dict[str, Any]:
    """Self and total shares of the functions in py-spy's raw output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for name in set(frames):
            total[name] += n
    if not samples:
        return {"samples": 0, "self": [], "total": []}
    # Frames on every stack (runpy, main, the loop) say nothing.
    telling = [(f, n) for f, n in total.most_common() if n < 0.97 * samples]
    return {
        "samples": samples,
        "self": [[f, round(n / samples * 100, 1)] for f, n in own.most_common(top)],
        "total": [[f, round(n / samples * 100, 1)] for f, n in telling[:top]],
    }


def render(profile: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    if profile.get("error"):
        return f"  profile: {profile['error']}"
    lines = [f"  profile ({profile['samples']} samples of the Python thread, {profile['file']}):",
             "    self%  total%  function"]
    totals = dict((f, p) for f, p in profile["total"])
    for name, pct in profile["self"][:TOP]:
        lines.append(f"    {pct:5.1f}  {totals.get(name, pct):6.1f}  {name}")
    return "\n".join(lines)

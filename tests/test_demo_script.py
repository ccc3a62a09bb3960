"""demo.sh runs the checkout it is in, and nothing else (``demo.sh --check``).

A copy of this checkout and "another zchat 0.1.0" installed in a second
Python (a real, working install of the same version, as another checkout's
`pip install .` leaves it) stand for the machine of issue 10, where the demo
silently ran the other one. ``--check`` does everything the demo does before
it starts the broker: choose the Python, make ``.venv`` if needed, verify
where every zchat module comes from; then it says what it would run. The
chat itself is tested in a real terminal by test_client_tmux.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import msgpack
import prompt_toolkit
import pytest
import wcwidth
import zmq

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "build", "dist",
    "wheelhouse", "bench-results",
)

pytestmark = pytest.mark.slow


def install_other_zchat(prefix: Path) -> tuple[Path, Path]:
    """A Python with another copy of zchat 0.1.0 installed (not editable).

    Returns:
        that python, and the site-packages folder the other zchat is in.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", prefix], check=True,
                   timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix),
                                                    "platbase": str(prefix)}))
    assert site.is_dir(), site
    package = site / "zchat"
    shutil.copytree(ROOT / "zchat", package, ignore=NOT_SOURCE)
    shutil.copytree(ROOT / "broker", package / "broker", ignore=NOT_SOURCE)
    shutil.copytree(ROOT / "clients", package / "clients", ignore=NOT_SOURCE)
    dist = site / "zchat-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zchat\nVersion: 0.1.0\n")
    files = [*package.rglob("*"), dist / "METADATA", dist / "RECORD"]
    (dist / "RECORD").write_text("".join(f"{path.relative_to(site)},,\n" for path in files
                                         if not path.is_dir()))
    # Its dependencies from the test's own environment, as plain path entries
    # (a .pth line that is a folder does not run that folder's .pth files, so
    # this checkout's editable finder does not come along).
    deps = {str(Path(module.__file__ or "").resolve().parent.parent)
            for module in (zmq, msgpack, prompt_toolkit, wcwidth)}
    (site / "zchat_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return prefix / "bin" / "python", site


def demo_check(checkout: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(checkout / "demo.sh"), "--check"], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)


def test_demo_runs_this_checkout_even_where_another_zchat_is_installed(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=NOT_SOURCE, symlinks=True)
    other, other_site = install_other_zchat(tmp_path / "other")
    found = subprocess.run(
        [other, "-I", "-c", "import importlib.metadata as m, zchat.clients.terminal as t;"
                            "print(m.version('zchat'), t.__file__)"],
        capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert found[0] == "0.1.0" and Path(found[1]).is_relative_to(tmp_path / "other"), found

    # PYTHON names the Python with the other zchat: the demo makes its own
    # .venv from it, with this checkout in it, and runs that.
    env = {**os.environ, "PYTHON": str(other)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = demo_check(checkout, elsewhere, env)
    assert first.returncode == 0, first.stdout + first.stderr
    venv_python = checkout / ".venv" / "bin" / "python"
    lines = first.stdout.splitlines()
    assert f"demo: zchat from {checkout}/zchat (python {venv_python})" in lines, first.stdout
    # The hint for another terminal is absolute: it works from any folder.
    hint = f"demo: from another terminal: {checkout}/.venv/bin/zchat-client --name bob"
    assert hint in lines, first.stdout

    # No PYTHON, and python3 on PATH is the one with the other zchat: the
    # demo's .venv as it is, not installed again; nor does a PYTHONPATH that
    # names the other zchat get in the way.
    env = {**os.environ, "PATH": f"{other.parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(other_site)}
    env.pop("PYTHON", None)
    again = demo_check(checkout, elsewhere, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.splitlines() == lines[-2:]

    # The client that the hint names runs this checkout's code too.
    client = subprocess.run(
        [venv_python, "-c", "import zchat.clients.terminal as t; print(t.__file__)"],
        cwd=tmp_path / "other", capture_output=True, text=True, check=True, timeout=60)
    assert Path(client.stdout.strip()) == checkout / "clients" / "terminal.py"

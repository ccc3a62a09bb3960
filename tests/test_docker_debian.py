"""The README's two quick-start commands on Debian's own python3 (issue 10).

In a container from a Debian image made with mmdebstrap, as a fresh machine
has it (Debian's python3, PEP 668's EXTERNALLY-MANAGED, pip, but no ensurepip
and no tmux), ``.ci/run`` runs a few real tests and ``./demo.sh --check``
runs the demo. It is a file apart from test_docker.py so that another xdist
worker runs it while that one builds the project's image and runs the demos
(this test needs neither): the engine, its fixture and the helpers are
test_docker.py's, which several processes can share (see its ENGINE_LOCK).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from test_docker import (
    DOCKER_MARKS,
    ROOT,
    Engine,
    build_wheelhouse,
    debootstrap_image,
    engine,  # noqa: F401 - the fixture, shared with test_docker.py
    ensure_image,
    run,
)

pytestmark = DOCKER_MARKS

DEBIAN_IMAGE = "zchat-test-debian:bookworm"  # kept as a cache, like python:3.11-slim


def build_debian_image() -> None:
    """Debian as a fresh machine has it, for the README's commands (issue 10).

    Debian's own python3, EXTERNALLY-MANAGED (PEP 668) and pip as many have
    it, but no ensurepip (python3.11-venv) and no tmux: ``.ci/run`` installs
    those with apt. Their packages wait in apt's cache, with the package
    lists, so that the install works in a container with no network.
    """
    debootstrap_image(
        DEBIAN_IMAGE, "python3,python3-pip",
        "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb",
        "--customize-hook=chroot \"$1\" apt-get install --download-only -y -qq "
        "--no-install-recommends tmux python3.11-venv",
        "--skip=cleanup/apt",
    )


# .ci/run gets a few real tests to run (tmux for the demo script, broker and
# admin subprocesses, the pure protocol tests); the whole suite runs on the
# host. PIP_NO_INDEX/PIP_FIND_LINKS (pip's own variables) point the pip
# inside at a wheelhouse: the container has no network.
FRESH_MACHINE = r"""
set -eu
test -f /usr/lib/python3.11/EXTERNALLY-MANAGED
if python3 -c 'import ensurepip' 2>/dev/null; then echo "ensurepip is there already"; exit 1; fi
mkdir /src
tar -C /checkout --exclude=.git --exclude='.venv*' --exclude=__pycache__ --exclude=wheelhouse \
    --exclude='.*_cache' --exclude=.hypothesis --exclude='*.egg-info' -cf - . | tar -C /src -xf -
cd /src
if python3 -m pip install -e '.[test]' >/tmp/pip.log 2>&1; then
    echo "pip installed outside a venv"; exit 1
fi
grep -q externally-managed-environment /tmp/pip.log && echo "system pip refused: PEP 668"
export ZCHAT_SKIP_DOCKER=1 ZCHAT_SKIP_BROWSER=1
bash .ci/run -q -p no:cacheprovider tests/test_protocol.py \
    tests/test_admin.py::test_stats_and_who tests/test_admin.py::test_kick \
    tests/test_client_tmux.py::test_demo_script_runs_a_room_and_stops_what_it_started
./demo.sh --check
"""


def test_readme_commands_work_with_debians_own_python(engine: Engine,  # noqa: F811
                                                      tmp_path: Path) -> None:
    ensure_image(DEBIAN_IMAGE, build_debian_image)
    wheelhouse = build_wheelhouse(tmp_path / "wheelhouse", ".[test]")
    start = time.monotonic()
    result = run(
        "docker", "run", "--rm", "--network", "none",
        "-v", f"{ROOT}:/checkout:ro", "-v", f"{wheelhouse}:/wheelhouse:ro",
        "-e", "PIP_NO_INDEX=1", "-e", "PIP_FIND_LINKS=/wheelhouse",
        DEBIAN_IMAGE, "bash", "-c", FRESH_MACHINE, timeout=600, check=False,
    )
    seconds = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "system pip refused: PEP 668" in out
    # .ci/run found no venv module (no ensurepip) nor tmux, and installed them with apt.
    assert "ci: apt-get install tmux python3.11-venv" in out, out[-6000:]
    assert re.search(r"^\d+ passed in ", out, re.MULTILINE), out[-6000:]
    # README's first command: demo.sh made its own .venv from Debian's python3.
    assert "demo: zchat from /src/zchat (python /src/.venv/bin/python)" in out, out[-3000:]
    print(f"\nREADME commands on Debian's python3 in a container: {seconds:.0f}s")

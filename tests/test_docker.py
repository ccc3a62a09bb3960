"""The docker-compose demo, built and run for real (see ../shared/DOCKER.md).

The Dockerfile and docker-compose.yml stay exactly what a user with Docker
Hub and PyPI runs; only this test adds the offline pieces:

1. An engine: a running one (``docker info`` answers) is reused; otherwise
   Debian's ``dockerd`` is started here (overlay2 storage where the kernel
   has overlayfs, else vfs; no iptables, no default bridge) and stopped by
   the last test process to use it. Missing tools are installed with apt.
2. ``python:3.11-slim``: if the engine lacks it (no registry is reachable),
   an equivalent is built with mmdebstrap from Debian packages and imported
   under that tag, then kept as a cache for the next run.
3. A wheelhouse built on the host (``pip wheel``) in the build context, used
   through the Dockerfile's ``PIP_NO_INDEX``/``PIP_FIND_LINKS`` build args,
   which users never set.

Compose is v2 (``docker compose``) where that plugin is there, else v1's
``docker-compose`` (1.28 or later: the file uses ``profiles``), installed
with apt when missing; the demo and the README are for both.

test_docker_debian.py runs the README's two quick-start commands
(``.ci/run`` on a few tests, ``./demo.sh --check``) in a container from a
Debian image with Debian's own python3, PEP 668 and all, as a fresh machine
has it. It is a file of its own so that another xdist worker runs it while
this one builds the image and runs the demos; both use the engine fixture
here, which several processes can share (see ENGINE_LOCK).

Each run uses its own compose project, image tag, free loopback ports and a
private subnet that no host route or docker network uses, so it neither
collides with another run nor reaches any address outside the network it
created (the host side joins through the ports published on 127.0.0.1).
``down -v --remove-orphans`` always runs, and the test checks
that no container or network of the project is left.

Where no engine can be had (no docker, not root or no apt to install it),
the tests skip with the reason; under CI (``CI=true``) they fail instead.
``ZCHAT_SKIP_DOCKER=1``, the switch with which ``.ci/run`` installs no Docker,
skips them on purpose.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import unused_ports, wait_until
from zchat import BrokerUnreachable, Client, Message

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SECURE_FILE = ROOT / "docker-compose.secure.yml"
RELAY_FILE = ROOT / "docker-compose.relay.yml"
BASE_IMAGE = "python:3.11-slim"
TOOLS = {"docker": "docker.io", "dockerd": "docker.io", "docker-compose": "docker-compose",
         "mmdebstrap": "mmdebstrap"}
RING = ("alice", "bob", "dave")

DOCKER_MARKS = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("ZCHAT_SKIP_DOCKER") == "1",
                       reason="ZCHAT_SKIP_DOCKER=1 asked not to run the Docker demo"),
]
pytestmark = DOCKER_MARKS


def unavailable(reason: str) -> None:
    """Skip, except under CI, where the demo must really run."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"docker demo cannot run in CI: {reason}")
    pytest.skip(reason)


def run(*argv: str | Path, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its whole output."""
    result = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, timeout=timeout,
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


# ------------------------------------------------------------------ engine


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return run("docker", "info", timeout=30, check=False).returncode == 0


def install_tools(*tools: str) -> None:
    """apt-get install the packages of those ``tools`` that are missing."""
    missing = sorted({TOOLS[tool] for tool in tools if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable(f"{', '.join(missing)} missing and no root apt-get to install them")
    with file_lock(APT_LOCK):
        missing = sorted({TOOLS[tool] for tool in tools if shutil.which(tool) is None})
        if not missing:
            return  # another worker installed them meanwhile
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run("apt-get", "update", "-qq", timeout=300, env=env)
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
            timeout=600, env=env)


@functools.cache
def compose_command() -> list[str]:
    """Compose v2 (the ``docker compose`` plugin) where it is there, else v1's docker-compose.

    The demo is for both (README); Debian's apt has only v1 (1.29), so that
    is what gets installed when there is neither.
    """
    if shutil.which("docker") and run("docker", "compose", "version", timeout=30,
                                      check=False).returncode == 0:
        return ["docker", "compose"]
    install_tools("docker-compose")
    return ["docker-compose"]


def remove_stale_pid_file(pid_file: Path = Path("/var/run/docker.pid")) -> None:
    """A pid file left by a dead dockerd makes a new one refuse to start."""
    if not pid_file.exists():
        return
    raw = pid_file.read_text().strip()
    try:
        comm = Path(f"/proc/{int(raw)}/comm").read_text().strip()
    except (ValueError, FileNotFoundError):
        comm = ""  # garbage, or no such process
    if comm == "dockerd":
        # A live engine that does not answer yet: give it time to come up.
        wait_until("the running dockerd to answer", engine_answers, 60)
        return
    pid_file.unlink()


@dataclass
class Engine:
    """The engine the tests use; ``pid`` is set only if a test started it."""

    pid: int | None = None
    log: Path | None = None

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


# The Docker files run on several xdist workers at once (test_docker.py's
# image and demos beside test_docker_debian.py's container), and so may other
# runs on the machine: they share one engine. Under ENGINE_LOCK, the first
# user starts dockerd if none answers and writes ENGINE_STATE (its pid and
# log); every user adds itself to the state's list of users and takes itself
# off at the end, and whoever leaves it empty stops that dockerd, whichever
# process started it. Users whose process died are dropped from the list, so
# that a crashed worker cannot keep the engine up forever. An engine that
# answered before any test started one is never stopped.
LOCK_DIR = Path(tempfile.gettempdir())
ENGINE_LOCK = LOCK_DIR / "zchat-test-dockerd.lock"
ENGINE_STATE = LOCK_DIR / "zchat-test-dockerd.json"
# apt-get one at a time (dpkg's lock would fail a second one), and each
# image built once (IMAGE_LOCK per tag); two different images may be built
# at once (mmdebstrap keeps its apt state to itself).
APT_LOCK = LOCK_DIR / "zchat-test-apt.lock"
IMAGE_LOCK = str(LOCK_DIR / "zchat-test-image-{}.lock")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (across processes)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``Z`` a zombie), ``""`` if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def is_dockerd(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return False
    return comm == "dockerd" and process_state(pid) not in ("", "Z")


def read_engine_state() -> dict[str, Any] | None:
    """The dockerd that tests started and its users, if it still runs."""
    try:
        state: dict[str, Any] = json.loads(ENGINE_STATE.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not is_dockerd(int(state.get("pid", 0))):
        ENGINE_STATE.unlink(missing_ok=True)  # it died, or the machine restarted
        return None
    state["users"] = [user for user in state.get("users", [])
                      if process_state(user[0]) not in ("", "Z")]
    return state


def write_engine_state(state: dict[str, Any]) -> None:
    temporary = ENGINE_STATE.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(ENGINE_STATE)


# The dockerd this process started, kept so that its Popen is never dropped
# while it runs (a ResourceWarning, an error here) and so that this process
# reaps it, whichever process stopped it.
_started: dict[int, subprocess.Popen[bytes]] = {}


def storage_drivers() -> list[str]:
    """overlay2 where the kernel has overlayfs, else (or if it fails) vfs.

    vfs copies an image's whole filesystem for every layer built and every
    container made (some 25 of them here), which made the engine the
    busiest process of a CI run; overlay2 copies nothing.
    """
    filesystems = Path("/proc/filesystems").read_text().split()
    return ["overlay2", "vfs"] if "overlay" in filesystems else ["vfs"]


def start_dockerd(log: Path) -> int:
    """Start Debian's dockerd; return its pid once it answers."""
    failures = []
    for driver in storage_drivers():
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ["dockerd", "--iptables=false", "--bridge=none", f"--storage-driver={driver}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _started[proc.pid] = proc

        def up(proc: subprocess.Popen[bytes] = proc) -> bool:
            return proc.poll() is not None or engine_answers()

        try:
            wait_until("dockerd to answer", up, 60)
        except BaseException:
            stop_dockerd(proc.pid)
            raise
        if proc.poll() is None:
            return proc.pid
        failures.append(f"--storage-driver={driver}: exited {proc.returncode}")
        remove_stale_pid_file()
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise AssertionError(f"dockerd did not start ({'; '.join(failures)}):\n{tail}")


def reap_started() -> None:
    """Reap the dockerds this process started that another one stopped."""
    for pid, proc in list(_started.items()):
        if proc.poll() is not None:
            del _started[pid]


def stop_dockerd(pid: int) -> None:
    """SIGTERM, then SIGKILL after 60 s; wait until it is gone (or a zombie:
    dead, left for the worker that started it to reap)."""
    for sig, grace in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            reap_started()
            if process_state(pid) in ("", "Z"):
                return
            time.sleep(0.1)
    raise AssertionError(f"the dockerd the tests started (pid {pid}) is still running")


@contextlib.contextmanager
def engine_lease(logdir: Path) -> Iterator[Engine]:
    """A Docker engine that answers, shared with other workers (see ENGINE_LOCK)."""
    install_tools("docker")
    me = [os.getpid(), secrets.token_hex(4)]
    with file_lock(ENGINE_LOCK):
        state = read_engine_state()
        if state is None:
            install_tools("dockerd")
            remove_stale_pid_file()
        if state is None and not engine_answers():
            log = logdir / "dockerd.log"
            state = {"pid": start_dockerd(log), "log": str(log), "users": []}
        if state is not None:
            state["users"].append(me)
            write_engine_state(state)
    if state is None:
        yield Engine()  # one that answered before the tests: used, never stopped
        return
    try:
        yield Engine(state["pid"], Path(state["log"]))
    finally:
        with file_lock(ENGINE_LOCK):
            current = read_engine_state()
            if current is not None:
                current["users"] = [user for user in current["users"] if user != me]
                if current["users"]:
                    write_engine_state(current)
                else:
                    ENGINE_STATE.unlink()
                    stop_dockerd(current["pid"])
        reap_started()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A Docker engine that answers, started here if none did."""
    with engine_lease(tmp_path_factory.mktemp("dockerd")) as started:
        yield started


def debootstrap_image(tag: str, packages: str, *hooks: str) -> None:
    """Import a Debian bookworm made with mmdebstrap from Debian's packages as ``tag``."""
    mmdebstrap = subprocess.Popen(
        ["mmdebstrap", "--quiet", "--variant=minbase",
         "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr", f"--include={packages}",
         "--aptopt=APT::Install-Recommends \"false\"",
         "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
         "--dpkgopt=path-exclude=/usr/share/locale/*",
         *hooks, "bookworm", "-"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    assert mmdebstrap.stdout is not None
    try:
        imported = subprocess.run(
            ["docker", "import",
             "--change", "ENV LANG=C.UTF-8",
             "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", 'CMD ["python3"]', "-", tag],
            stdin=mmdebstrap.stdout, capture_output=True, text=True, timeout=600,
        )
    finally:
        mmdebstrap.stdout.close()
        _, errors = mmdebstrap.communicate(timeout=600)
    assert mmdebstrap.returncode == 0, f"mmdebstrap failed:\n{errors.decode()[-4000:]}"
    assert imported.returncode == 0, f"docker import failed:\n{imported.stderr}"


def image_exists(tag: str) -> bool:
    return run("docker", "image", "inspect", tag, check=False).returncode == 0


def ensure_image(tag: str, build: Callable[[], None]) -> None:
    """Build ``tag`` with mmdebstrap unless the engine has it (kept as a cache).

    One build of a tag at a time, machine-wide (IMAGE_LOCK): a worker that
    waited finds the image another one built.
    """
    if image_exists(tag):
        return
    install_tools("mmdebstrap")
    with file_lock(Path(IMAGE_LOCK.format(re.sub(r"\W", "_", tag)))):
        if not image_exists(tag):
            build()


def build_base_image() -> None:
    """An offline stand-in for python:3.11-slim: Debian's Python 3.11, same ABI."""
    debootstrap_image(
        BASE_IMAGE, "python3,python3-venv,python3-pip,python-is-python3,ca-certificates",
        "--customize-hook=rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED",
        "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/*",
    )


def build_wheelhouse(wheelhouse: Path = ROOT / "wheelhouse", project: str = ".") -> Path:
    """Wheels for ``project`` (zchat, perhaps with extras), its dependencies and build
    backend, for offline installs in containers (they have no network)."""
    shutil.rmtree(wheelhouse, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    run(*pip, "wheel", "-w", wheelhouse, project, timeout=300)
    run(*pip, "download", "-d", wheelhouse, "--only-binary=:all:", "setuptools", "wheel",
        timeout=300)
    return wheelhouse


# ----------------------------------------------------------------- project


def host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host routes to, and every docker network's subnet."""
    nets = []
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        dest, mask = (socket.inet_ntoa(struct.pack("<I", int(hexa, 16)))
                      for hexa in (fields[1], fields[7]))
        if mask != "0.0.0.0":
            nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    ids = run("docker", "network", "ls", "-q").stdout.split()
    if ids:
        subnets = run("docker", "network", "inspect", "-f",
                      "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids).stdout.split()
        for subnet in subnets:
            net = ipaddress.ip_network(subnet, strict=False)
            if isinstance(net, ipaddress.IPv4Network):
                nets.append(net)
    return nets


def free_subnet() -> str:
    """The compose file's default 172.28.0.0/24, or the next /24 nobody uses."""
    taken = host_networks()
    for third in range(256):
        candidate = ipaddress.IPv4Network(f"172.28.{third}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return str(candidate)
    raise AssertionError("no free 172.28.x.0/24 subnet")


def free_ports(count: int) -> list[int]:
    return unused_ports(count)


@dataclass
class Project:
    """One compose project of the demo, with its own names, ports and subnet."""

    name: str
    image: str
    subnet: str
    port: int
    broadcast_port: int
    build_ids: list[str] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    files: tuple[Path, ...] = (COMPOSE_FILE,)
    # The web service publishes a host port (8080 by default): a free one
    # here, so that whatever holds 8080 on the machine cannot fail the demo.
    web_port: int = field(default_factory=lambda: free_ports(1)[0])

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "ZCHAT_IMAGE": self.image, "ZCHAT_SUBNET": self.subnet,
                "ZCHAT_PORT": str(self.port), "ZCHAT_BROADCAST_PORT": str(self.broadcast_port),
                "ZCHAT_WEB_PORT": str(self.web_port)}

    def compose(self, *args: str, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        return run(*compose_command(), "-p", self.name, *files, *args,
                   timeout=timeout, check=check, env=self.env)

    def timed(self, what: str, *args: str, timeout: float = 120) -> str:
        start = time.monotonic()
        result = self.compose(*args, timeout=timeout)
        self.times[what] = time.monotonic() - start
        return result.stdout + result.stderr

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.name}"
        containers = run("docker", "ps", "-aq", "--filter", label).stdout.split()
        networks = run("docker", "network", "ls", "-q", "--filter", label).stdout.split()
        return containers + networks


def logs(container: str) -> str:
    result = subprocess.run(["docker", "logs", container], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=30)
    return result.stdout


@pytest.fixture(scope="module")
def project(engine: Engine) -> Iterator[Project]:
    """The demo's image, built offline for a project of its own; removed after."""
    ensure_image(BASE_IMAGE, build_base_image)
    build_wheelhouse()
    name = f"zchattest{os.getpid()}{secrets.token_hex(3)}"
    port, broadcast_port = free_ports(2)
    proj = Project(name, f"zchat-test:{name}", free_subnet(), port, broadcast_port)
    try:
        out = proj.timed("build", "build", "--build-arg", "PIP_NO_INDEX=1",
                         "--build-arg", "PIP_FIND_LINKS=/src/wheelhouse", timeout=600)
        # The legacy builder keeps every step's image as cache; these are
        # removed with the image so that runs do not pile up copies (vfs).
        proj.build_ids = re.findall(r"---> ([0-9a-f]{12})\b", out)
        yield proj
    finally:
        proj.compose("down", "-v", "--remove-orphans", timeout=120, check=False)
        base = run("docker", "image", "inspect", "-f", "{{.Id}}", BASE_IMAGE,
                   check=False).stdout.strip().removeprefix("sha256:")[:12]
        run("docker", "rmi", proj.image, check=False)
        for image_id in reversed(proj.build_ids):  # children before their parents
            if image_id != base:
                run("docker", "rmi", image_id, check=False)


# ------------------------------------------------------------------- tests


def test_compose_file_is_valid() -> None:
    compose = compose_command()
    run(*compose, "-f", COMPOSE_FILE, "config", "-q", timeout=60)
    run(*compose, "-f", COMPOSE_FILE, "-f", SECURE_FILE, "config", "-q", timeout=60)
    run(*compose, "-f", COMPOSE_FILE, "-f", RELAY_FILE, "config", "-q", timeout=60)
    services = run(*compose, "-f", COMPOSE_FILE, "config", "--services").stdout.split()
    assert {"broker", "bots", *RING} <= set(services)


def test_image_runs_as_non_root_with_nothing_but_zchat(project: Project) -> None:
    user = run("docker", "image", "inspect", "-f", "{{.Config.User}}", project.image)
    assert user.stdout.strip() == "zchat"
    probe = run("docker", "run", "--rm", "--network", "none", project.image, "sh", "-c",
                "id -u; for cmd in zchat-broker zchat-client zchat-admin; do "
                "command -v $cmd; done; "
                "for tool in gcc cc make git /opt/zchat/bin/pip; do "
                "command -v $tool && echo LEFT $tool; done; test -e /src && echo LEFT /src; true")
    lines = probe.stdout.split()
    assert lines[0] == "10001"
    assert [Path(line).name for line in lines[1:4]] == ["zchat-broker", "zchat-client",
                                                         "zchat-admin"]
    assert "LEFT" not in probe.stdout, probe.stdout


def test_broker_stops_on_sigterm_within_its_grace_time(project: Project) -> None:
    """``docker stop -t 2`` kills what has not stopped after 2 s (exit 137)."""
    name = f"{project.name}-sigterm"
    run("docker", "run", "-d", "--name", name, "--network", "none", project.image)
    try:
        wait_until("the broker to listen", lambda: "zchat-broker listening" in logs(name), 60)
        start = time.monotonic()
        run("docker", "stop", "--time", "2", name, timeout=60)
        project.times["sigterm stop"] = time.monotonic() - start
        state = run("docker", "inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", name)
        out = logs(name)
        assert state.stdout.split() == ["0", "false"], out
        assert "received SIGTERM, shutting down" in out
        assert "zchat.broker: stopped" in out
    finally:
        run("docker", "rm", "-f", name, check=False)


ROOMS = ("lobby", "backstage")  # the ring's rooms (ZCHAT_ROOMS), backstage private
ROOM_SAID = re.compile(r"#(\S+) \d+ \S+ <\S+> (.*)")  # a message's room and text

# The broker's screen: "HH:MM:SS #room seq ..." (the room and its seq first).
JOINED = re.compile(r"#\S+ \d+ --> (\S+) joined from (\S+)")
SAID = re.compile(r"#\S+ \d+ \S+ <(\S+)> (.*)")  # room, seq, the sender's address, name, text


def check_ring(project: Project, broker: str) -> dict[str, str]:
    """The three ring peers exit 0 only if the ball came round; return their addresses.

    Every hop is a message from one container that another received, and the
    broker's screen shows each container joining from its own address.
    """
    peers = {name: project.container(name) for name in RING}
    waited = run("docker", "wait", *peers.values(), timeout=120)
    codes = dict(zip(RING, waited.stdout.split(), strict=True))
    peer_logs = {name: logs(cid) for name, cid in peers.items()}
    assert codes == dict.fromkeys(RING, "0"), peer_logs
    screen = logs(broker)
    joined = dict(JOINED.findall(screen))
    subnet = ipaddress.ip_network(project.subnet)
    addresses = [joined[name] for name in RING]
    assert len(set(addresses)) == len(RING), screen
    assert all(ipaddress.ip_address(addr) in subnet for addr in addresses), screen
    assert joined["greeter"] not in addresses, screen  # the bots have their own container
    said = SAID.findall(screen)
    for name in RING:
        # Each peer saw its own address as the broker did, and heard both others.
        assert f"joined as {name} from {joined[name]};" in peer_logs[name]
        assert any(sender == name and "catch!" in text for sender, text in said), screen
        for other in RING:
            if other != name:
                hop = rf"<{other}> @\w+ \d/9 catch! \({other} at {re.escape(joined[other])}\)"
                assert re.search(hop, peer_logs[name]), peer_logs[name]
        assert f"<-- {name} ({joined[name]}) left [leave]: the ball came round" in screen
        # Rooms: the ball crossed lobby and the private backstage in turn.
        for room in ROOMS:
            assert re.search(rf"#{room} <\w+> @\w+ \d/9 catch!", peer_logs[name]), \
                peer_logs[name]
    hops = [room for room, text in ROOM_SAID.findall(screen) if "catch!" in text]
    assert hops == [ROOMS[n % 2] for n in range(9)], screen
    return joined


def join_from_host(project: Project, context: zmq.Context[Any]) -> None:
    """A client on the host joins through the ports published on 127.0.0.1."""
    visitor = Client(f"tcp://127.0.0.1:{project.port}", "visitor", context=context, timeout=20)
    visitor.connect()
    try:
        visitor.send("!echo hello from the host")
        heard: dict[str, str] = {}
        for item in visitor.events(timeout=20):
            if isinstance(item, Message):
                heard[item.sender] = item.text
            if {"greeter", "helper"} <= heard.keys():
                break
        assert heard.get("greeter", "").startswith("welcome, visitor!"), heard
        assert heard.get("helper") == "hello from the host", heard
        # Rooms: the bots' dev is listed, the ring's private backstage is not,
        # and the greeter welcomes the visitor in dev too.
        listed = {room.name for room in visitor.rooms()}
        assert {"lobby", "dev"} <= listed and "backstage" not in listed, listed
        visitor.enter("dev")
        for item in visitor.events(timeout=20):
            if isinstance(item, Message) and item.room == "dev" and item.sender == "greeter":
                assert item.text.startswith("welcome, visitor!"), item
                break
        else:
            raise AssertionError("the greeter did not welcome the visitor in #dev")
    finally:
        visitor.leave("seen enough")


def join_as_person(project: Project, broker: str) -> None:
    """The README's command in a real terminal (tmux): join, say a line, /quit."""
    if shutil.which("tmux") is None:
        unavailable("tmux is missing (.ci/run installs it)")
    server = ["tmux", "-L", f"{project.name}-person"]
    command = (f"{' '.join(compose_command())} -p {project.name} -f {COMPOSE_FILE} "
               "run --rm chat --name carol")
    run(*server, "new-session", "-d", "-x", "120", "-y", "30", command, env=project.env)
    try:
        def screen() -> str:
            return run(*server, "capture-pane", "-p", "-t", "0", check=False).stdout

        wait_until("carol to be welcomed", lambda: "welcome, carol!" in screen(), 60)
        run(*server, "send-keys", "-t", "0", "-l", "hello from a terminal")
        run(*server, "send-keys", "-t", "0", "Enter")
        wait_until("carol's line on the broker's screen",
                   lambda: "<carol> hello from a terminal" in logs(broker), 30)
        run(*server, "send-keys", "-t", "0", "-l", "/quit back to work")
        run(*server, "send-keys", "-t", "0", "Enter")
        wait_until("carol's terminal to close",
                   lambda: run(*server, "has-session", check=False).returncode != 0, 60)
    finally:
        run(*server, "kill-server", check=False)
    screen_lines = logs(broker)
    carol = dict(JOINED.findall(screen_lines))["carol"]
    assert ipaddress.ip_address(carol) in ipaddress.ip_network(project.subnet)
    assert f"<-- carol ({carol}) left [leave]: back to work" in screen_lines
    # `run --rm` removed carol's container when she left.
    assert project.compose("ps", "-q", "chat").stdout.strip() == ""


def stop_with_down(project: Project, broker: str) -> str:
    """``down``; return the broker's screen to the end, having checked exit codes.

    ``down`` stops the clients first (they depend on the broker), then the
    broker, whose grace time is 2 s: exit 0 means it stopped on SIGTERM by
    itself in time (a kill after the grace time is exit 137).
    """
    bots = project.container("bots")
    with subprocess.Popen(["docker", "wait", broker, bots], stdout=subprocess.PIPE,
                          text=True) as waiter, \
         subprocess.Popen(["docker", "logs", "-f", broker], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as follower:
        try:
            assert follower.stdout is not None
            first = follower.stdout.readline()  # following now: nothing can be missed
            project.timed("down", "down", "-v", "--remove-orphans")
            exit_codes, _ = waiter.communicate(timeout=60)
            rest, _ = follower.communicate(timeout=60)
        finally:
            for proc in (waiter, follower):
                if proc.poll() is None:
                    proc.kill()
    final_screen = first + rest
    assert exit_codes.split() == ["0", "0"], final_screen
    return final_screen


def test_demo_chats_across_containers_and_stops_cleanly(
    project: Project, ctx: zmq.Context[Any],
) -> None:
    project.timed("up", "up", "-d", "--no-build", timeout=300)
    broker = project.container("broker")
    check_ring(project, broker)
    wait_until("the bots to join", lambda: "--> helper joined" in logs(broker), 60)
    join_from_host(project, ctx)
    join_as_person(project, broker)
    final_screen = stop_with_down(project, broker)
    for bot in ("greeter", "helper"):
        assert re.search(rf"<-- {bot} \(\S+\) left \[leave\]: bot stopped", final_screen)
    assert "received SIGTERM, shutting down" in final_screen
    assert "zchat.broker: stopped" in final_screen
    assert project.leftovers() == []
    print("\ndocker demo times: " + ", ".join(
        f"{what} {seconds:.1f}s" for what, seconds in project.times.items()))


def test_secure_variant_chats_encrypted_and_refuses_plaintext(
    project: Project, ctx: zmq.Context[Any],
) -> None:
    secure = Project(project.name, project.image, project.subnet, project.port,
                     project.broadcast_port, files=(COMPOSE_FILE, SECURE_FILE))
    try:
        secure.timed("up (CURVE)", "up", "-d", "--no-build", timeout=300)
        broker = secure.container("broker")
        wait_until("the broker to run with CURVE", lambda: "CURVE on" in logs(broker), 60)
        # The ring peers only exit 0 if their encrypted messages crossed the broker.
        check_ring(secure, broker)
        # A plaintext client from the host reaches the port and gets nothing.
        stranger = Client(f"tcp://127.0.0.1:{secure.port}", "stranger", context=ctx)
        with pytest.raises(BrokerUnreachable):
            stranger.connect(timeout=3)
        assert "--> stranger joined" not in logs(broker)
    finally:
        secure.compose("down", "-v", "--remove-orphans", timeout=120, check=False)
    assert secure.leftovers() == []


def container_address(container: str) -> str:
    return run("docker", "inspect", "-f",
               "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container).stdout.strip()


def test_relay_variant_crosses_relays_and_survives_a_relay_kill(
    project: Project, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two relays before the broker (issue 13): the ball crosses from one to
    the other, the broker sees each client's own address, and when relay1 is
    killed mid-game its clients finish the game through relay2."""
    relayed = Project(project.name, project.image, project.subnet, project.port,
                      project.broadcast_port, files=(COMPOSE_FILE, RELAY_FILE))
    subnet = ipaddress.ip_network(project.subnet)
    monkeypatch.setenv("ZCHAT_RELAY1_ADDRESS", str(subnet.network_address + 201))
    monkeypatch.setenv("ZCHAT_RELAY2_ADDRESS", str(subnet.network_address + 202))
    try:
        relayed.timed("up (relays)", "up", "-d", "--no-build", timeout=300)
        broker = relayed.container("broker")
        relays = {name: relayed.container(name) for name in ("relay1", "relay2")}
        relay_addresses = {container_address(cid) for cid in relays.values()}
        wait_until("the ball's first hop", lambda: re.search(r"<\w+> @\w+ 2/9 catch!",
                                                             logs(broker)), 120)
        start = time.monotonic()
        run("docker", "kill", relays["relay1"])
        # The peers exit 0 only if the ring came round: every hop crossed.
        joined = check_ring(relayed, broker)
        relayed.times["ring after the kill"] = time.monotonic() - start
        # Addresses are the clients' own, passed on by the relays, never theirs.
        assert not relay_addresses & {joined[name] for name in RING}, joined
        screen = logs(broker)
        for hop in range(1, 10):  # each hop said once, failed over or not
            assert len(re.findall(rf"@\w+ {hop}/9 catch!", screen)) == 1, screen
        # alice and dave came back through relay2: they joined twice.
        for name in ("alice", "dave"):
            assert len(re.findall(rf"--> {name} joined", screen)) >= 2, screen
        assert "lost" not in logs(relays["relay2"]), logs(relays["relay2"])
    finally:
        relayed.compose("down", "-v", "--remove-orphans", timeout=120, check=False)
    assert relayed.leftovers() == []
    print("\ndocker relay demo times: " + ", ".join(
        f"{what} {seconds:.1f}s" for what, seconds in relayed.times.items()))

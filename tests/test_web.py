"""zchat-web in a real browser: Debian's chromium, driven through its chromedriver.

Each test runs a real broker, a real ``zchat-web`` subprocess and headless
Chromium tabs (one browser each, with its own fresh profile), beside a
library client that stands for the terminal user. Every wait is for a
condition (WebDriverWait, the library's events), never a sleep.

Skipped only where chromium or chromedriver is missing; under CI (``CI=true``,
where .ci/run installs both) a missing browser fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from conftest import RunningBroker, launch_broker, wait_item
from zchat import Client, Joined, Left, Message
from zchat.display import name_colour
from zchat.keys import make_keypair
from zchat.web.wire import xterm_rgb

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
if not HAVE_BROWSER and os.environ.get("CI") == "true":
    raise RuntimeError("CI must run the browser tests: .ci/run installs chromium and "
                       "chromium-driver, and they are missing")
if not HAVE_BROWSER:
    pytest.skip("chromium and chromium-driver are not installed "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once we know a browser is there
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SERVING = re.compile(r"serving (\S+) ")
WAIT = 30.0  # generous: two cores shared with other work
# Long enough that a reload fits in the gateway's grace (3 s, half of it)
# even on a loaded machine; a closed tab is still announced within it.
HEARTBEAT = "6"
GRACE = "3"


class Gateway:
    """A ``zchat-web`` subprocess and the URL it printed."""

    def __init__(self, upstream: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zchat.web.server", "--upstream", upstream,
             "--listen", "127.0.0.1:0", "--grace", GRACE, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.lines: list[str] = [self.proc.stdout.readline()]
        match = SERVING.search(self.lines[0])
        if match is None:
            self.proc.kill()
            raise AssertionError(f"zchat-web did not start: {self.lines} "
                                 f"{self.proc.stderr.read()}")
        self.url = match.group(1)
        self._readers = [threading.Thread(target=self._pump, args=(s,), daemon=True)
                         for s in (self.proc.stdout, self.proc.stderr)]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def web_broker(start_broker: Callable[..., RunningBroker]) -> RunningBroker:
    return start_broker("--heartbeat", HEARTBEAT, "--rate", "0")


@pytest.fixture
def gateway(web_broker: RunningBroker) -> Iterator[Gateway]:
    gw = Gateway(web_broker.input)
    yield gw
    gw.stop()


@pytest.fixture
def browsers(tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A factory of headless Chromium browsers, each with a fresh profile; all quit at the end."""
    made: list[Any] = []

    def make() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        profile = tmp_path / f"profile-{len(made)}"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1100,700",
                    f"--user-data-dir={profile}"):
            options.add_argument(arg)
        # The page's own errors (an exception in app.js, a CSP refusal) fail the test.
        options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        made.append(driver)
        return driver

    yield make
    errors: list[str] = []
    for driver in made:
        try:
            errors += [entry["message"] for entry in driver.get_log("browser")
                       # A socket to a gateway that is down is what offline tests do.
                       if "WebSocket connection to" not in entry["message"]]
        except Exception:
            pass  # already quit by the test
        try:
            driver.quit()
        except Exception:
            pass  # already quit by the test
    assert not errors, errors


@pytest.fixture
def library(ctx: zmq.Context[Any]) -> Iterator[Callable[..., Client]]:
    """A factory of connected library clients (the 'terminal' user), closed at the end."""
    made: list[Client] = []

    def make(endpoint: str, name: str) -> Client:
        client = Client(endpoint, name, context=ctx, timeout=WAIT)
        client.connect()
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# ------------------------------------------------------------------ page helpers


def until(driver: Any, condition: Callable[[Any], Any], timeout: float = WAIT) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def log_lines(driver: Any) -> list[str]:
    lines: list[str] = driver.execute_script(
        "return [...document.querySelectorAll('#log .line')].map(n => n.textContent)")
    return lines


def state(driver: Any) -> str:
    value: str = driver.execute_script("return document.getElementById('conn').dataset.state")
    return value


def login(driver: Any, url: str, name: str) -> None:
    driver.get(url)
    box = until(driver, lambda d: d.find_element(By.ID, "name"))
    box.send_keys(name + Keys.ENTER)
    until(driver, lambda d: state(d) == "online")


def say(driver: Any, text: str) -> None:
    driver.find_element(By.ID, "input").send_keys(text + Keys.ENTER)


def wait_line(driver: Any, needle: str, timeout: float = WAIT) -> str:
    def found(d: Any) -> str | None:
        for line in log_lines(d):
            if needle in line and "(pending)" not in line:
                return line
        return None
    line: str = until(driver, found, timeout)
    return line


def said(driver: Any) -> list[str]:
    """The message lines of the page, without their time column."""
    return [line[6:] for line in log_lines(driver)
            if re.match(r"\d\d:\d\d (<|\* )", line)]


# ------------------------------------------------------------------ tests


def test_two_tabs_and_a_terminal_user_share_one_conversation_in_order(
        gateway: Gateway, web_broker: RunningBroker, browsers: Callable[[], Any],
        library: Callable[..., Client]) -> None:
    alice, bob = browsers(), browsers()
    login(alice, gateway.url, "alice")
    login(bob, gateway.url, "bob")
    carol = library(web_broker.input, "carol")
    wait_line(alice, "carol (127.0.0.1) joined")

    say(alice, "one from alice")
    wait_line(bob, "<alice> one from alice")
    carol.send("two from carol")
    wait_line(alice, "<carol> two from carol")
    say(bob, "three from bob")
    say(bob, "/me waves")
    say(alice, "four from alice")

    expected = ["<alice> one from alice", "<carol> two from carol", "<bob> three from bob",
                "* bob waves", "<alice> four from alice"]
    for driver in (alice, bob):
        until(driver, lambda d: said(d)[-1:] == expected[-1:] or expected[-1] in said(d))
    heard = [wait_item(carol, lambda i: isinstance(i, Message) and i.sender != "carol")
             for _ in range(4)]
    assert [(m.sender, m.text) for m in heard] == [
        ("alice", "one from alice"), ("bob", "three from bob"), ("bob", "/me waves"),
        ("alice", "four from alice")]
    # bob and alice each see the same order (carol's line sits where the broker put it).
    assert said(alice) == expected
    assert said(bob) == expected

    # who lists everyone with their address; nick colours are the terminal client's.
    say(alice, "/who")
    who = wait_line(alice, "3 here:")
    assert "alice (127.0.0.1, you)" in who and "bob (127.0.0.1)" in who
    colours = alice.execute_script(
        "const out = {}; for (const n of document.querySelectorAll('#log .nick'))"
        " out[n.textContent] = getComputedStyle(n).color; return out")
    for name in ("alice", "bob", "carol"):
        rgb = xterm_rgb(name_colour(name))
        r, g, b = (int(rgb[i:i + 2], 16) for i in (1, 3, 5))
        assert colours[name] == f"rgb({r}, {g}, {b})"
    shot = os.environ.get("ZCHAT_WEB_SCREENSHOT")
    if shot:
        alice.save_screenshot(shot)


def test_a_reload_keeps_the_name_and_loses_nothing(
        gateway: Gateway, web_broker: RunningBroker, browsers: Callable[[], Any],
        library: Callable[..., Client]) -> None:
    carol = library(web_broker.input, "carol")
    alice = browsers()
    login(alice, gateway.url, "alice")
    wait_item(carol, lambda i: isinstance(i, Joined) and i.name == "alice")
    say(alice, "before the reload")
    wait_item(carol, lambda i: isinstance(i, Message) and i.text == "before the reload")

    alice.refresh()
    carol.send("during the reload")
    until(alice, lambda d: state(d) == "online")
    wait_line(alice, "<carol> during the reload")
    assert alice.execute_script("return document.getElementById('me').textContent"
                                ).startswith("alice")
    say(alice, "after the reload")
    seen: list[Any] = []
    wait_item(carol, lambda i: seen.append(i) or (
        isinstance(i, Message) and i.text == "after the reload"))
    assert not [i for i in seen if isinstance(i, (Joined, Left)) and i.name == "alice"], seen
    # Carol having the line says nothing of alice's page: her own line comes
    # back to it through the gateway's SUB, maybe later than to carol.
    wait_line(alice, "<alice> after the reload")
    lines = said(alice)
    assert lines == ["<alice> before the reload", "<carol> during the reload",
                     "<alice> after the reload"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_broker_restart_shows_reconnecting_and_a_line_typed_meanwhile_goes_out_once(
        tmp_path: Path, browsers: Callable[[], Any], library: Callable[..., Client]) -> None:
    ports = [_free_port() for _ in range(3)]
    args = ("--input", f"tcp://127.0.0.1:{ports[0]}", "--broadcast",
            f"tcp://127.0.0.1:{ports[1]}", "--control", f"tcp://127.0.0.1:{ports[2]}",
            "--db", str(tmp_path / "history.db"), "--heartbeat", HEARTBEAT, "--rate", "0")
    broker = launch_broker(*args)
    gw = Gateway(broker.input)
    try:
        carol = library(broker.input, "carol")
        alice = browsers()
        login(alice, gw.url, "alice")
        say(alice, "before")
        wait_item(carol, lambda i: isinstance(i, Message) and i.text == "before")

        broker.stop(9)
        broker.release()
        until(alice, lambda d: state(d) == "reconnecting")
        assert "reconnecting" in alice.find_element(By.ID, "conn").text
        say(alice, "typed while the broker was away")
        until(alice, lambda d: any("(pending)" in line for line in log_lines(d)))

        broker = launch_broker(*args)
        until(alice, lambda d: state(d) == "online")
        wait_line(alice, "<alice> typed while the broker was away")
        wait_item(carol, lambda i: isinstance(i, Message)
                  and i.text == "typed while the broker was away")
        say(alice, "after")
        wait_item(carol, lambda i: isinstance(i, Message) and i.text == "after")
        wait_line(alice, "<alice> after")
        assert said(alice).count("<alice> typed while the broker was away") == 1
        history = carol.history(0)
        texts = [e.text for e in history if isinstance(e, Message)]
        assert texts.count("typed while the broker was away") == 1
        assert not any("(pending)" in line for line in log_lines(alice))
    finally:
        gw.stop()
        broker.release()


HOSTILE_NAME = "<img/src=x/onerror=pwned=1>"
HOSTILE_TEXT = ('<img src=x onerror="window.pwned=2"><script>window.pwned=3</script>'
                '<b>bold?</b>')


def test_hostile_names_and_text_show_as_text_and_run_nothing(
        gateway: Gateway, web_broker: RunningBroker, browsers: Callable[[], Any],
        library: Callable[..., Client]) -> None:
    alice = browsers()
    login(alice, gateway.url, "alice")
    mallory = library(web_broker.input, HOSTILE_NAME)
    mallory.send(HOSTILE_TEXT)
    mallory.send("/me " + HOSTILE_TEXT)
    mallory.dm("alice", HOSTILE_TEXT)
    wait_line(alice, f"[private from {HOSTILE_NAME}] {HOSTILE_TEXT}")
    wait_line(alice, f"<{HOSTILE_NAME}> {HOSTILE_TEXT}")
    wait_line(alice, f"* {HOSTILE_NAME} {HOSTILE_TEXT}")
    wait_line(alice, f"--> {HOSTILE_NAME} (127.0.0.1) joined")
    say(alice, "/who")
    wait_line(alice, f"{HOSTILE_NAME} (127.0.0.1)")
    # A topic is peer text too.
    mallory.enter("den")
    mallory.topic("den", HOSTILE_TEXT)
    say(alice, "/join den")
    until(alice, lambda d: d.find_element(By.ID, "topic").text == HOSTILE_TEXT)
    assert alice.execute_script("return window.pwned") is None
    assert alice.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log b, header img, "
                                                "#members img, #members script") == []
    # A tab with the hostile name itself: its own name shows as text too.
    mallory.leave()
    wait_line(alice, f"<-- {HOSTILE_NAME}")
    eve = browsers()
    login(eve, gateway.url, HOSTILE_NAME)
    say(eve, HOSTILE_TEXT)
    wait_line(alice, f"<{HOSTILE_NAME}> {HOSTILE_TEXT}")
    wait_line(eve, f"<{HOSTILE_NAME}> {HOSTILE_TEXT}")
    for driver in (alice, eve):
        assert driver.execute_script("return window.pwned") is None
        assert driver.find_elements(By.CSS_SELECTOR, "#log img, #log script, #me img") == []


def test_closing_a_tab_announces_left_within_a_heartbeat(
        gateway: Gateway, web_broker: RunningBroker, browsers: Callable[[], Any],
        library: Callable[..., Client]) -> None:
    carol = library(web_broker.input, "carol")
    alice = browsers()
    login(alice, gateway.url, "alice")
    wait_item(carol, lambda i: isinstance(i, Joined) and i.name == "alice")
    heartbeat = float(HEARTBEAT)
    started = time.monotonic()
    alice.quit()
    left = wait_item(carol, lambda i: isinstance(i, Left) and i.name == "alice",
                     timeout=3 * heartbeat)
    elapsed = time.monotonic() - started
    assert left.reason == "leave"
    assert elapsed <= heartbeat, f"left came {elapsed:.1f}s after the tab closed"


def test_a_gateway_restart_shows_offline_and_the_line_typed_meanwhile_goes_out_once(
        gateway: Gateway, web_broker: RunningBroker, browsers: Callable[[], Any],
        library: Callable[..., Client]) -> None:
    carol = library(web_broker.input, "carol")
    alice = browsers()
    login(alice, gateway.url, "alice")
    port = gateway.url.rsplit(":", 1)[1].strip("/")
    gateway.proc.kill()  # no goodbye: the tab just loses its socket
    gateway.stop()
    until(alice, lambda d: state(d) == "offline")
    say(alice, "typed while offline")
    until(alice, lambda d: any("(pending)" in line for line in log_lines(d)))

    again = Gateway(web_broker.input, "--listen", f"127.0.0.1:{port}")
    try:
        until(alice, lambda d: state(d) == "online")
        wait_item(carol, lambda i: isinstance(i, Message) and i.text == "typed while offline")
        wait_line(alice, "<alice> typed while offline")
        assert not any("(pending)" in line for line in log_lines(alice))
        say(alice, "and after")
        wait_item(carol, lambda i: isinstance(i, Message) and i.text == "and after")
        texts = [e.text for e in carol.history(0) if isinstance(e, Message)]
        assert texts == ["typed while offline", "and after"]
    finally:
        again.stop()


def test_rooms_switching_topic_line_and_unread_markers_survive_a_reload(
        gateway: Gateway, web_broker: RunningBroker, browsers: Callable[[], Any],
        library: Callable[..., Client]) -> None:
    carol = library(web_broker.input, "carol")
    carol.enter("dev")
    carol.topic("dev", "release on <friday>")
    alice = browsers()
    login(alice, gateway.url, "alice")
    say(alice, "/join #dev")
    until(alice, lambda d: d.find_element(By.ID, "room-title").text == "#dev")
    until(alice, lambda d: d.find_element(By.ID, "topic").text == "release on <friday>")
    until(alice, lambda d: "carol" in d.find_element(By.ID, "members").text)

    say(alice, "hello dev")
    heard = wait_item(carol, lambda i: isinstance(i, Message) and i.text == "hello dev")
    assert heard.room == "dev"

    # Back in lobby, a line in #dev marks it unread; opening it clears the mark.
    alice.find_element(By.CSS_SELECTOR, "#rooms li[data-room='lobby']").click()
    until(alice, lambda d: d.find_element(By.ID, "room-title").text == "#lobby")
    carol.send("while you look elsewhere", room="dev")
    mark = until(alice, lambda d: d.find_elements(
        By.CSS_SELECTOR, "#rooms li[data-room='dev'] .unread"))
    assert mark[0].text == "1"
    carol.topic("dev", "shipped")
    until(alice, lambda d: "shipped" in " ".join(log_lines(d)))
    assert alice.find_element(By.ID, "topic").text == ""  # lobby has none
    alice.find_element(By.CSS_SELECTOR, "#rooms li[data-room='dev']").click()
    until(alice, lambda d: d.find_element(By.ID, "topic").text == "shipped")
    assert not alice.find_elements(By.CSS_SELECTOR, "#rooms li .unread")
    wait_line(alice, "<carol> while you look elsewhere")

    alice.refresh()
    until(alice, lambda d: state(d) == "online")
    until(alice, lambda d: d.find_elements(By.CSS_SELECTOR, "#rooms li[data-room='dev']"))
    alice.find_element(By.CSS_SELECTOR, "#rooms li[data-room='dev']").click()
    until(alice, lambda d: d.find_element(By.ID, "topic").text == "shipped")
    wait_line(alice, "<carol> while you look elsewhere")
    wait_line(alice, "<alice> hello dev")

    say(alice, "/part")
    wait_item(carol, lambda i: isinstance(i, Left) and i.name == "alice" and i.room == "dev")
    until(alice, lambda d: not d.find_elements(By.CSS_SELECTOR, "#rooms li[data-room='dev']"))


def test_through_the_relay_a_reload_and_a_closed_tab_behave_the_same(
        start_broker: Callable[..., RunningBroker], tmp_path: Path,
        browsers: Callable[[], Any], library: Callable[..., Client]) -> None:
    root = tmp_path / "keys"
    (root / "relays").mkdir(parents=True)
    make_keypair(root, "broker")
    public, _ = make_keypair(root, "web")
    (root / "relays" / public.name).write_bytes(public.read_bytes())
    broker = start_broker("--relay-bind", "tcp://127.0.0.1:0", "--relay-broadcast",
                          "tcp://127.0.0.1:0", "--relay-keys", str(root / "relays"),
                          "--relay-secret-key", str(root / "broker.key_secret"),
                          "--rate", "0", "--heartbeat", HEARTBEAT)
    link = re.search(r" relay=(\S+)", broker.wait_output(r" relay=\S+"))
    assert link is not None
    gw = Gateway(link.group(1), "--upstream-key", str(root / "broker.key"),
                 "--relay-key", str(root / "web.key_secret"))
    try:
        carol = library(broker.input, "carol")
        alice = browsers()
        login(alice, gw.url, "alice")
        say(alice, "through the relay")
        wait_item(carol, lambda i: isinstance(i, Message) and i.text == "through the relay")
        alice.refresh()
        until(alice, lambda d: state(d) == "online")
        wait_line(alice, "<alice> through the relay")
        say(alice, "after the reload")
        seen: list[Any] = []
        wait_item(carol, lambda i: seen.append(i) or (
            isinstance(i, Message) and i.text == "after the reload"))
        assert not [i for i in seen if isinstance(i, (Joined, Left)) and i.name == "alice"]
        started = time.monotonic()
        alice.quit()
        left = wait_item(carol, lambda i: isinstance(i, Left) and i.name == "alice")
        assert left.reason == "leave"
        assert time.monotonic() - started <= float(HEARTBEAT)
    finally:
        gw.stop()


def test_a_taken_name_is_said_on_the_login_form(
        gateway: Gateway, web_broker: RunningBroker, browsers: Callable[[], Any],
        library: Callable[..., Client]) -> None:
    library(web_broker.input, "alice")
    tab = browsers()
    tab.get(gateway.url)
    until(tab, lambda d: d.find_element(By.ID, "name")).send_keys("ALICE" + Keys.ENTER)
    until(tab, lambda d: "taken" in d.find_element(By.ID, "login-error").text)
    assert tab.find_element(By.ID, "login").is_displayed()
    box = tab.find_element(By.ID, "name")
    box.clear()
    box.send_keys("alicia" + Keys.ENTER)
    until(tab, lambda d: state(d) == "online")
    assert tab.find_element(By.ID, "me").text.startswith("alicia")


def test_a_join_storm_shows_as_join_lines_and_fills_the_member_list(
        start_broker: Callable[..., RunningBroker], browsers: Callable[[], Any],
        ctx: zmq.Context[Any]) -> None:
    # Every room coalesces a pass's joins here; the broker is stopped while
    # they are sent, so one pass reads several: a `joined`, then a `joins`.
    broker = start_broker("--heartbeat", HEARTBEAT, "--rate", "0", "--join-rate", "0",
                          "--coalesce-joins-above", "0")
    gw = Gateway(broker.input)
    try:
        alice = browsers()
        login(alice, gw.url, "alice")
        names = [HOSTILE_NAME, *(f"user{n:02}" for n in range(11))]
        dealers = []
        for _ in names:
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(broker.input)
            dealer.send(msgpack.packb({"type": "ping"}))
            dealers.append(dealer)
        for dealer in dealers:  # each connected before any joins
            assert dealer.poll(10_000) and msgpack.unpackb(dealer.recv())["type"] == "pong"
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            for dealer, name in zip(dealers, names, strict=True):
                dealer.send(msgpack.packb({"type": "join", "name": name}))
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        until(alice, lambda d: d.find_element(By.ID, "count").text == f"({len(names) + 1})")
        shown = alice.execute_script(
            "return [...document.querySelectorAll('#members .nick')].map(n => n.textContent)")
        assert sorted(shown) == sorted([*names, "alice"])
        joins = until(alice, lambda d: d.find_elements(By.CSS_SELECTOR, "#log .line.joins"))
        assert re.fullmatch(r"\d\d:\d\d --> .+ joined", joins[0].text), joins[0].text
        assert alice.execute_script("return window.pwned") is None
        assert alice.find_elements(By.CSS_SELECTOR, "#log img, #log script, #members img") == []
    finally:
        gw.stop()

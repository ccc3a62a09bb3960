"""The terminal client's pure parts: line rendering, commands, completion, options.

No sockets and no terminal: these are the functions the interactive and
scriptable shells call, tested on their own in milliseconds.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zchat import Direct, Joined, Joins, Left, Member, Message, Notice, OtherEvent, Status
from zchat.clients.commands import (
    Clear,
    Help,
    Invalid,
    Nick,
    Private,
    Query,
    Quit,
    Say,
    Who,
    complete,
    parse_line,
)
from zchat.clients.render import (
    BOLD,
    MENTION,
    SentPrivate,
    View,
    help_lines,
    is_action,
    item_json,
    joins_others,
    pending_line,
    refusal,
    render,
    to_ansi,
    to_plain,
    wants_attention,
    who_line,
    width,
    wrap,
)
from zchat.clients.terminal import Options, parse_options
from zchat.display import PALETTE, name_colour, printable
from zchat.protocol import parse_event

TS = 1_700_000_000.0
STAMP = time.strftime("%H:%M", time.localtime(TS))
ALICE = View("alice")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def plain(item: object, view: View = ALICE) -> str:
    return to_plain(render(item, view, now=TS))  # type: ignore[arg-type]


# ---------------------------------------------------------------- messages


def test_message_shows_time_name_and_text() -> None:
    assert plain(Message(5, TS, "bob", "hello")) == f"{STAMP} <bob> hello"


def test_each_name_keeps_its_colour() -> None:
    line = render(Message(5, TS, "bob", "hi"), ALICE)
    first = dict((text, sgr) for sgr, text in line)["bob"]
    again = dict((text, sgr) for sgr, text in render(Joined(6, TS, "bob", "1.2.3.4"), ALICE))
    assert first == f"38;5;{name_colour('bob')}" == again["bob"]


def test_own_messages_stand_out_in_bold() -> None:
    line = render(Message(5, TS, "Alice", "mine"), ALICE)  # names compare case-insensitively
    styles = dict((text, sgr) for sgr, text in line)
    assert styles["Alice"].startswith(BOLD + ";")
    assert styles["mine"] == BOLD
    other = dict((text, sgr) for sgr, text in render(Message(6, TS, "bob", "yours"), ALICE))
    assert other["yours"] == ""


@pytest.mark.parametrize(("text", "mentioned"), [
    ("hi alice!", True), ("ALICE: look", True), ("alice", True),
    ("malice aforethought", False), ("alicexyz", False), ("nothing", False),
])
def test_lines_naming_me_are_highlighted(text: str, mentioned: bool) -> None:
    styles = dict((t, sgr) for sgr, t in render(Message(5, TS, "bob", text), ALICE))
    assert (styles[text] == MENTION) is mentioned


def test_me_action_is_shown_as_an_action() -> None:
    assert is_action("/me waves")
    assert not is_action("/me ")
    assert not is_action("/meh")
    assert plain(Message(5, TS, "bob", "/me waves")) == f"{STAMP} * bob waves"


def test_peer_text_cannot_move_the_cursor() -> None:
    evil = Message(5, TS, "bo\x1b[2Jb", "red\x1b[31m\r\nfake line\x07")
    text = plain(evil)
    assert "\x1b" not in text and "\r" not in text and "\n" not in text and "\x07" not in text
    assert "\\x1b" in text
    # The only escapes in the painted line are our own styles.
    painted = to_ansi(render(evil, ALICE, TS))
    assert "\n" not in painted and ANSI_ESCAPE.sub("", painted) == text


# ------------------------------------------------------------ join / leave


def test_join_line_has_name_and_address() -> None:
    assert plain(Joined(3, TS, "bob", "10.0.0.7")) == f"{STAMP} --> bob (10.0.0.7) joined"


def people(*names: str) -> tuple[Member, ...]:
    return tuple(Member(name, f"10.0.0.{n}") for n, name in enumerate(names, 1))


@pytest.mark.parametrize(("names", "shown"), [
    (("bob",), "bob (10.0.0.1) joined"),
    (("bob", "carol"), "bob (10.0.0.1) and carol (10.0.0.2) joined"),
    (("bob", "carol", "dave", "erin"),
     "bob (10.0.0.1), carol (10.0.0.2), dave (10.0.0.3) and erin (10.0.0.4) joined"),
    (("bob", "carol", "dave", "erin", "fay"), "bob, carol, dave and 2 more joined"),
    (tuple(f"u{n}" for n in range(30)), "u0, u1, u2 and 27 more joined"),
])
def test_joins_line_names_few_with_addresses_and_counts_many(
        names: tuple[str, ...], shown: str) -> None:
    assert plain(Joins("big", 7, TS, people(*names))) == f"{STAMP} --> {shown}"


def test_joins_line_leaves_us_out_and_keeps_each_names_colour() -> None:
    # Our own coming is said by the connection lines, as our own `joined` is not shown.
    item = Joins("big", 7, TS, people("bob", "ALICE", "carol"))
    assert plain(item) == f"{STAMP} --> bob (10.0.0.1) and carol (10.0.0.3) joined"
    assert [m.name for m in joins_others(item, "alice")] == ["bob", "carol"]
    assert joins_others(Joins("big", 8, TS, people("Alice")), "alice") == []
    styles = dict((text, sgr) for sgr, text in render(item, ALICE))
    assert styles["bob"] == f"38;5;{name_colour('bob')}"
    # A peer's name and address cannot move the cursor here either.
    line = to_ansi(render(Joins("big", 9, TS, (Member("ev\x1b[2Jil", "\x1b[H"),)), ALICE))
    assert "\x1b[2J" not in line and "\x1b[H" not in line


@pytest.mark.parametrize(("reason", "detail", "shown"), [
    ("leave", "", "left"),
    ("leave", "lunch", "left: lunch"),
    ("timeout", "", "timed out"),
    ("kicked", "spam", "was kicked by the operator: spam"),
    ("shutdown", "", "left: the broker shut down"),
    ("vanished", "", "left [vanished]"),
])
def test_leave_line_says_why(reason: str, detail: str, shown: str) -> None:
    left = Left(4, TS, "bob", "cloak-1a2b", reason, detail=detail)
    assert plain(left) == f"{STAMP} <-- bob (cloak-1a2b) {shown}"


def test_left_event_keeps_detail_from_the_wire() -> None:
    body = {"type": "left", "seq": 4, "ts": TS, "name": "bob", "addr": "x", "reason": "leave",
            "detail": "bye all"}
    event = parse_event(body)
    assert isinstance(event, Left) and event.detail == "bye all"
    assert isinstance(parse_event({**body, "detail": 7}), Left)  # a bad detail is dropped


# ------------------------------------------------------ private, notices


def test_private_lines_say_private_on_both_sides() -> None:
    assert plain(Direct("bob", "psst", TS)) == f"{STAMP} [private from bob] psst"
    assert plain(SentPrivate("bob", "psst", TS)) == f"{STAMP} [private to bob] psst"


def test_operator_notice_and_unknown_event() -> None:
    assert plain(Notice(9, TS, "restart at noon")) == f"{STAMP} -!- notice: restart at noon"
    assert plain(OtherEvent(10, TS, "topic", {})) == f"{STAMP} -!- a topic event (#10)"


@pytest.mark.parametrize(("status", "shown"), [
    (Status("disconnected", "broker unreachable, retrying…"), "broker unreachable, retrying…"),
    (Status("reconnected", "127.0.0.1"), "reconnected"),
    (Status("connected", "127.0.0.1"), "connected (your address: 127.0.0.1)"),
    (Status("closed", "kicked by the operator: spam"),
     "disconnected: kicked by the operator: spam"),
    (Status("missed", "3 events are no longer kept", 3),
     "3 events were lost: the broker no longer keeps them"),
    (Status("history_lost", "x"), "the broker was restarted: the room's history starts afresh"),
])
def test_connection_changes_are_notices(status: Status, shown: str) -> None:
    assert plain(status) == f"{STAMP} -!- {shown}"


def test_who_line_sorts_names_and_marks_me() -> None:
    members = [Member("bob", "10.0.0.2"), Member("alice", "10.0.0.1"), Member("Carl", "c")]
    assert to_plain(who_line(members, ALICE, TS)) == (
        f"{STAMP} -!- 3 here: alice (10.0.0.1, you), bob (10.0.0.2), Carl (c)"
    )


def test_help_lists_every_command() -> None:
    text = "\n".join(to_plain(line) for line in help_lines(ALICE, TS))
    for command in ("/msg NAME TEXT", "/me ACTION", "/who", "/help", "/quit", "Tab", "/names",
                    "/exit [REASON]", "/nick NAME", "/clear", "PageUp / PageDown", "Ctrl-C"):
        assert command in text


@pytest.mark.parametrize(("code", "to", "words"), [
    ("rate_limited", None, "slow down"),
    ("too_large", None, "too long (100 characters)"),
    ("no_such_user", "zed", "nobody called zed is here"),
    ("bad_request", None, "not sent (bad_request: why)"),
])
def test_refusals_are_one_short_line(code: str, to: str | None, words: str) -> None:
    text = refusal(code, "why", "x" * 100, to)
    assert words in text and "\n" not in text and len(text) < 100


# -------------------------------------------------------------------- JSON


@pytest.mark.parametrize(("item", "expected"), [
    (Message(5, TS, "bob", "hi"),
     {"type": "message", "room": "lobby", "seq": 5, "ts": TS, "from": "bob", "text": "hi"}),
    (Message(5, TS, "bob", "hi", "dev"),
     {"type": "message", "room": "dev", "seq": 5, "ts": TS, "from": "bob", "text": "hi"}),
    (Joined(3, TS, "bob", "10.0.0.7", "dev"),
     {"type": "joined", "room": "dev", "seq": 3, "ts": TS, "name": "bob", "addr": "10.0.0.7"}),
    (Joins("big", 6, TS, (Member("bob", "10.0.0.7"), Member("carol", "c"))),
     {"type": "joins", "room": "big", "seq": 6, "ts": TS, "count": 2,
      "members": [{"name": "bob", "addr": "10.0.0.7"}, {"name": "carol", "addr": "c"}]}),
    (Left(4, TS, "bob", "a", "kicked", detail="spam"),
     {"type": "left", "room": "lobby", "seq": 4, "ts": TS, "name": "bob", "addr": "a",
      "reason": "kicked", "detail": "spam"}),
    (Notice(9, TS, "hey"), {"type": "notice", "room": "lobby", "seq": 9, "ts": TS,
                            "text": "hey"}),
    (OtherEvent(10, TS, "poll", {"type": "poll", "poll": "x"}, "ops"),
     {"type": "poll", "room": "ops", "seq": 10, "ts": TS, "poll": "x"}),
    (Direct("bob", "psst", TS),
     {"type": "dm", "from": "bob", "to": "alice", "text": "psst", "ts": TS}),
    (SentPrivate("bob", "psst", TS),
     {"type": "dm", "from": "alice", "to": "bob", "text": "psst", "ts": TS}),
    (Status("missed", "lost", 3),
     {"type": "status", "state": "missed", "detail": "lost", "count": 3}),
])
def test_json_form_of_each_item(item: object, expected: dict[str, object]) -> None:
    body = item_json(item, "alice")  # type: ignore[arg-type]
    assert body == expected
    assert json.loads(json.dumps(body)) == expected


# ---------------------------------------------------------------- commands


@pytest.mark.parametrize(("line", "command"), [
    ("hello", Say("hello")),
    ("  spaced  ", Say("  spaced  ")),
    ("//etc/motd", Say("/etc/motd")),
    ("/me waves", Say("/me waves")),
    ("/ME waves hard", Say("/me waves hard")),
    ("/msg bob psst  there", Private("bob", "psst  there")),
    ("/query bob hi", Private("bob", "hi")),
    ("/query bob", Query("bob")),
    ("/who", Who()),
    ("/names", Who()),
    ("/help", Help()),
    ("/quit", Quit(None)),
    ("/quit gone fishing", Quit("gone fishing")),
    ("/exit", Quit(None)),
    ("", None),
    ("   ", None),
])
def test_parse_line(line: str, command: object) -> None:
    assert parse_line(line) == command


@pytest.mark.parametrize("line", ["/me", "/msg", "/msg bob", "/msg bob   ", "/frobnicate x"])
def test_bad_commands_say_what_to_type(line: str) -> None:
    command = parse_line(line)
    assert isinstance(command, Invalid)
    assert "usage" in command.why or "unknown command /frobnicate" in command.why


def test_tab_completes_names_and_commands() -> None:
    names = ["bob", "Bobby", "alice"]
    assert complete("b", names) == (1, ["bob: ", "Bobby: "])  # addressing at line start
    assert complete("hi B", names) == (1, ["bob ", "Bobby "])
    assert complete("/msg al", names) == (2, ["alice "])
    assert complete("/m", names) == (2, ["/me ", "/mode ", "/msg "])
    assert complete("/qui", names) == (4, ["/quit "])
    assert complete("hi ", names) == (0, [])
    assert complete("zed", names) == (3, [])


# ----------------------------------------------------------------- options


def test_mode_follows_the_terminal_and_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("ZCHAT_NAME", "ZCHAT_CONNECT", "ZCHAT_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    assert parse_options(["--name", "a"], tty=True).interactive
    assert parse_options([], tty=True) == Options(interactive=True, history=20)
    assert not parse_options(["--name", "a"], tty=False).interactive
    assert not parse_options(["--name", "a", "--say", "hi"], tty=True).interactive
    assert parse_options(["--name", "a"], tty=False).history == 0


def test_script_mode_needs_a_name(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ZCHAT_NAME", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_options(["--say", "hi"], tty=False)
    assert exit_info.value.code == 2
    assert "a name is needed" in capsys.readouterr().err


def test_environment_sets_name_and_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZCHAT_NAME", "envname")
    monkeypatch.setenv("ZCHAT_CONNECT", "tcp://10.1.2.3:5555")
    monkeypatch.setenv("ZCHAT_TIMEOUT", "7")
    options = parse_options(["--expect", "bob,carol", "--expect", "dan"], tty=False)
    assert (options.name, options.connect, options.timeout) == (
        "envname", "tcp://10.1.2.3:5555", 7.0)
    assert options.expect == ["bob", "carol", "dan"]
    assert parse_options(["--name", "cli"], tty=False).name == "cli"  # the option wins


# ---------------------------------------------------------------- printable

HARMFUL = ("\x00\x07\x08\n\r\x1b\x7f\x85\x9b\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
           "\u2066\u2067\u2068\u2069\u206a\ufff9\ud800")


@pytest.mark.parametrize("text", [
    "🏳️\u200d🌈", "👩\u200d💻", "👨\u200d👩\u200d👧",
    "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    "soft\xadhyphen",
    "\u05e9\u05dc\u05d5\u05dd\u200f!", "ok\ufe0f", "🏴\U000e0067\U000e0062\U000e0065\U000e006e"
    "\U000e0067\U000e007f", "\u00a0nbsp\u3000wide", "e\u0301",
])
def test_printable_shows_joiners_emoji_and_scripts_as_written(text: str) -> None:
    assert printable(text) == text


def test_printable_shows_tabs_as_spaces_and_escapes_controls() -> None:
    assert printable("a\tb") == "a    b"
    assert printable("\x1b[2Jx") == "\\x1b[2Jx"
    assert printable("\x9b31m") == "\\x9b31m"
    assert printable("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert printable("one\u2028two\ntwo\rthree") == "one\\u2028two\\ntwo\\rthree"


@given(st.text(alphabet=st.characters(codec=None) | st.sampled_from(HARMFUL)))
def test_printable_leaves_nothing_harmful(text: str) -> None:
    shown = printable(text)
    assert not any(char in HARMFUL or char == "\t" for char in shown)
    assert not any(ord(char) < 0x20 or 0x7f <= ord(char) <= 0x9f for char in shown)
    shown.encode("utf-8")  # a terminal can always be given it


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"),
                                      blacklist_characters="\u202a\u202b\u202c\u202d\u202e"
                                      "\u2066\u2067\u2068\u2069\u206a\u206b\u206c\u206d\u206e"
                                      "\u206f\ufff9\ufffa\ufffb")))
def test_printable_changes_nothing_harmless(text: str) -> None:
    assert printable(text) == text


def test_names_have_more_than_sixteen_colours() -> None:
    assert len(PALETTE) > 16
    assert all(16 <= c <= 231 for c in PALETTE)
    colours = {name_colour(f"user{n}") for n in range(400)}
    assert len(colours) > 40


# ------------------------------------------- days, wrapping, bell, pending


def test_lines_from_another_day_show_their_date() -> None:
    day = time.strftime("%Y-%m-%d", time.localtime(TS))
    later = TS + 3 * 86400
    assert to_plain(render(Message(5, TS, "bob", "old"), ALICE, later)) == \
        f"{day} {STAMP} <bob> old"
    assert to_plain(render(Message(5, later, "bob", "new"), ALICE, later)).startswith(
        time.strftime("%H:%M <bob>", time.localtime(later)))


def test_wrapped_lines_are_indented_under_the_text() -> None:
    text = " ".join(f"word{n}" for n in range(30))
    lines = wrap(render(Message(5, TS, "bob", text), ALICE, TS), 40)
    shown = [to_plain(line) for line in lines]
    assert len(shown) > 3 and all(len(line) < 40 for line in shown)
    indent = len(f"{STAMP} <bob> ")
    assert all(line.startswith(" " * indent) and line[indent] != " " for line in shown[1:])
    assert " ".join(line.strip() for line in shown) == f"{STAMP} <bob> {text}"
    # A word longer than a line is cut; wide characters count two columns.
    long = wrap(render(Message(5, TS, "bob", "字" * 50), ALICE, TS), 40)
    assert all(width(to_plain(line)) < 40 for line in long)
    assert "".join(to_plain(line).strip() for line in long).count("字") == 50
    short = render(Message(5, TS, "bob", "short"), ALICE, TS)
    assert wrap(short, 40) == [short]


def test_private_messages_and_mentions_ring_the_bell() -> None:
    assert wants_attention(Direct("bob", "psst", TS), "alice")
    assert wants_attention(Message(5, TS, "bob", "alice: lunch?"), "alice")
    assert not wants_attention(Message(5, TS, "bob", "malice"), "alice")
    assert not wants_attention(Message(5, TS, "Alice", "alice here"), "alice")


def test_pending_lines_are_marked() -> None:
    assert to_plain(pending_line("hi", None, ALICE)) == "(pending) <alice> hi"
    assert to_plain(pending_line("/me waves", None, ALICE)) == "(pending) * alice waves"
    assert to_plain(pending_line("psst", "bob", ALICE)) == "(pending) [private to bob] psst"


def test_nick_and_clear_are_commands() -> None:
    assert parse_line("/nick bob") == Nick("bob")
    assert isinstance(parse_line("/nick"), Invalid)
    assert parse_line("/clear") == Clear()
    assert parse_line("/exit bye") == Quit("bye")
    assert parse_line("/names") == Who()

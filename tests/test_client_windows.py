"""The terminal client's rooms, pure: commands, windows, the status line, Tab.

irssi is the model: one window per room, per correspondent, and the status
window; activity markers for unread lines and mentions; Alt-N, Ctrl-N and
Ctrl-P switch. No sockets, no terminal.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zchat import (
    ClientStatus,
    Invited,
    Left,
    Member,
    ModeChanged,
    Status,
    TopicChanged,
)
from zchat.clients.commands import (
    CloseWindow,
    Invalid,
    Invite,
    JoinRoom,
    Kick,
    ListRooms,
    Mode,
    PartRoom,
    RoomAction,
    Topic,
    Who,
    Window,
    complete,
    parse_line,
    room_name,
)
from zchat.clients.render import (
    View,
    entered_line,
    invited_line,
    item_json,
    mode_line,
    render,
    room_lines,
    to_plain,
    topic_line,
    who_line,
)
from zchat.clients.windows import Kind, Windows, status_line


@pytest.mark.parametrize(("line", "command"), [
    ("/join #dev", JoinRoom("dev")),
    ("/j Dev", JoinRoom("dev")),
    ("/JOIN #Ops.2", JoinRoom("ops.2")),
    ("/join -private #secret", JoinRoom("secret", private=True)),
    ("/part", PartRoom(None, None)),
    ("/part #dev", PartRoom("dev", None)),
    ("/part #dev gone home", PartRoom("dev", "gone home")),
    ("/part gone home", PartRoom(None, "gone home")),
    ("/list", ListRooms()),
    ("/topic", Topic(None)),
    ("/topic release on friday", Topic("release on friday")),
    ("/names", Who()),
    ("/invite bob", Invite("bob", None)),
    ("/invite bob #secret", Invite("bob", "secret")),
    ("/kick bob", Kick("bob", None)),
    ("/kick bob too loud", Kick("bob", "too loud")),
    ("/ban bob", RoomAction("ban", "bob")),
    ("/unban bob", RoomAction("unban", "bob")),
    ("/op bob", RoomAction("op", "bob")),
    ("/deop bob", RoomAction("deop", "bob")),
    ("/mode +p", Mode({"private": True})),
    ("/mode -p", Mode({"private": False})),
    ("/mode +m", Mode({"moderated": True})),
    ("/mode -m", Mode({"moderated": False})),
    ("/mode +t", Mode({"topic_ops": True})),
    ("/mode -t", Mode({"topic_ops": False})),
    ("/mode +pm-t", Mode({"private": True, "moderated": True, "topic_ops": False})),
    ("/mode +p -m", Mode({"private": True, "moderated": False})),
    ("/window 3", Window(3)),
    ("/win next", Window(step=1)),
    ("/window prev", Window(step=-1)),
    ("/wc", CloseWindow()),
])
def test_room_commands(line: str, command: object) -> None:
    assert parse_line(line) == command


@pytest.mark.parametrize(("line", "says"), [
    ("/join", "usage: /join"),
    ("/join #a b", "usage: /join"),
    ("/join #no!", "cannot be a room"),
    ("/join #", "cannot be a room"),
    ("/part #-x", "cannot be a room"),
    ("/kick", "usage: /kick"),
    ("/op", "usage: /op"),
    ("/ban a b", "usage: /ban"),
    ("/mode", "usage: /mode"),
    ("/mode +x", "no mode 'x'"),
    ("/mode p", "usage: /mode"),
    ("/invite", "usage: /invite"),
    ("/window 0", "usage: /window"),
])
def test_bad_room_commands_say_what_to_type(line: str, says: str) -> None:
    command = parse_line(line)
    assert isinstance(command, Invalid)
    assert says in command.why


def test_room_names_fold_as_the_broker_folds() -> None:
    assert room_name("#Dev") == "dev"
    assert room_name("ops") == "ops"
    with pytest.raises(ValueError):
        room_name("#d\u212aev")  # the Kelvin sign is not a k


def test_tab_completes_room_names() -> None:
    rooms = ["dev", "design", "ops"]
    assert complete("see #d", ["dave"], rooms) == (2, ["#design ", "#dev "])
    assert complete("#o", [], rooms) == (2, ["#ops "])
    assert complete("/join de", [], rooms) == (2, ["#design ", "#dev "])
    assert complete("/part ", [], rooms) == (0, ["#design ", "#dev ", "#ops "])
    assert complete("/invite bob #o", ["bob"], rooms) == (2, ["#ops "])
    assert complete("/invite b", ["bob"], rooms) == (1, ["bob "])  # a name first
    assert complete("d", ["dave"], rooms) == (1, ["dave: "])  # names stay names
    assert complete("/jo", [], rooms) == (3, ["/join "])


# ----------------------------------------------------------------- windows


def line(text: str) -> tuple[tuple[str, str], ...]:
    return (("", text),)


def test_status_window_is_first_and_rooms_open_in_order() -> None:
    windows = Windows()
    lobby, dev = windows.room("lobby"), windows.room("dev")
    assert [w.label for w in windows.all] == ["status", "#lobby", "#dev"]
    assert windows.room("dev") is dev  # opened once
    assert windows.number(lobby) == 2
    assert windows.rooms == ["lobby", "dev"]
    assert windows.current is windows.status


def test_lines_for_another_window_are_activity_until_seen() -> None:
    windows = Windows()
    lobby, dev = windows.room("lobby"), windows.room("dev")
    windows.go(lobby)
    assert windows.add(lobby, [line("here")]) is True  # current: shown now
    assert windows.add(dev, [line("a"), line("b")]) is False
    assert (dev.unread, dev.mention) == (2, False)
    windows.add(dev, [line("carol: hi")], mention=True)
    assert (dev.unread, dev.mention) == (3, True)
    assert lobby.unread == 0
    windows.go(dev)
    assert (dev.unread, dev.mention) == (0, False)
    assert [to_plain(kept) for kept in dev.lines] == ["a", "b", "carol: hi"]


def test_private_messages_get_a_window_per_person() -> None:
    windows = Windows()
    bob = windows.query("Bob")
    assert windows.query("bob") is bob  # names compare as the broker's do
    assert bob.kind == Kind.QUERY and bob.label == "Bob"
    assert windows.find(Kind.QUERY, "BOB") is bob
    assert windows.find(Kind.ROOM, "bob") is None


def test_switching_by_number_and_round_the_ends() -> None:
    windows = Windows()
    lobby, dev, ops = windows.room("lobby"), windows.room("dev"), windows.room("ops")
    assert windows.go_number(3) is dev
    assert windows.go_number(9) is None and windows.current is dev
    assert windows.step(1) is ops
    assert windows.step(1) is windows.status  # past the last: the first
    assert windows.step(-1) is ops
    assert windows.step(-1) is dev
    assert windows.step(-1) is lobby


def test_closing_a_window_goes_to_the_one_before() -> None:
    windows = Windows()
    lobby, dev, ops = windows.room("lobby"), windows.room("dev"), windows.room("ops")
    windows.go(dev)
    assert windows.close(dev) is lobby
    assert windows.number(ops) == 3  # renumbered
    assert windows.close(windows.status) is lobby  # the status window stays
    assert len(windows.all) == 3


def test_status_line_shows_windows_activity_mentions_and_topic() -> None:
    windows = Windows()
    lobby, dev = windows.room("lobby"), windows.room("dev")
    bob = windows.query("bob")
    windows.go(dev)
    dev.topic = "release on friday"
    windows.add(lobby, [line("x")] * 4)
    windows.add(bob, [line("psst")], mention=True)
    text = to_plain(status_line(windows))
    assert text == "[3:#dev] 1:status 2:#lobby+4 4:bob+1!  #dev: release on friday"
    styles = dict((t, s) for s, t in status_line(windows))
    assert styles["4:bob+1!"] != styles["2:#lobby+4"] != styles["1:status"]


def test_status_line_of_a_room_we_were_put_out_of() -> None:
    windows = Windows()
    dev = windows.go(windows.room("dev"))
    dev.joined = False
    assert to_plain(status_line(windows)).endswith("(not in #dev: /join #dev)")


def test_a_long_topic_is_cut_and_cannot_move_the_cursor() -> None:
    windows = Windows()
    dev = windows.go(windows.room("dev"))
    dev.topic = "\x1b[2J" + "x" * 200
    text = to_plain(status_line(windows))
    assert "\x1b" not in text and text.endswith("…") and len(text) < 100


# ------------------------------------------------------------ room lines

TS = 1_700_000_000.0
ME = View("alice")


def plain(line_: tuple[tuple[str, str], ...]) -> str:
    return to_plain(line_).split(" ", 1)[1]  # without the time column


def test_topic_and_mode_lines_say_who_did_what() -> None:
    assert plain(topic_line("dev", "bob", "release on friday", TS, ME, TS)) == \
        "-!- bob changed the topic of #dev to: release on friday"
    assert plain(topic_line("dev", "bob", "", TS, ME, TS)) == "-!- bob cleared the topic of #dev"
    assert plain(mode_line("dev", "bob", {"private": True, "moderated": False}, TS, ME, TS)) == \
        "-!- mode/#dev [+p -m] by bob (private (invite only), not moderated)"
    assert plain(mode_line("dev", "*", {"op": "carol"}, TS, ME, TS)) == \
        "-!- mode/#dev [+o carol] by the broker's operator (operator: carol)"
    assert plain(mode_line("dev", "bob", {"ban": "eve"}, TS, ME, TS)).startswith(
        "-!- mode/#dev [+b eve] by bob")


def test_invitation_list_and_entering_lines() -> None:
    assert plain(invited_line("secret", "bob", TS, ME)) == \
        "-!- bob invites you to #secret: /join #secret"
    lines = [plain(x) for x in room_lines([("lobby", 3, "", False), ("dev", 2, "hi", True)],
                                          ME, TS)]
    assert lines[0] == "-!- 2 rooms:"
    assert lines[1].split() == ["-!-", "#dev", "2", "private", "hi"]
    assert lines[2].split() == ["-!-", "#lobby", "3"]
    assert plain(entered_line("dev", "friday", {"private": True}, TS, ME)) == \
        "-!- you are in #dev (private (invite only)); topic: friday"


def test_who_line_marks_operators_and_names_the_room() -> None:
    members = [Member("bob", "10.0.0.7"), Member("alice", "10.0.0.8")]
    assert plain(who_line(members, ME, TS, ops=["Bob"], room="dev", count=5)) == \
        "-!- 5 in #dev (the first 2): alice (10.0.0.8, you), @bob (10.0.0.7)"


def test_status_about_one_room_names_it() -> None:
    lost = Status(ClientStatus.MISSED, "", 3, "dev")
    assert plain(render(lost, ME, TS)) == \
        "-!- 3 events in #dev were lost: the broker no longer keeps them"
    refused = Status(ClientStatus.REFUSED, "cannot enter #dev again: forbidden", 0, "dev")
    assert plain(render(refused, ME, TS)) == "-!- cannot enter #dev again: forbidden"
    assert item_json(refused, "alice") == {"type": "status", "state": "refused", "room": "dev",
                                           "detail": "cannot enter #dev again: forbidden"}


def test_room_events_render_from_the_library_classes() -> None:
    assert plain(render(TopicChanged("dev", 4, TS, "bob", "friday"), ME, TS)) == \
        "-!- bob changed the topic of #dev to: friday"
    assert plain(render(ModeChanged("dev", 5, TS, "bob", moderated=True), ME, TS)) == \
        "-!- mode/#dev [+m] by bob (moderated)"
    assert plain(render(Invited("dev", "bob"), ME, TS)) == \
        "-!- bob invites you to #dev: /join #dev"
    kicked = Left(6, TS, "eve", "1.2.3.4", "kicked", "dev", "spam", by="bob")
    assert plain(render(kicked, ME, TS)) == "<-- eve (1.2.3.4) was kicked by bob: spam"
    assert item_json(kicked, "alice")["by"] == "bob"
    assert item_json(ModeChanged("dev", 5, TS, "bob", op="cy"), "alice") == {
        "type": "mode", "room": "dev", "seq": 5, "ts": TS, "name": "bob", "op": "cy"}
    assert item_json(Invited("dev", "bob"), "alice") == {
        "type": "invited", "room": "dev", "from": "bob"}


@given(st.text(max_size=80), st.sampled_from(["", "/", "/join ", "/mode ", "/part #", "/win "]))
def test_any_typed_line_is_a_command_or_says_what_to_type(text: str, prefix: str) -> None:
    command = parse_line(prefix + text)  # never raises
    if isinstance(command, JoinRoom):
        assert room_name(command.room) == command.room  # only valid, folded names go out


@given(st.lists(st.sampled_from(["room", "query", "go", "step", "close", "add"]), max_size=40),
       st.lists(st.integers(0, 5), min_size=40, max_size=40))
def test_windows_stay_consistent(actions: list[str], numbers: list[int]) -> None:
    windows = Windows()
    for action, n in zip(actions, numbers, strict=False):
        if action == "room":
            windows.room(f"r{n}")
        elif action == "query":
            windows.query(f"p{n}")
        elif action == "go":
            windows.go_number(n + 1)
        elif action == "step":
            windows.step(1 if n % 2 else -1)
        elif action == "close":
            windows.close(windows.all[n % len(windows.all)])
        else:
            windows.add(windows.all[n % len(windows.all)], [line("x")], mention=n == 0)
        assert windows.all[0] is windows.status and windows.current in windows.all
        assert windows.current.unread == 0 and not windows.current.mention
        keys = [(w.kind, w.key) for w in windows.all]
        assert len(keys) == len(set(keys))

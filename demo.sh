#!/usr/bin/env bash
# Try zchat on this machine: a broker on loopback, two chatty bots (greeter
# and helper) in two rooms (lobby and dev), and you in the terminal client,
# a window for each room. Everything it starts is stopped when you leave the
# chat (/quit, Ctrl-D or Ctrl-C).
#
#   ./demo.sh [NAME]          NAME defaults to $USER
#   ./demo.sh --check         set up, say which Python and zchat it would run, stop
#
# It always runs the code of the checkout it is in, never another zchat
# installed on the machine (even of the same version): it uses its own
# virtual environment, .venv in this folder, with this checkout installed
# editable (made on the first run: pip install -e ., quietly), and checks
# that every zchat module it imports comes from this folder. PYTHON=...
# picks the Python that makes .venv (3.11 or newer; default python3), or is
# used as it is if its zchat already is this checkout.
# ZCHAT_DEMO_PORTS="IN BCAST CTRL" sets the broker's loopback ports (default
# 5555 5556 5557, or free ones when those are taken).
#
# The whole script is one function, read before it runs, so editing or
# pulling this file while a demo is running cannot change what it does.
set -euo pipefail

work=""
pids=()

cleanup() {
    trap - EXIT INT TERM HUP
    # Stop what we started, by pid, newest first: the bots leave, then the broker stops.
    local i
    for (( i=${#pids[@]}-1; i>=0; i-- )); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    if [ -n "$work" ]; then rm -rf "$work"; fi
}

# wait_for FILE TEXT PID: until FILE contains TEXT (10 s at most); fail if PID ends first.
wait_for() {
    local _
    for _ in $(seq 100); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# runs_here PYTHON: does PYTHON import all of zchat from this checkout ($here)?
# It prints where each part comes from, or what is wrong. -I (isolated): no
# PYTHONPATH, user site or current folder can put another zchat first.
runs_here() {
    "$1" -I - "$here" <<'EOF' 2>&1
import importlib, os, sys
here = sys.argv[1]
parts = ["zchat", "zchat.broker.main", "zchat.clients.bots", "zchat.clients.terminal",
         "zchat.clients.interactive"]
try:
    files = [os.path.realpath(importlib.import_module(part).__file__) for part in parts]
except Exception as exc:
    sys.exit(f"zchat cannot be imported: {exc}")
elsewhere = [f for f in files if os.path.commonpath([here, f]) != here]
if elsewhere:
    sys.exit(f"its zchat is not this checkout's: {elsewhere[0]}")
print(f"zchat from {os.path.dirname(files[0])} (python {sys.executable})")
EOF
}

# make_venv: .venv in this checkout, with this checkout installed editable.
make_venv() {
    local venv=$here/.venv log
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "demo: zchat needs Python 3.11 or newer ($base: $("$base" -V 2>&1 || true))" >&2
            exit 1
        fi
        echo "demo: making a virtual environment for this checkout in $venv"
        if ! "$base" -m venv --clear "$venv"; then
            echo "demo: $base cannot make a virtual environment; on Debian or Ubuntu:" \
                 "sudo apt install python3-venv" >&2
            exit 1
        fi
    fi
    echo "demo: installing this checkout into it (pip install -e .)…"
    log=$(mktemp)
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$here" \
            >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
}

# start_broker INPUT BROADCAST CONTROL (ports; 0 picks free ones)
start_broker() {
    # The room's history lives in the demo's own directory, not in ~/.local/state.
    ZCHAT_DATA_DIR="$work" "$py" -I -m zchat.broker.main --quiet \
        --input "tcp://127.0.0.1:$1" --broadcast "tcp://127.0.0.1:$2" \
        --control "tcp://127.0.0.1:$3" >"$work/broker.out" 2>"$work/broker.log" &
    local pid=$!
    if wait_for "$work/broker.out" "listening" "$pid"; then
        pids+=("$pid")
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

main() {
    cd "$(dirname "$0")"
    here=$(pwd -P)
    local check=0
    if [ "${1:-}" = --check ]; then check=1; shift; fi
    local name=${1:-${USER:-guest}}
    base=${PYTHON:-python3}

    # PYTHON as it is if it already runs this checkout, else this checkout's .venv.
    local origin
    if [ -n "${PYTHON:-}" ] && origin=$(runs_here "$PYTHON"); then
        py=$("$PYTHON" -I -c 'import sys; print(sys.executable)')
    else
        py=$here/.venv/bin/python
        if ! origin=$(runs_here "$py"); then
            make_venv
            if ! origin=$(runs_here "$py"); then
                echo "demo: $py does not run this checkout: $origin" >&2
                exit 1
            fi
        fi
    fi

    # How to run the client from another terminal, from any folder.
    local client_command
    if [ -x "$(dirname "$py")/zchat-client" ]; then
        client_command=$(printf '%q' "$(dirname "$py")/zchat-client")
    else
        client_command="$(printf '%q' "$py") -I -m zchat.clients.terminal"
    fi
    if [ "$check" = 1 ]; then
        echo "demo: $origin"
        echo "demo: from another terminal: $client_command --name bob"
        exit 0
    fi

    work=$(mktemp -d "${TMPDIR:-/tmp}/zchat-demo.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM HUP

    # The usual ports if they are free (others then join with the defaults), else any.
    # ZCHAT_DEMO_PORTS="0 0 0" asks for free ones at once (the tests do).
    # shellcheck disable=SC2086
    if ! start_broker ${ZCHAT_DEMO_PORTS:-5555 5556 5557} && ! start_broker 0 0 0; then
        echo "demo: the broker did not start:" >&2
        cat "$work/broker.log" >&2
        exit 1
    fi
    local endpoint
    endpoint=$(sed -n 's/.*input=\([^ ]*\).*/\1/p' "$work/broker.out")

    # helper first, so that the greeter finds it there and greets only you.
    local bot
    for bot in helper greeter; do
        "$py" -I -m zchat.clients.bots "$bot" --connect "$endpoint" --join lobby,dev \
            >"$work/$bot.log" 2>&1 &
        pids+=($!)
        if ! wait_for "$work/$bot.log" "$bot: joined" "${pids[-1]}"; then
            echo "demo: the $bot bot did not start:" >&2
            cat "$work/$bot.log" >&2
            exit 1
        fi
    done

    local connect_hint=""
    if [ "$endpoint" != "tcp://127.0.0.1:5555" ]; then connect_hint=" --connect $endpoint"; fi
    cat <<EOF
zchat demo: a broker at $endpoint, with two bots in the rooms #lobby and #dev:
  greeter  welcomes whoever joins
  helper   answers !help, !time, !echo TEXT, !roll and !who (in private too: /msg helper !time)
You are in both rooms, a window each: Alt-1..3 or Ctrl-N/Ctrl-P switch (1 is the status
window); /join #room makes a room, /join -private #room one only your /invite opens.
From another terminal, join as someone else:  $client_command --name bob$connect_hint
Leave with /quit, Ctrl-D or Ctrl-C; the broker and the bots stop with you.

EOF
    local status=0
    "$py" -I -m zchat.clients.terminal --name "$name" --connect "$endpoint" --join lobby,dev \
        || status=$?
    exit "$status"
}

main "$@"

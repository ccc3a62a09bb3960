#!/usr/bin/env bash
# Try zchat on this machine: a broker on loopback, two chatty bots (greeter
# and helper), and you in the terminal client. Everything it starts is
# stopped when you leave the chat (/quit, Ctrl-D or Ctrl-C).
#
#   ./demo.sh [NAME]        NAME defaults to $USER
#
# It installs zchat (pip install -e ., quietly) only when it is missing or
# older than this checkout; when the system Python refuses (PEP 668), it
# uses a virtual environment in .venv instead. PYTHON=... picks the Python;
# ZCHAT_DEMO_PORTS="IN BCAST CTRL" the broker's loopback ports (default
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

# installed PYTHON VERSION: zchat VERSION and all its parts importable?
installed() {
    "$1" - "$2" <<'EOF' 2>/dev/null
import importlib.metadata, sys
import zchat.clients.bots, zchat.clients.interactive  # noqa: F401  (all parts importable)
sys.exit(importlib.metadata.version("zchat") != sys.argv[1])
EOF
}

# start_broker INPUT BROADCAST CONTROL (ports; 0 picks free ones)
start_broker() {
    # The room's history lives in the demo's own directory, not in ~/.local/state.
    ZCHAT_DATA_DIR="$work" "$py" -m zchat.broker.main --quiet \
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
    local name=${1:-${USER:-guest}}
    py=${PYTHON:-python3}
    if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi

    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "demo: zchat needs Python 3.11 or newer ($py: $("$py" -V 2>&1 || true))" >&2
        exit 1
    fi

    local wanted
    wanted=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
    if ! installed "$py" "$wanted"; then
        echo "demo: installing zchat $wanted (pip install -e .)…"
        local log
        log=$(mktemp)
        if ! "$py" -m pip install -q --disable-pip-version-check -e . >"$log" 2>&1; then
            if grep -q externally-managed "$log"; then
                echo "demo: the system Python is externally managed; using a virtualenv in .venv"
                "$py" -m venv .venv
                py=.venv/bin/python
                "$py" -m pip install -q --disable-pip-version-check -e .
            else
                cat "$log" >&2
                rm -f "$log"
                exit 1
            fi
        fi
        rm -f "$log"
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
        "$py" -m zchat.clients.bots "$bot" --connect "$endpoint" >"$work/$bot.log" 2>&1 &
        pids+=($!)
        if ! wait_for "$work/$bot.log" "$bot: joined" "${pids[-1]}"; then
            echo "demo: the $bot bot did not start:" >&2
            cat "$work/$bot.log" >&2
            exit 1
        fi
    done

    # How to run the client from another terminal: by name if that is this install's.
    local bindir client_command=zchat-client connect_hint=""
    bindir=$(dirname "$(command -v "$py")")
    if [ -x "$bindir/zchat-client" ] &&
       [ "$(command -v zchat-client || true)" != "$bindir/zchat-client" ]; then
        client_command="$bindir/zchat-client"
    fi
    if [ "$endpoint" != "tcp://127.0.0.1:5555" ]; then connect_hint=" --connect $endpoint"; fi
    cat <<EOF
zchat demo: a broker at $endpoint, with two bots in the room:
  greeter  welcomes whoever joins
  helper   answers !help, !time, !echo TEXT, !roll and !who (in private too: /msg helper !time)
From another terminal, join as someone else:  $client_command --name bob$connect_hint
Leave with /quit, Ctrl-D or Ctrl-C; the broker and the bots stop with you.

EOF
    local status=0
    "$py" -m zchat.clients.terminal --name "$name" --connect "$endpoint" || status=$?
    exit "$status"
}

main "$@"

"""What zchat-web costs: a browser session through the gateway against a library client.

``python -m zchat.bench.web [--sessions N] [--messages M]`` starts a broker
(rates off, history in memory) and a ``zchat-web`` on loopback, then measures
in one run, so the ratios hold on a shared machine:

- **sessions held**: N WebSocket sessions through the gateway (this process
  speaks the page's protocol), against N ``AsyncClient``s in one child
  process; the RSS each process grew by, per session;
- **messages/s**: one sender and one receiver, M messages with at most
  ``--window`` unacked, through the gateway (sender tab -> gateway ->
  broker -> gateway -> receiver tab) against two library clients, from
  the first send to the last message received.

It prints one table row per measure and, with ``--json FILE``, the numbers.
Run it under ``flock /work/notes/heavy.lock`` on a shared machine.

Defines ``main`` (and ``hold``, the child that holds library clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from zchat.client import AsyncClient
from zchat.protocol import Message

__all__ = ["hold", "main"]

WAIT = 60.0


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for {pid}")


def _start(argv: list[str], pattern: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(pattern, line)
    if match is None:
        proc.kill()
        raise OSError(f"did not start: {argv[2]}: {line!r}")
    return proc, match.group(1)


async def _frames(ws: ClientConnection) -> list[dict[str, Any]]:
    """The messages of the next frame (a busy gateway sends an array of them)."""
    body = json.loads(await ws.recv())
    return body if isinstance(body, list) else [body]


async def _hello(ws: ClientConnection, name: str) -> None:
    await ws.send(json.dumps({"type": "hello", "name": name}))
    while not any(m["type"] == "welcome" for m in await _frames(ws)):
        pass


async def _drain(ws: ClientConnection) -> None:
    try:
        async for _ in ws:
            pass
    except Exception:
        pass  # closed: nothing more to read


async def gateway_sessions(url: str, pid: int, count: int) -> float:
    """KiB of gateway RSS per WebSocket session, for ``count`` sessions held."""
    before = rss_kib(pid)
    sockets = []
    readers = []
    for n in range(count):
        ws = await connect(url)
        await _hello(ws, f"tab{n}")
        sockets.append(ws)
        readers.append(asyncio.create_task(_drain(ws)))  # joins of later tabs, read
    after = rss_kib(pid)
    for ws in sockets:
        await ws.send(json.dumps({"type": "leave"}))
        await ws.close()
    await asyncio.gather(*readers)
    return (after - before) / count


def direct_sessions(upstream: str, count: int) -> float:
    """KiB of RSS per library client, ``count`` held by one child process."""
    child = subprocess.run([sys.executable, "-m", "zchat.bench.web", "--hold", str(count),
                            "--upstream", upstream], capture_output=True, text=True,
                           timeout=600, check=True)
    before, after = (int(x) for x in child.stdout.split())
    return (after - before) / count


async def _hold(upstream: str, count: int) -> None:
    before = rss_kib(os.getpid())
    clients = [AsyncClient(upstream, f"lib{n}") for n in range(count)]
    for client in clients:
        await client.connect()
    after = rss_kib(os.getpid())
    for client in clients:
        await client.leave()
    print(before, after)


def hold(upstream: str, count: int) -> None:
    """The child of ``direct_sessions``: hold ``count`` clients, print RSS before and after."""
    asyncio.run(_hold(upstream, count))


async def gateway_rate(url: str, messages: int, window: int) -> float:
    """Messages/s from one tab to another through the gateway."""
    async with connect(url) as sender, connect(url) as receiver:
        await _hello(receiver, "sink")
        await _hello(sender, "source")
        started = time.monotonic()
        acked = asyncio.Semaphore(window)

        async def acks() -> None:
            while True:
                for body in await _frames(sender):
                    if body["type"] == "ack":
                        acked.release()

        reading = asyncio.create_task(acks())
        heard = 0

        async def listen() -> None:
            nonlocal heard
            while heard < messages:
                for body in await _frames(receiver):
                    item = body.get("item", {})
                    if body["type"] == "item" and item.get("type") == "message" \
                            and item.get("from") == "source":
                        heard += 1

        listening = asyncio.create_task(listen())
        for n in range(messages):
            await acked.acquire()
            await sender.send(json.dumps({"type": "say", "id": str(n), "text": f"m{n}"}))
        await asyncio.wait_for(listening, WAIT)
        elapsed = time.monotonic() - started
        reading.cancel()
        return messages / elapsed


async def direct_rate(upstream: str, messages: int, window: int) -> float:
    """Messages/s between two library clients (the same shape, no gateway)."""
    async with AsyncClient(upstream, "dsink") as sink, AsyncClient(upstream, "dsource") as source:
        started = time.monotonic()
        pending: set[asyncio.Task[int]] = set()
        heard = 0

        async def listen() -> None:
            nonlocal heard
            async for item in sink.events():
                if isinstance(item, Message) and item.sender == "dsource":
                    heard += 1
                    if heard == messages:
                        return

        listening = asyncio.create_task(listen())
        for n in range(messages):
            if len(pending) >= window:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            pending.add(asyncio.create_task(source.send(f"m{n}")))
        await asyncio.wait_for(listening, WAIT)
        elapsed = time.monotonic() - started
        await asyncio.gather(*pending)
        return messages / elapsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zchat.bench.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hold:
        hold(args.upstream, args.hold)
        return 0
    broker, upstream = _start(
        [sys.executable, "-m", "zchat.broker.main", "--input", "tcp://127.0.0.1:0",
         "--broadcast", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0", "--db", ":memory:",
         "--rate", "0", "--announce-max", "0"], r"input=(\S+)")
    gateway, url = _start(
        [sys.executable, "-m", "zchat.web.server", "--upstream", upstream, "--listen",
         "127.0.0.1:0", "--rate", "0", "--max-per-address", str(args.sessions + 10),
         "--max-sessions", str(args.sessions + 10)], r"serving (\S+) ")
    ws_url = url.replace("http", "ws", 1) + "ws"
    try:
        results: dict[str, Any] = {"sessions": args.sessions, "messages": args.messages,
                                   "window": args.window}
        results["gateway_kib_per_session"] = asyncio.run(
            gateway_sessions(ws_url, gateway.pid, args.sessions))
        results["direct_kib_per_session"] = direct_sessions(upstream, args.sessions)
        results["gateway_msgs_per_s"] = asyncio.run(
            gateway_rate(ws_url, args.messages, args.window))
        results["direct_msgs_per_s"] = asyncio.run(
            direct_rate(upstream, args.messages, args.window))
    finally:
        for proc in (gateway, broker):
            proc.terminate()
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()
    g, d = results["gateway_kib_per_session"], results["direct_kib_per_session"]
    gr, dr = results["gateway_msgs_per_s"], results["direct_msgs_per_s"]
    print("| measure | through zchat-web | library client | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| RSS per session ({args.sessions} held) | {g:.0f} KiB | {d:.0f} KiB | "
          f"{g / d if d else float('nan'):.2f} |")
    print(f"| messages/s, one sender to one receiver ({args.messages}) | {gr:.0f} | {dr:.0f} | "
          f"{gr / dr if dr else float('nan'):.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

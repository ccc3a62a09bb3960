"""zchat-bench: its wire shortcuts are exact, and one tiny real run works.

Benchmarks are not tests: nothing here asserts a speed. The pure tests check
that the load generator counts and stamps messages the way it claims (a
miscount would make every figure wrong); the real one runs ``python -m
zchat.bench --quick`` against real systems and checks that every system
produced figures in the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest

from zchat.bench.report import markdown, summarize, tables
from zchat.bench.systems import cpu_seconds
from zchat.bench.wire import (
    MESSAGE_MARK,
    LengthPrefixReader,
    MessageTemplate,
    StreamCounter,
    ZmtpReader,
    greeting,
    lp_frame,
    pack,
    ready,
    zmtp_frame,
)


def _event(seq: int, text: str) -> bytes:
    # The map zchat's broker publishes, keys in its order.
    return pack({"type": "message", "room": "lobby", "seq": seq, "ts": time.time(),
                 "from": "alice", "text": text})


def test_counter_counts_every_message_whatever_the_read_sizes() -> None:
    stream = b"".join(
        zmtp_frame(b"lobby\x00", more=True) + zmtp_frame(_event(seq, "@1.5 " + "x" * 95))
        for seq in range(1, 301)
    )
    # Joined events and heartbeats are not chat messages and must not count.
    stream += zmtp_frame(b"lobby\x00", more=True) + zmtp_frame(
        pack({"type": "joined", "room": "lobby", "seq": 301, "name": "bob", "addr": "x"}))
    for size in (1, 5, 12, 13, 14, 97, 1000, len(stream)):
        counter = StreamCounter()
        for start in range(0, len(stream), size):
            counter.feed(stream[start:start + size])
        assert counter.count == 300, size


def test_sampled_latency_is_now_minus_the_stamp_in_the_text() -> None:
    template = MessageTemplate.build(lambda text, rid: lp_frame(_event(7, text)))
    counter = StreamCounter(sample=True)
    counter.feed(template.batch(3, 1700000000.25), now=1700000000.75)
    assert counter.count == 3
    assert counter.latencies == [0.5]


def test_templates_make_distinct_decodable_frames() -> None:
    template = MessageTemplate.build(
        lambda text, rid: zmtp_frame(pack({"type": "message", "id": rid, "text": text})),
        ids=4,
    )
    reader = ZmtpReader()
    peer = greeting() + ready("ROUTER")
    messages = reader.feed(peer + template.batch(6, 1234567890.5))
    assert reader.ready
    bodies = [msgpack.unpackb(parts[0]) for parts in messages]
    assert [b["id"] for b in bodies] == ["00000000", "00000001", "00000002", "00000003",
                                         "00000000", "00000001"]
    for body in bodies:
        assert body["type"] == "message"
        assert len(body["text"]) == 100
        assert body["text"].startswith("@1234567890.500000 ")
    assert len(template.batch(1, 1.0e9)) == template.size


def test_length_prefix_reader_splits_frames_across_reads() -> None:
    frames = [pack({"type": "pong", "n": n}) for n in range(20)]
    stream = b"".join(lp_frame(f) for f in frames)
    reader = LengthPrefixReader()
    got = []
    for start in range(0, len(stream), 7):
        got += [parts[0] for parts in reader.feed(stream[start:start + 7])]
    assert got == frames
    assert MESSAGE_MARK not in stream


def test_a_systems_cpu_is_counted_finer_than_a_clock_tick_and_with_exited_threads() -> None:
    # A step of a light system spends a few ms: counted in 10 ms ticks it
    # read as 0 (the quick run's ceiling at 200/s once did), or as 10.
    burn = ("import sys, threading, time\n"
            "def burn():\n"
            "    end = time.thread_time() + 0.004\n"
            "    while time.thread_time() < end: pass\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "t = threading.Thread(target=burn); t.start(); t.join()\n"
            "print('done', flush=True); sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        before = cpu_seconds(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "done\n"
        spent = cpu_seconds(child.pid) - before  # the burning thread has exited
        assert 0.004 <= spent < 0.009, spent
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


@pytest.mark.slow
def test_quick_run_measures_every_system(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "zchat.bench", "--quick", "--json", str(out), "--no-chart"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("zchat", "zchat-memory", "zchat-print", "zchat-batch", "ceiling", "epoll"):
        entry = results["w1"][name]["5"]
        assert entry["error"] is None, entry["error"]
        assert entry["steps"], name
        # One step more at half the highest rate passed, for the p99 target.
        assert entry["at_half"] == entry["steps"][-1], name
        assert entry["at_half"]["rate"] == round(entry["best"]["rate"] / 2), name
        assert entry["at_half"]["half_of"] == entry["best"]["rate"]
        for step in entry["steps"]:
            assert step["expected"] > 0
            assert step["delivered"] > 0, (name, step)
            assert step["samples"] > 0, (name, step)
            assert step["system_cpu_pct"] is not None
            assert set(step["generator_cpu_pct"]) and step["machine_cpu_pct"] is not None
            # CPU per message of the system (all threads) and of the generator:
            # present, positive, and not absurd (a second per message would
            # mean the counts or the clock are wrong, not that it is slow).
            assert 0 < step["system_us_per_msg"] < 1e6, (name, step)
            assert 0 < step["system_us_per_delivery"] <= step["system_us_per_msg"], (name, step)
            assert 0 < step["generator_us_per_delivery"] < 1e6, (name, step)
            assert step["generator_cpu_total_pct"] == pytest.approx(
                sum(step["generator_cpu_pct"].values()), abs=0.5)
            assert step["generator_headroom"] > 0, (name, step)
            assert isinstance(step["generator_bound"], bool)
            assert step["generator_bound"] == (step["generator_headroom"] < 2 or any(
                why.startswith("generator") for why in step["limited_by"])), (name, step)
    # Once per size, the generator drove a do-nothing sink: its publishers
    # offered messages and its subscribers counted deliveries, both far more
    # than the quick run's top rate (500/s, 5 subscribers) asks of it.
    sink = results["generator"]["5"]
    assert sink["error"] is None, sink
    assert sink["max_publish_rate"] > 2 * 500, sink
    assert sink["max_deliveries_per_s"] > 2 * 500 * 5, sink
    assert sink["subscriber_us_per_delivery"] > 0 and sink["publisher_us_per_message"] > 0
    for name in ("zchat", "ceiling", "epoll"):
        entry = results["w2"][name]["20"]
        assert entry["error"] is None, entry["error"]
        assert entry["live"] == 20, entry
        assert entry["rss_joined_mib"] > 0
        assert entry["idle_cpu_pct"] is not None
        assert entry["broadcasts"][0]["seen"] == 20
        assert entry["broadcast_to_last_ms"] is not None
    assert set(results["ratios"]["w1"]["5"]) >= {"zchat", "ceiling", "epoll"}
    assert results["machine"]["cores"]
    # The terminal shows progress while running and the tables at the end.
    assert "W1 throughput" in proc.stdout and "W2 C10K" in proc.stdout
    assert "Generator into a sink" in proc.stdout
    assert "us/msg" in proc.stdout and "headroom" in proc.stdout
    assert "S=5" in proc.stderr and "N=20" in proc.stderr
    assert tables({**results, "ratios": summarize(results)}) in proc.stdout
    # The README's tables come from the same file: rates with their ratio to
    # the ceiling, CPU per message at one rate that every system ran, and
    # p99 at half each one's highest rate.
    md = markdown(results)
    assert "generator into a sink" in md and "| S | at msg/s |" in md, md
    half = results["w1"]["zchat"]["5"]["at_half"]
    assert f"{half['p99_ms']:.1f} @ {half['rate']:,}" in md, md  # p99 at half the highest


def test_headroom_adds_the_publishers_and_the_subscribers_shares() -> None:
    from zchat.bench.workloads import headroom

    capacity = {"max_publish_rate": 1_000_000, "max_deliveries_per_s": 4_000_000}
    # 10,000 msg/s takes 1 % of the publishers and, to 100 subscribers, 25 %
    # of the subscribers' capacity: 26 % in all, 3.85 times over.
    assert headroom(10_000, 100, capacity) == pytest.approx(1 / 0.26, abs=0.01)
    assert headroom(10_000, 100, None) is None
    assert headroom(10_000, 100, {"error": "did not start"}) is None

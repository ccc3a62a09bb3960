"""The two workloads, each run against one system at one size.

W1 (throughput): ``S`` joined subscribers and 4 publishers (in their own
processes), 100-character texts at a total offered rate stepped up a
1-2-5 ladder until a step fails, then bisected ``refine`` times between
the last pass and the first failure; one step more at half the highest
rate passed (``at_half``: issue 14's latency target is p99 there). A step
passes when at least 99.9% of the ``rate x duration x S`` deliveries
arrive within ``drain`` seconds of the step's end and the p99 of the
sampled latencies is under 100 ms.
Between steps the generator waits until nothing more arrives, so a backlog
does not leak into the next step.

W2 (C10K): ``N`` clients (DEALER and SUB each, or one TCP connection for the
original design) join, ``window`` at a time per process; then the system's
CPU is measured while idle (clients ping every heartbeat, the broker sends
heartbeats), and one message is broadcast ``broadcasts`` times, timed until
the last of the N clients has it.

Every step also records what was busy: the system's busiest thread
(``ZMQbg/IO/0`` is libzmq's I/O thread, ``python`` the interpreter), each
generator process, and the whole machine, and names the likely limit; the
system's CPU per message (all threads) and the generator's per delivery;
and the generator's headroom: how many times over it drove that load into
a do-nothing sink (``calibrate``, once per size). Under ``HEADROOM`` times,
or with a generator process saturated or its publishers late, the step is
"generator-bound".

Defines: ``W1Settings``, ``W2Settings``, ``calibrate``, ``headroom``, ``run_w1``,
``run_w2``, ``LADDER``, ``HEADROOM``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import profiler, systems
from .loadgen import Handle, Target, spawn
from .sink import SinkHandle

__all__ = ["HEADROOM", "LADDER", "W1Settings", "W2Settings", "calibrate", "headroom", "run_w1",
           "run_w2"]

LADDER: Final = [m * 10**e for e in range(1, 7) for m in (1, 2, 5)]
DELIVERY_GOAL: Final = 0.999
LATENCY_GOAL: Final = 0.100
BUSY: Final = 0.90  # a thread or process this busy (of one core) is saturated
# A step needs the generator to manage this many times its load into a sink,
# or its row says "generator-bound".
HEADROOM: Final = 2.0
SAMPLER_TICK: Final = 0.001  # the publishers' process reads the samplers this often
HEARTBEAT: Final = 5.0  # zchat's default; clients of every system ping this often
CPUS: Final = os.cpu_count() or 1

Progress = Callable[[str], None]


@dataclass
class W1Settings:
    subscribers: list[int] = field(default_factory=lambda: [10, 100, 1000])
    step_seconds: float = 2.5
    drain_seconds: float = 1.5
    refine: int = 2
    publishers: int = 4
    pub_processes: int = 1  # also hosts the samplers
    sub_processes: int = 2
    samplers: int = 4  # subscribers (of S, at most S/5) whose latency is timed, joined last
    read_every: float | None = None  # first interval between count-only reads (then tuned)
    max_rate: int = 1_000_000
    start_rate: int | None = None  # default: 100000 / S, within 100..10000
    profile_dir: str = ""  # if set, py-spy records zchat brokers during the steps, here

    def read_interval(self, subscribers: int) -> float:
        """How long count-only processes first let data pile up between reads.

        Their cost is per read (a syscall and a turn of the loop per socket),
        so with many subscribers they read each less often; with few, the
        rates are high. Each process then tunes it to the bytes its reads
        take (``loadgen.Worker._tune_interval``).
        """
        if self.read_every is not None:
            return self.read_every
        return min(0.02, max(0.002, subscribers / 20_000))

    def first_rate(self, subscribers: int) -> int:
        if self.start_rate is not None:
            return self.start_rate
        # 100,000 deliveries a second, which every system passes: lower
        # steps only cost time (and S = 10 started at 1,000 took ten steps).
        return min(10_000, max(100, 100_000 // max(subscribers, 1)))


@dataclass
class W2Settings:
    clients: list[int] = field(default_factory=lambda: [1000, 5000, 10000])
    idle_seconds: float = 10.0
    broadcasts: int = 3
    window: int = 128  # joins in flight, over all processes
    fds_per_process: int = 4000
    sweep_seconds: float = 0.5  # generator reads idle streams this often while joining
    join_timeout: float = 120.0  # joining stops here; the rest is measured on who joined


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class _Meter:
    """CPU of the system (per thread), of the machine, over an interval."""

    def __init__(self, run: systems.Running) -> None:
        self.run = run
        self.t = time.monotonic()
        self.cpu = run.cpu_seconds()
        self.threads = systems.thread_cpu(run.pid)
        self.machine = systems.machine_cpu()

    def read(self) -> dict[str, Any]:
        wall = max(time.monotonic() - self.t, 1e-6)
        threads = systems.thread_cpu(self.run.pid)
        busiest = ("", 0.0)
        per_thread: dict[str, float] = {}
        for tid, (name, seconds) in sorted(threads.items()):
            used = seconds - self.threads.get(tid, (name, 0.0))[1]
            if used > busiest[1]:
                busiest = (name, used)
            label, n = name, 1
            while label in per_thread:
                n += 1
                label = f"{name}#{n}"
            if used / wall >= 0.01:
                per_thread[label] = round(used / wall * 100, 1)
        busy1, total1 = systems.machine_cpu()
        busy0, total0 = self.machine
        machine = (busy1 - busy0) / (total1 - total0) * 100 if total1 > total0 else None
        return {
            "system_cpu_pct": round((self.run.cpu_seconds() - self.cpu) / wall * 100, 1),
            "busiest_thread": busiest[0],
            "busiest_thread_pct": round(busiest[1] / wall * 100, 1),
            "threads_cpu_pct": per_thread,
            # Of all the machine's cores together (100 = every core busy).
            "machine_cpu_pct": round(machine, 1) if machine is not None else None,
        }


def _wait(predicate: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


class _Fleet:
    """The generator processes of one run and their clients."""

    def __init__(self, target: Target, sub_processes: int, pub_processes: int,
                 label: str) -> None:
        self.subs: list[Handle] = [spawn(f"{label}-sub{i}", target) for i in range(sub_processes)]
        self.pubs: list[Handle] = [spawn(f"{label}-pub{i}", target) for i in range(pub_processes)]
        self.counting = list(self.subs)  # the processes with subscribers

    @property
    def all(self) -> list[Handle]:
        return self.subs + self.pubs

    def stop(self) -> None:
        for handle in self.all:
            handle.stop()

    def status(self, handles: list[Handle] | None = None) -> list[dict[str, Any]]:
        return [h.call("status") for h in (self.all if handles is None else handles)]

    def count(self) -> int:
        return sum(s["count"] for s in self.status(self.counting))

    def cpu(self, handles: list[Handle]) -> float:
        """CPU seconds the given generator processes have used so far."""
        return float(sum(s["cpu"] for s in self.status(handles)))

    def join(self, total: int, timeout: float, progress: Progress, what: str) -> dict[str, Any]:
        """Wait until every client is welcomed (or failed); say how far it got."""
        started = time.monotonic()
        last_said = started
        while True:
            states = self.status()
            done = sum(s["welcomed"] for s in states)
            failed = sum(s["failed"] for s in states)
            now = time.monotonic()
            if done + failed >= total or now - started > timeout:
                break
            if now - last_said >= 3:
                progress(f"    {what}: {done}/{total} joined after {now - started:.0f}s")
                last_said = now
            time.sleep(0.1)
        failures = [f for s in states for f in s["failures"]]
        return {"welcomed": done, "failed": failed, "failures": failures[:3],
                "seconds": time.monotonic() - started}

    def probe_until_live(self, total: int, timeout: float) -> tuple[int, float]:
        """Send probes until every subscriber has received one; (live, seconds)."""
        started = time.monotonic()
        live = 0
        while time.monotonic() - started < timeout:
            self.pubs[0].call("send_one", text="@probe")
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                live = sum(s["live"] for s in self.status(self.counting))
                if live >= total:
                    return live, time.monotonic() - started
                time.sleep(0.05)
        return live, time.monotonic() - started

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until publishers have flushed and nothing more arrives."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            pubs = [h.call("published") for h in self.pubs]
            count = self.count()
            if count == last and not any(p["unsent"] or p["active"] for p in pubs):
                return
            last = count
            time.sleep(0.3)


# ---------------------------------------------------------------------------- W1


def _w1_fleet(target: Target, subscribers: int, cfg: W1Settings, progress: Progress,
              what: str) -> tuple[_Fleet, dict[str, Any]]:
    """The generator processes of W1, every client joined.

    The publishers share one process with the samplers (the subscribers whose
    latency is timed), which it reads on its 1 ms pacing tick: a reader that
    waits for every message pays a wakeup per message (20 us here, more than
    the broker's work), and the tick costs no wakeup the pacing does not
    already pay. Latencies so include up to 1 ms of that tick: they can
    only look worse for it. The samplers join last, after every counting
    subscriber: a system fans a message out in join order, so they see the
    latest delivery, not the earliest.
    """
    samplers = max(1, min(cfg.samplers, max(1, subscribers // 5), subscribers))
    counters = subscribers - samplers
    count_processes = min(cfg.sub_processes, counters)
    fleet = _Fleet(target, count_processes, cfg.pub_processes, what)
    fleet.counting = fleet.subs + fleet.pubs[:1]
    try:
        for w, handle in enumerate(fleet.subs):
            clients = [(i, f"sub{i}", "sub", False)
                       for i in range(w, counters, count_processes)]
            handle.call("add", clients=clients, window=64,
                        read_every=cfg.read_interval(subscribers))
        for w, handle in enumerate(fleet.pubs):
            clients = [(subscribers + i, f"pub{i}", "pub", False)
                       for i in range(w, cfg.publishers, cfg.pub_processes)]
            handle.call("add", clients=clients, window=64)
        fleet.join(counters + cfg.publishers, 60 + subscribers * 0.05, progress, what)
        fleet.pubs[0].call("pace", sweep_every=SAMPLER_TICK)
        fleet.pubs[0].call("add", clients=[(i, f"sub{i}", "sub", True)
                                           for i in range(counters, subscribers)], window=64)
        joined = fleet.join(subscribers + cfg.publishers, 30, progress, what)
    except BaseException:
        fleet.stop()
        raise
    joined["samplers"] = samplers
    return fleet, joined


def calibrate(subscribers: int, cfg: W1Settings, progress: Progress) -> dict[str, Any]:
    """What the generator drives with nothing resisting: ``sink.py`` in place of a system.

    The same processes and clients as a W1 step at this size, against a sink
    that discards what publishers send and feeds every subscriber without
    pause. Two figures bound every rate this run may report: messages a
    second the publishers offered (``max_publish_rate``) and deliveries a
    second the subscribers counted (``max_deliveries_per_s``), each with the
    generator's CPU per message while doing it.
    """
    sink = SinkHandle()
    target = Target("ceiling", sink.endpoints, HEARTBEAT)
    result: dict[str, Any] = {"subscribers": subscribers, "error": None}
    fleet: _Fleet | None = None
    try:
        fleet, joined = _w1_fleet(target, subscribers, cfg, progress, f"sink-S{subscribers}")
        if joined["failed"] or joined["welcomed"] < subscribers + cfg.publishers:
            raise RuntimeError(f"only {joined['welcomed']} joined the sink: {joined['failures']}")
        seconds = max(1.0, min(cfg.step_seconds, 2.0))
        # Subscribers: the sink writes 64 KiB runs of events to all of them.
        sink.call("blast", on=True)
        time.sleep(0.3)
        base, cpu0, sink0 = fleet.count(), fleet.cpu(fleet.counting), sink.cpu_seconds()
        wall0 = time.monotonic()
        time.sleep(seconds)
        counted, cpu1, sink1 = fleet.count(), fleet.cpu(fleet.counting), sink.cpu_seconds()
        wall = time.monotonic() - wall0
        sink.call("blast", on=False)
        fleet.settle(5)
        delivered = counted - base
        result.update({
            "max_deliveries_per_s": round(delivered / wall),
            "subscriber_cpu_pct": round((cpu1 - cpu0) / wall * 100, 1),
            "subscriber_us_per_delivery": _us(cpu1 - cpu0, delivered),
            "sink_cpu_pct_blasting": round((sink1 - sink0) / wall * 100, 1),
        })
        # Publishers: offered far more than they can send, into the discarding sink.
        offered_rate = 4_000_000
        cpu0 = fleet.cpu(fleet.pubs)
        t0 = time.time() + 0.05
        for handle in fleet.pubs:
            handle.call("publish", t0=t0, duration=seconds, rate=offered_rate / cfg.publishers)
        time.sleep(max(0.0, t0 + seconds - time.time()))
        _wait(lambda: not any(h.call("published")["active"] for h in fleet.pubs), 5.0, 0.02)
        _wait(lambda: not any(h.call("published")["unsent"] for h in fleet.pubs), 5.0, 0.02)
        wall = time.time() - t0
        published = [h.call("published") for h in fleet.pubs]
        sent = sum(p["generated"] - p["dropped"] - p["unsent"] for p in published)
        cpu1 = fleet.cpu(fleet.pubs)
        result.update({
            "max_publish_rate": round(sent / wall),
            "publisher_cpu_pct": round((cpu1 - cpu0) / wall * 100, 1),
            "publisher_us_per_message": _us(cpu1 - cpu0, sent),
        })
        progress(f"  generator S={subscribers:<5} against a do-nothing sink: publishers "
                 f"{result['max_publish_rate']:,} msg/s ({result['publisher_cpu_pct']:.0f}% CPU), "
                 f"subscribers {result['max_deliveries_per_s']:,} deliveries/s "
                 f"({result['subscriber_cpu_pct']:.0f}% CPU, "
                 f"{result['subscriber_us_per_delivery']} us each)")
    except (RuntimeError, TimeoutError, OSError, EOFError) as exc:
        result["error"] = repr(exc)
        progress(f"  generator S={subscribers}: calibration failed: {exc!r}")
    finally:
        if fleet is not None:
            fleet.stop()
        sink.stop()
    return result


def headroom(rate: float, subscribers: int, capacity: dict[str, Any] | None) -> float | None:
    """How many times over the generator could drive this step into a sink.

    The publishers' and the subscribers' work share the same CPUs, so their
    shares of capacity add up: 1 / (R / publish_max + R x S / deliveries_max).
    """
    if not capacity or capacity.get("error") or not rate:
        return None
    pub = float(capacity.get("max_publish_rate") or 0)
    dlv = float(capacity.get("max_deliveries_per_s") or 0)
    if not pub or not dlv:
        return None
    return round(1 / (rate / pub + rate * subscribers / dlv), 2)


def run_w1(name: str, subscribers: int, cfg: W1Settings, progress: Progress,
           capacity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Find the highest passing rate of system ``name`` with ``subscribers``."""
    run = systems.start(name)
    target = Target(systems.SYSTEMS[name][0], run.endpoints, HEARTBEAT)
    result: dict[str, Any] = {"system": name, "subscribers": subscribers, "steps": [],
                              "best": None, "first_failure": None, "at_half": None,
                              "error": None}
    profile: profiler.Recording | None = None
    fleet: _Fleet | None = None
    try:
        fleet, joined = _w1_fleet(target, subscribers, cfg, progress, f"{name}-w1")
        live, _ = fleet.probe_until_live(subscribers, 20)
        if joined["failed"] or live < subscribers:
            result["error"] = (f"only {live}/{subscribers} subscribers live, "
                               f"{joined['failed']} failed: {joined['failures']}")
            progress(f"  {name} S={subscribers}: {result['error']}")
            return result
        fleet.settle()
        if cfg.profile_dir and name.startswith("zchat"):
            where = Path(cfg.profile_dir) / f"{name}-S{subscribers}.txt"
            profile = profiler.Recording(run.pid, where)
            progress(f"  {name} S={subscribers}: {profile.status}")
        rates = [r for r in LADDER if cfg.first_rate(subscribers) <= r <= cfg.max_rate]
        best: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None
        for rate in rates:
            step = _w1_step(run, fleet, rate, subscribers, cfg, progress, capacity)
            result["steps"].append(step)
            if step["passed"]:
                best = step
            else:
                failure = step
                break
        for _ in range(cfg.refine):
            if best is None or failure is None or not run.alive():
                break
            rate = _between(best["rate"], failure["rate"])
            if rate in (best["rate"], failure["rate"]):
                break
            fleet.settle()
            step = _w1_step(run, fleet, rate, subscribers, cfg, progress, capacity)
            result["steps"].append(step)
            if step["passed"]:
                best = step
            else:
                failure = step
        if best is not None and run.alive():
            # Issue 14's latency target is p99 at half the highest rate: one
            # step there, measured, not read off the ladder's neighbours.
            fleet.settle()
            step = _w1_step(run, fleet, _round_rate(best["rate"] / 2), subscribers, cfg,
                            progress, capacity)
            step["half_of"] = best["rate"]
            result["steps"].append(step)
            result["at_half"] = step
        result["best"] = best
        result["first_failure"] = failure
        if not run.alive():
            result["error"] = f"{name} died: {run.errors()}"
    finally:
        if profile is not None:
            result["profile"] = profile.stop()
            progress(profiler.render(result["profile"]))
        if fleet is not None:
            fleet.stop()
        run.stop()
    return result


def _between(low: float, high: float) -> int:
    """A round rate near the geometric middle of ``low`` and ``high``."""
    return _round_rate(math.sqrt(low * high))


def _round_rate(rate: float) -> int:
    """``rate`` to two significant digits (at least 1)."""
    digits = 10 ** max(0, int(math.log10(max(rate, 1))) - 1)
    return max(1, int(round(rate / digits) * digits))


def _us(seconds: float, count: float) -> float | None:
    """``seconds`` of CPU per one of ``count``, in microseconds."""
    return round(seconds / count * 1e6, 3) if count > 0 else None


def _w1_step(run: systems.Running, fleet: _Fleet, rate: int, subscribers: int,
             cfg: W1Settings, progress: Progress,
             capacity: dict[str, Any] | None = None) -> dict[str, Any]:
    base = fleet.count()
    for handle in fleet.counting:
        handle.call("samples")
    cpu0 = {h.name: h.call("status")["cpu"] for h in fleet.all}
    n_pubs = cfg.publishers
    t0 = time.time() + 0.05
    meter = _Meter(run)
    wall0 = time.monotonic()
    for handle in fleet.pubs:
        handle.call("publish", t0=t0, duration=cfg.step_seconds, rate=rate / n_pubs)
    time.sleep(max(0.0, t0 + cfg.step_seconds - time.time()))
    _wait(lambda: not any(h.call("published")["active"] for h in fleet.pubs), 5.0, 0.02)
    busy = meter.read()
    wall = time.monotonic() - wall0
    gen = {h.name: round((h.call("status")["cpu"] - cpu0[h.name]) / wall * 100, 1)
           for h in fleet.all}
    published = [h.call("published") for h in fleet.pubs]
    offered = sum(p["offered"] for p in published)
    expected = offered * subscribers
    delivered = fleet.count() - base
    deadline = time.monotonic() + cfg.drain_seconds
    while delivered < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        delivered = fleet.count() - base
    # CPU per message from the first publish until the last delivery (or the
    # drain's end): a system that falls behind does the rest of the step's
    # work after it, and counting only the step would make it look cheaper.
    system_cpu = run.cpu_seconds() - meter.cpu
    generator_cpu = sum(h.call("status")["cpu"] - cpu0[h.name] for h in fleet.all)
    latencies: list[float] = []
    for handle in fleet.counting:
        latencies += handle.call("samples")["latencies"]
    published = [h.call("published") for h in fleet.pubs]
    ratio = delivered / expected if expected else 0.0
    p50 = _percentile(latencies, 0.50)
    p99 = _percentile(latencies, 0.99)
    passed = ratio >= DELIVERY_GOAL and p99 is not None and p99 < LATENCY_GOAL
    reasons = []
    if ratio < DELIVERY_GOAL:
        reasons.append(f"delivered {ratio:.2%}")
    if p99 is None:
        reasons.append("no latency samples")
    elif p99 >= LATENCY_GOAL:
        reasons.append(f"p99 {p99 * 1000:.0f} ms")
    generated = sum(p["generated"] for p in published)
    dropped = sum(p["dropped"] for p in published)
    unsent = sum(p["unsent"] for p in published)
    lag = max(p["lag_max"] for p in published)
    room = headroom(rate, subscribers, capacity)
    step = {
        "rate": rate,
        "seconds": cfg.step_seconds,
        "offered": offered,
        "generated": generated,
        "backpressured": dropped + unsent,
        "publisher_lag_max_ms": round(lag * 1000, 1),
        "expected": expected,
        "delivered": delivered,
        "delivery_ratio": round(ratio, 5),
        "deliveries_per_s": round(delivered / cfg.step_seconds),
        "p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
        "p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
        "samples": len(latencies),
        **busy,
        # All threads of the system under test, per message it took in and
        # per delivery it made (CPU seconds, not wall time: steadier on a
        # shared machine than any rate).
        "system_us_per_msg": _us(system_cpu, generated - dropped),
        "system_us_per_delivery": _us(system_cpu, delivered),
        "generator_cpu_pct": gen,
        "generator_cpu_total_pct": round(sum(gen.values()), 1),
        "generator_us_per_delivery": _us(generator_cpu, delivered),
        "generator_headroom": room,
        "passed": passed,
        "failed_because": reasons,
    }
    step["limited_by"] = _limits(step, run.name)
    step["generator_bound"] = any(w.startswith("generator") for w in step["limited_by"])
    mark = "pass" if passed else "FAIL " + ", ".join(reasons)
    if step["generator_bound"]:
        mark += " (generator-bound)"
    progress(
        f"  {run.name:<11} S={subscribers:<5} R={rate:>8,}/s "
        f"delivered {ratio:7.2%}  p50 {_ms(p50)}  p99 {_ms(p99)}  "
        f"CPU {busy['system_cpu_pct']:4.0f}% ({_threads(busy['threads_cpu_pct'])}) "
        f"{_fmt_us(step['system_us_per_msg'])} us/msg  "
        f"gen {sum(gen.values()):3.0f}% (max {max(gen.values()):.0f}, "
        f"headroom {'-' if room is None else f'{room:.1f}x'})  "
        f"machine {busy['machine_cpu_pct']:.0f}%  {mark}"
    )
    return step


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _threads(pcts: dict[str, float]) -> str:
    return " + ".join(f"{name} {pct:.0f}" for name, pct in pcts.items()) or "idle"


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:7.1f} ms" if seconds is not None else "     - ms"


def _limits(step: dict[str, Any], name: str) -> list[str]:
    """What was saturated during a step, most telling first."""
    found = []
    if step["busiest_thread_pct"] >= BUSY * 100:
        found.append(f"{name} thread {step['busiest_thread']}")
    if step["backpressured"]:
        found.append(f"{name} pushed back on publishers")
    gen = step["generator_cpu_pct"]
    hot = [k for k, v in gen.items() if v >= BUSY * 100]
    if hot or step["generated"] < step["offered"] or step["publisher_lag_max_ms"] > 50:
        found.append("generator (" + (", ".join(hot) or "publishers late") + ")")
    room = step.get("generator_headroom")
    if room is not None and room < HEADROOM:
        found.append(f"generator (headroom {room:.1f}x < {HEADROOM:.0f}x into a sink)")
    machine = step["machine_cpu_pct"]
    if machine is not None and machine >= 95:
        found.append(f"machine CPU {machine:.0f}% of {CPUS} cores")
    return found


# ---------------------------------------------------------------------------- W2


FD_RESERVE: Final = 64  # a broker's own files: listeners, eventfds, epoll, SQLite, stdio


def fd_limit() -> int:
    """The open-file limit the systems under test get (raised as far as allowed)."""
    return systems.raise_fd_limits(1 << 20)[0]


def fitting_clients(requested: int) -> int:
    """``requested``, or fewer if a broker with two connections each cannot hold them.

    Every system is measured with the same N, so the ceiling and zchat (two
    connections per client) bound it, not the original design (one).
    """
    return max(1, min(requested, (fd_limit() - FD_RESERVE) // 2))


def run_w2(name: str, clients: int, cfg: W2Settings, progress: Progress) -> dict[str, Any]:
    """Join ``clients`` clients to system ``name``; idle CPU, memory, broadcast time."""
    requested = clients
    clients = fitting_clients(requested)
    per_client = 1 if systems.SYSTEMS[name][0] == "epoll" else 2
    processes = max(2, math.ceil(clients * per_client / cfg.fds_per_process))
    result: dict[str, Any] = {"system": name, "requested": requested, "clients": clients,
                              "processes": processes, "fd_limit": fd_limit(), "error": None}
    if clients < requested:
        result["note"] = (
            f"{requested:,} clients need {requested * 2 + FD_RESERVE:,} open files in a "
            f"broker (a DEALER and a SUB connection each); the hard limit here is "
            f"{fd_limit():,} and cannot be raised (no CAP_SYS_RESOURCE), so every system "
            f"was measured with {clients:,}")
        progress(f"  {name:<11} N={requested}: {result['note']}")
    run = systems.start(name)
    target = Target(systems.SYSTEMS[name][0], run.endpoints, HEARTBEAT)
    fleet = _Fleet(target, processes, 1, f"{name}-w2")
    try:
        rss0 = run.rss_bytes()
        fleet.pubs[0].call("add", clients=[(clients, "w2pub", "pub", False)])
        if not fleet.pubs[0].call("status")["clients"]:
            raise RuntimeError("the probe publisher was not added")
        window = max(4, cfg.window // processes)
        for handle in fleet.subs:
            # Thousands of mostly idle streams: read them on a timer, not on
            # every joined event, so the generator does not drown in reads.
            handle.call("pace", sweep_every=cfg.sweep_seconds)
        meter = _Meter(run)
        cpu0 = {h.name: h.call("status")["cpu"] for h in fleet.all}
        started = time.monotonic()
        for w, handle in enumerate(fleet.subs):
            mine = [(i, f"c{i}", "sub", False) for i in range(w, clients, processes)]
            handle.call("add", clients=mine, window=window)
        joined = fleet.join(clients + 1, cfg.join_timeout, progress, f"{name} N={clients}")
        welcome_s = time.monotonic() - started
        joining = meter.read()
        gen = {h.name: round((h.call("status")["cpu"] - cpu0[h.name]) / welcome_s * 100, 1)
               for h in fleet.all}
        never = sum(h.call("stop_joining")["never_started"] for h in fleet.subs)
        if never:
            progress(f"  {name:<11} N={clients:<6} join cut off after {cfg.join_timeout:.0f}s: "
                     f"{never} clients never started")
            # Let the joins already under way finish, so N stays put from here on.
            joined = fleet.join(clients + 1 - never, 30, progress, f"{name} N={clients}")
        live, _ = fleet.probe_until_live(joined["welcomed"] - 1, 30)
        live_s = time.monotonic() - started
        rss1 = run.rss_bytes()
        result.update({
            "welcomed": joined["welcomed"] - 1,
            "failed": joined["failed"],
            "failures": joined["failures"],
            "live": live,
            "join_s": round(welcome_s, 2),
            "join_live_s": round(live_s, 2),
            "join_cut_off": bool(never),
            "join_cpu_pct": joining["system_cpu_pct"],
            "join_busiest_thread": joining["busiest_thread"],
            "join_busiest_thread_pct": joining["busiest_thread_pct"],
            "join_machine_cpu_pct": joining["machine_cpu_pct"],
            "join_generator_cpu_pct": gen,
            "rss_before_mib": round(rss0 / 2**20, 1),
            "rss_joined_mib": round(rss1 / 2**20, 1),
            "rss_per_client_kib": round((rss1 - rss0) / max(live, 1) / 1024, 1),
        })
        progress(f"  {name:<11} N={clients:<6} joined {live}/{clients} in {live_s:.1f}s "
                 f"(welcomes {welcome_s:.1f}s; {name} CPU {joining['system_cpu_pct']:.0f}%, "
                 f"{joining['busiest_thread']} {joining['busiest_thread_pct']:.0f}%; "
                 f"generator max {max(gen.values()):.0f}%), RSS {rss1 / 2**20:.0f} MiB "
                 f"({result['rss_per_client_kib']} KiB/client)")
        fleet.settle(5)
        meter = _Meter(run)
        cpu0 = {h.name: h.call("status")["cpu"] for h in fleet.all}
        time.sleep(cfg.idle_seconds)
        idle = meter.read()
        gen = {h.name: round((h.call("status")["cpu"] - cpu0[h.name]) / cfg.idle_seconds * 100, 1)
               for h in fleet.all}
        result.update({
            "idle_seconds": cfg.idle_seconds,
            "idle_cpu_pct": idle["system_cpu_pct"],
            "idle_busiest_thread": idle["busiest_thread"],
            "idle_machine_cpu_pct": idle["machine_cpu_pct"],
            "idle_generator_cpu_pct": gen,
            "rss_idle_mib": round(run.rss_bytes() / 2**20, 1),
        })
        for handle in fleet.subs:
            handle.call("pace", sweep_every=0.0)  # now read as soon as data comes
        times = []
        for k in range(cfg.broadcasts):
            times.append(_broadcast_once(fleet, b"@BCAST-%05d" % k))
        reached = [t["to_last_ms"] for t in times if t["to_last_ms"] is not None]
        result["broadcasts"] = times
        result["broadcast_to_last_ms"] = statistics.median(reached) if reached else None
        progress(f"  {name:<11} N={clients:<6} idle CPU {idle['system_cpu_pct']:.1f}% "
                 f"({idle['busiest_thread']}), broadcast to last "
                 f"{result['broadcast_to_last_ms']} ms (seen by "
                 f"{min((t['seen'] for t in times), default=0)}/"
                 f"{max((t['of'] for t in times), default=0)})")
        if not run.alive():
            result["error"] = f"{name} died: {run.errors()}"
    finally:
        fleet.stop()
        run.stop()
    return result


def _broadcast_once(fleet: _Fleet, token: bytes) -> dict[str, Any]:
    """Send one message carrying ``token``; time it until the last subscriber has it."""
    watching = sum(h.call("watch", token=token)["watching"] for h in fleet.subs)
    sent_at = fleet.pubs[0].call("send_one", text=token.decode().ljust(100, "x"))["sent_at"]
    seen, last = 0, 0.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        replies = [h.call("watched") for h in fleet.subs]
        seen = sum(r["seen"] for r in replies)
        last = max(r["last"] for r in replies)
        if seen >= watching:
            break
        time.sleep(0.02)
    return {"seen": seen, "of": watching,
            "to_last_ms": round((last - sent_at) * 1000, 1) if last else None}

"""``zchat-bench``: run the workloads against zchat and its baselines, report.

For each size, every system is measured in turn in the same run, so the
ratios between them hold even on a shared, noisy machine. Progress lines
go to stderr as it runs; the tables to stdout at the end; the full results
to ``bench-results/<timestamp>.json`` (or ``--json``) and a PNG chart
beside it (``--chart``), if matplotlib is installed.

Presets: ``--quick`` (tiny, about 20 s: proves the harness works) and the
default (the issue's full W1 and W2, about 15 minutes). Every size and
duration can be overridden.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq

from . import report, systems
from .storm import StormSettings, fitting, run_storm
from .storm import ratios as storm_ratios
from .storm import table as storm_table
from .workloads import W1Settings, W2Settings, calibrate, run_w1, run_w2

__all__ = ["build_parser", "main"]

W1_SYSTEMS = ["zchat", "zchat-memory", "zchat-print", "zchat-batch", "floor", "ceiling", "epoll"]
W2_SYSTEMS = ["zchat", "ceiling", "epoll"]
# A system that will not start, or a generator process that stops answering,
# costs that one entry, not the whole run.
FAILURES = (systems.StartError, TimeoutError, OSError, EOFError)


def _sizes(text: str) -> list[int]:
    return [int(part.replace("_", "").replace(",", "")) for part in text.split("/") if part]


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in systems.SYSTEMS:
            raise argparse.ArgumentTypeError(
                f"unknown system {name!r} (known: {', '.join(systems.SYSTEMS)})")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zchat-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and short steps (about 20 s), to check the harness")
    p.add_argument("--workloads", default="w1,w2",
                   help="w1, w2 and/or storm, comma-separated (default: %(default)s)")
    p.add_argument("--systems", type=_names, default=None,
                   help=f"comma-separated, from {', '.join(systems.SYSTEMS)} "
                        f"(default: W1 {','.join(W1_SYSTEMS)}; W2 {','.join(W2_SYSTEMS)})")
    p.add_argument("--subscribers", type=_sizes, default=None, metavar="S/S/...",
                   help="W1 subscriber counts, e.g. 10/100/1000")
    p.add_argument("--clients", type=_sizes, default=None, metavar="N/N/...",
                   help="W2 client counts, e.g. 1000/5000/10000")
    p.add_argument("--step-seconds", type=float, default=None, help="W1 seconds per rate step")
    p.add_argument("--start-rate", type=int, default=None,
                   help="W1 first rate of the ladder (default: 100000/S within 100..10000)")
    p.add_argument("--max-rate", type=int, default=None, help="W1 last rate of the ladder")
    p.add_argument("--refine", type=int, default=None,
                   help="W1 bisections between the last pass and the first failure")
    p.add_argument("--idle-seconds", type=float, default=None, help="W2 idle measurement")
    p.add_argument("--storm-clients", type=_sizes, default=None, metavar="N/N/...",
                   help="join-storm sizes (default: as many as one broker can hold; "
                        "--quick: 200)")
    p.add_argument("--profile", action="store_true",
                   help="record the zchat brokers with py-spy during W1 (beside the JSON)")
    p.add_argument("--out-dir", default="bench-results", help="where results go")
    p.add_argument("--json", default=None, help="results file (default: OUT_DIR/<stamp>.json)")
    p.add_argument("--chart", default=None, help="PNG chart (default: beside the JSON)")
    p.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    return p


def settings(args: argparse.Namespace) -> tuple[W1Settings, W2Settings]:
    if args.quick:
        w1 = W1Settings(subscribers=[5], step_seconds=0.8, drain_seconds=0.5, refine=0,
                        pub_processes=1, sub_processes=1, samplers=2, start_rate=200,
                        max_rate=500)
        w2 = W2Settings(clients=[20], idle_seconds=1.0, broadcasts=1)
    else:
        w1, w2 = W1Settings(), W2Settings()
    for attr, value in (("subscribers", args.subscribers), ("step_seconds", args.step_seconds),
                        ("start_rate", args.start_rate), ("max_rate", args.max_rate),
                        ("refine", args.refine)):
        if value is not None:
            setattr(w1, attr, value)
    if args.clients is not None:
        w2.clients = args.clients
    if args.idle_seconds is not None:
        w2.idle_seconds = args.idle_seconds
    return w1, w2


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "load_average_at_start": os.getloadavg(),
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workloads = {w.strip().lower() for w in args.workloads.split(",")}
    if not workloads <= {"w1", "w2", "storm"}:
        print("zchat-bench: --workloads takes w1, w2, storm or a list of them", file=sys.stderr)
        return 2
    w1, w2 = settings(args)
    # SIGTERM unwinds like Ctrl-C, so the systems and generator processes stop.
    signal.signal(signal.SIGTERM, _interrupt)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json or Path(args.out_dir) / f"{stamp}.json")
    chart_path = Path(args.chart or json_path.with_suffix(".png"))
    if args.profile:
        w1.profile_dir = str(json_path.with_suffix("")) + "-profiles"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "version": 2,
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": "zchat-bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "settings": {"w1": asdict(w1), "w2": asdict(w2)},
        "criteria": {"delivered_at_least": 0.999, "p99_under_ms": 100},
        # Per W1 size: what the generator drove into a do-nothing sink.
        "generator": {},
        "w1": {},
        "w2": {},
        "storm": {},
    }

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    def save() -> None:
        results["ratios"] = report.summarize(results)
        results["duration_s"] = round(time.monotonic() - started, 1)
        json_path.write_text(json.dumps(results, indent=1) + "\n")

    m = results["machine"]
    say(f"zchat-bench on {m['cpu']} ({m['cores']} cores, load {m['load_average_at_start']}), "
        f"results to {json_path}")
    try:
        run_all(results, workloads, args, w1, w2, say, save)
    except KeyboardInterrupt:
        say("interrupted: the results so far are saved")
        save()
        return 130
    save()
    print(report.tables(results))
    if results["storm"]:
        print(storm_table(results["storm"]))
    if not args.no_chart:
        why_not = report.chart(results, str(chart_path))
        print(f"chart: {why_not}" if why_not else f"chart: {chart_path}")
    print(f"results: {json_path} ({results['duration_s']:.0f}s)")
    return 0


def run_all(results: dict[str, Any], workloads: set[str], args: argparse.Namespace,
            w1: W1Settings, w2: W2Settings, say: Callable[[str], None],
            save: Callable[[], None]) -> None:
    """Each size in turn, every system at that size, saving after each."""
    if "w1" in workloads:
        names = args.systems or W1_SYSTEMS
        for size in w1.subscribers:
            say(f"W1 throughput, S = {size}: " + ", ".join(names))
            capacity = calibrate(size, w1, say)
            results["generator"][str(size)] = capacity
            for name in names:
                try:
                    entry = run_w1(name, size, w1, say, capacity)
                except FAILURES as exc:
                    say(f"  {name} S={size}: {exc!r}")
                    entry = {"system": name, "subscribers": size, "steps": [], "best": None,
                             "first_failure": None, "error": repr(exc)}
                results["w1"].setdefault(name, {})[str(size)] = entry
                save()
    if "w2" in workloads:
        # Printing and batching change nothing while idle or for one broadcast.
        names = [n for n in (args.systems or W2_SYSTEMS)
                 if n not in ("zchat-print", "zchat-batch", "zchat-memory")] or ["zchat"]
        for size in w2.clients:
            say(f"W2 C10K, N = {size}: " + ", ".join(names))
            for name in names:
                try:
                    entry = run_w2(name, size, w2, say)
                except FAILURES as exc:
                    say(f"  {name} N={size}: {exc!r}")
                    entry = {"system": name, "clients": size, "error": repr(exc)}
                results["w2"].setdefault(name, {})[str(size)] = entry
                save()
    if "storm" in workloads:
        run_storms(results, args, say, save)


def run_storms(results: dict[str, Any], args: argparse.Namespace, say: Callable[[str], None],
               save: Callable[[], None]) -> None:
    """The join storm at each size: zchat, then the ceiling, in the same run."""
    cfg = StormSettings(hold_seconds=1.0) if args.quick else StormSettings()
    if args.profile:
        cfg.profile_dir = str(Path(args.json or args.out_dir)) + "-storm-profiles"
    sizes = args.storm_clients or ([200] if args.quick else [0])
    results["settings"]["storm"] = asdict(cfg)
    for requested in sizes:
        size = fitting(requested)
        say(f"join storm, N = {size}: " + ", ".join(cfg.systems))
        for name in cfg.systems:
            try:
                entry = run_storm(name, size, cfg, say)
            except FAILURES as exc:
                say(f"  {name} N={size}: {exc!r}")
                entry = {"system": name, "clients": size, "error": repr(exc)}
            results["storm"].setdefault(str(size), {})[name] = entry
            results.setdefault("storm_ratios", {})[str(size)] = storm_ratios(
                results["storm"][str(size)])
            save()


if __name__ == "__main__":
    sys.exit(main())

"""Turning results into ratios, a terminal table and a PNG chart.

``summarize(results)`` adds the ratios that matter (zchat against the
ceiling and against the original design, measured in the same run), and
``tables(results)`` renders them as plain-text tables: what the generator
drove into a do-nothing sink, then per system and size the best step with
the system's CPU per message (all threads, at the best and the first
failing step), the generator's own CPU beside it, and its headroom; a rate
the generator could not prove it drives twice over says "generator-bound". ``chart(results,
path)`` draws the W1 rate/latency curves per subscriber count and the W2
broadcast times with matplotlib (the optional ``bench`` extra); without it,
it says so and draws nothing.

Defines: ``summarize``, ``tables``, ``chart``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["chart", "markdown", "summarize", "tables"]

STYLE = {
    "zchat": ("tab:blue", "o"),
    "zchat-print": ("tab:cyan", "v"),
    "zchat-memory": ("tab:gray", "*"),
    "zchat-batch": ("tab:purple", "D"),
    "zchat-io2": ("tab:olive", "P"),
    "zchat-before": ("tab:pink", "h"),
    "ceiling-io2": ("tab:brown", "X"),
    "ceiling": ("tab:green", "s"),
    "epoll": ("tab:red", "^"),
}


def _best_rate(entry: dict[str, Any] | None) -> float | None:
    if not entry or not entry.get("best"):
        return None
    return float(entry["best"]["rate"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios of each system to the ceiling and to the original design."""
    ratios: dict[str, Any] = {"w1": {}, "w2": {}}
    w1 = results.get("w1", {})
    for size in sorted({s for per in w1.values() for s in per}, key=int):
        ceiling = _best_rate(w1.get("ceiling", {}).get(size))
        epoll = _best_rate(w1.get("epoll", {}).get(size))
        memory = _best_rate(w1.get("zchat-memory", {}).get(size))
        ratios["w1"][size] = {
            name: {"max_rate": _best_rate(per.get(size)),
                   "of_ceiling": _ratio(_best_rate(per.get(size)), ceiling),
                   "of_original": _ratio(_best_rate(per.get(size)), epoll),
                   # durable history (SQLite) against history in memory only
                   "of_memory_history": _ratio(_best_rate(per.get(size)), memory)}
            for name, per in w1.items()
        }
    w2 = results.get("w2", {})
    for size in sorted({s for per in w2.values() for s in per}, key=int):
        top: dict[str, Any] = w2.get("ceiling", {}).get(size) or {}
        original: dict[str, Any] = w2.get("epoll", {}).get(size) or {}
        ratios["w2"][size] = {}
        for name, per in w2.items():
            entry = per.get(size) or {}
            ratios["w2"][size][name] = {
                "broadcast_vs_ceiling": _ratio(entry.get("broadcast_to_last_ms"),
                                               top.get("broadcast_to_last_ms")),
                "broadcast_vs_original": _ratio(entry.get("broadcast_to_last_ms"),
                                                original.get("broadcast_to_last_ms")),
                "join_vs_ceiling": _ratio(entry.get("join_live_s"), top.get("join_live_s")),
            }
    return ratios


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in
                       enumerate(zip(headers, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def _thread(step: dict[str, Any]) -> str:
    if not step:
        return "-"
    return f"{step.get('busiest_thread', '')} {_fmt(step.get('busiest_thread_pct'), '.0f')}%"


def _at_half(entry: dict[str, Any]) -> str:
    """p99 of the step at half the highest rate, and that rate: ``8.8 @ 16,000``."""
    half = entry.get("at_half") or {}
    if half.get("p99_ms") is None:
        return "-"
    return f"{half['p99_ms']:.1f} @ {half['rate']:,}" + ("" if half.get("passed") else " FAIL")


def tables(results: dict[str, Any]) -> str:
    """The W1 and W2 tables, as printed at the end of a run and in the README."""
    out = []
    ratios = results.get("ratios") or summarize(results)
    w1 = results.get("w1", {})
    generator = results.get("generator", {})
    if generator:
        headers = ["Generator into a sink", "S", "publish msg/s", "pub us/msg", "deliveries/s",
                   "sub us/delivery", "sink CPU%"]
        rows = []
        for size in sorted(generator, key=int):
            cap = generator[size]
            if cap.get("error"):
                rows.append(["sink", size, "-", "-", "-", "-", cap["error"][:40]])
                continue
            rows.append(["sink", size, _fmt(cap.get("max_publish_rate"), ","),
                         _fmt(cap.get("publisher_us_per_message"), ".3f"),
                         _fmt(cap.get("max_deliveries_per_s"), ","),
                         _fmt(cap.get("subscriber_us_per_delivery"), ".3f"),
                         _fmt(cap.get("sink_cpu_pct_blasting"), ".0f")])
        out.append(_table(headers, rows))
    if w1:
        headers = ["W1 throughput", "S", "max msg/s", "deliveries/s", "p50 ms", "p99 ms",
                   "p99 ms @ half", "CPU%", "us/msg", "us/msg@fail", "busiest thread",
                   "gen CPU%", "gen us/dlv", "sys us/dlv", "headroom", "x ceiling",
                   "x original", "next step failed on"]
        rows = []
        sizes = sorted({s for per in w1.values() for s in per}, key=int)
        for size in sizes:
            for name, per in w1.items():
                entry = per.get(size)
                if entry is None:
                    continue
                best = entry.get("best") or {}
                fail = entry.get("first_failure") or {}
                ratio = ratios["w1"].get(size, {}).get(name, {})
                why = ", ".join(fail.get("failed_because", []))
                if fail.get("limited_by"):
                    why += f" @ {fail['rate']:,} ({'; '.join(fail['limited_by'])})"
                elif fail:
                    why += f" @ {fail['rate']:,}"
                if entry.get("error"):
                    why = entry["error"][:60]
                rate = _fmt(best.get("rate"), ",")
                if best.get("generator_bound"):
                    rate += " generator-bound"
                rows.append([
                    name, str(size), rate,
                    _fmt(best.get("deliveries_per_s"), ","),
                    _fmt(best.get("p50_ms"), ".1f"), _fmt(best.get("p99_ms"), ".1f"),
                    _at_half(entry),
                    _fmt(best.get("system_cpu_pct"), ".0f"),
                    _fmt(best.get("system_us_per_msg"), ".1f"),
                    _fmt(fail.get("system_us_per_msg"), ".1f"),
                    _thread(best),
                    _fmt(best.get("generator_cpu_total_pct"), ".0f"),
                    _fmt(best.get("generator_us_per_delivery"), ".2f"),
                    _fmt(best.get("system_us_per_delivery"), ".2f"),
                    _fmt(best.get("generator_headroom"), ".1f", "-") + (
                        "x" if best.get("generator_headroom") is not None else ""),
                    _fmt(ratio.get("of_ceiling"), ".2f"), _fmt(ratio.get("of_original"), ".2f"),
                    why or ("(top of ladder)" if best else "-"),
                ])
        out.append(_table(headers, rows))
    w2 = results.get("w2", {})
    if w2:
        headers = ["W2 C10K", "N", "joined", "join s", "RSS MiB", "KiB/client", "idle CPU%",
                   "bcast->last ms", "x ceiling", "x original"]
        rows = []
        sizes = sorted({s for per in w2.values() for s in per}, key=int)
        for size in sizes:
            for name, per in w2.items():
                entry = per.get(size)
                if entry is None:
                    continue
                ratio = ratios["w2"].get(size, {}).get(name, {})
                rows.append([
                    name, str(size), f"{entry.get('live', 0)}/{entry.get('clients', size)}",
                    _fmt(entry.get("join_live_s"), ".1f"),
                    _fmt(entry.get("rss_joined_mib"), ".0f"),
                    _fmt(entry.get("rss_per_client_kib"), ".1f"),
                    _fmt(entry.get("idle_cpu_pct"), ".1f"),
                    _fmt(entry.get("broadcast_to_last_ms"), ".1f"),
                    _fmt(ratio.get("broadcast_vs_ceiling"), ".2f"),
                    _fmt(ratio.get("broadcast_vs_original"), ".2f"),
                ])
        out.append(_table(headers, rows))
    return "\n\n".join(out)


def chart(results: dict[str, Any], path: str) -> str | None:
    """Draw the chart to ``path``; return why not if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'zchat[bench]'): no chart drawn"
    w1 = results.get("w1", {})
    w2 = results.get("w2", {})
    sizes = sorted({s for per in w1.values() for s in per}, key=int)
    panels = len(sizes) + (1 if w2 else 0)
    if not panels:
        return "no results to draw"
    cols = min(2, panels)
    rows = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(6 * cols, 4.4 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, size in zip(axes, sizes, strict=False):
        for name, per in w1.items():
            entry = per.get(size)
            if not entry or not entry.get("steps"):
                continue
            steps = sorted(entry["steps"], key=lambda s: s["rate"])
            colour, marker = STYLE.get(name, ("black", "x"))
            rates = [s["rate"] for s in steps]
            p99 = [max(s["p99_ms"] or 0.01, 0.01) for s in steps]
            ax.plot(rates, p99, color=colour, marker=marker, label=name)
            fails = [(s["rate"], max(s["p99_ms"] or 0.01, 0.01)) for s in steps
                     if not s["passed"]]
            if fails:
                ax.scatter(*zip(*fails, strict=True), s=90, facecolors="none",
                           edgecolors="black", zorder=5)
        ax.axhline(100, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"W1: S = {int(size):,} subscribers")
        ax.set_xlabel("offered rate (messages/s)")
        ax.set_ylabel("p99 end-to-end latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="circled: failed step", title_fontsize=7)
    if w2:
        ax = axes[panels - 1]
        for name, per in w2.items():
            # At the clients actually joined: a join cut off short has fewer.
            points = sorted((e.get("live") or int(n), e["broadcast_to_last_ms"])
                            for n, e in per.items()
                            if e and e.get("broadcast_to_last_ms") is not None)
            if points:
                colour, marker = STYLE.get(name, ("black", "x"))
                ax.plot(*zip(*points, strict=True), color=colour, marker=marker, label=name)
        ax.set_title("W2: one broadcast to the last of N clients")
        ax.set_xlabel("joined clients N")
        ax.set_ylabel("time to reach the last client (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    machine = results.get("machine", {})
    fig.suptitle(f"zchat-bench, {results.get('started', '')}\n{machine.get('cpu', '?')}, "
                 f"{machine.get('cores', '?')} cores", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def markdown(results: dict[str, Any]) -> str:
    """The W1 figures as the README's Markdown tables.

    Rates and ratios; CPU per message; p99 (ms) at half each system's
    highest rate (``p99 @ rate``).
    """
    w1 = results.get("w1", {})
    ratios = results.get("ratios") or summarize(results)
    generator = results.get("generator", {})
    names = list(w1)
    sizes = sorted({s for per in w1.values() for s in per}, key=int)
    head = ["S", *names, "generator into a sink"]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for size in sizes:
        cells = [f"{int(size):,}"]
        for name in names:
            entry = w1[name].get(size) or {}
            best = entry.get("best") or {}
            ratio = ratios["w1"].get(size, {}).get(name, {}).get("of_ceiling")
            if not best:
                cells.append("-")
                continue
            cell = f"{best['rate']:,}"
            if name != "ceiling" and ratio is not None:
                cell += f" ({ratio:.2f})"
            if best.get("generator_bound"):
                cell += " generator-bound"
            cells.append(cell)
        cap = generator.get(size) or {}
        cells.append(f"{_fmt(cap.get('max_publish_rate'), ',')} msg/s, "
                     f"{_fmt(cap.get('max_deliveries_per_s'), ',')} deliveries/s")
        lines.append("| " + " | ".join(cells) + " |")
    # CPU per message falls as the rate rises (libzmq writes more per system
    # call, the broker drains more per pass), so systems are compared at one
    # rate: the highest that every one of them ran with all deliveries made.
    head = ["S", "at msg/s", *names, "generator"]
    cpu = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for size in sizes:
        steps = {name: {st["rate"]: st for st in (w1[name].get(size) or {}).get("steps", [])
                        if st.get("delivery_ratio", 0) >= 0.999}
                 for name in names}
        common = set.intersection(*(set(by) for by in steps.values())) if steps else set()
        if not common:
            continue
        rate = max(common)
        cells = [f"{int(size):,}", f"{rate:,}"]
        gen = []
        for name in names:
            step = steps[name][rate]
            cells.append(_fmt(step.get("system_us_per_msg"), ",.0f"))
            if step.get("generator_us_per_delivery") is not None:
                gen.append(step["generator_us_per_delivery"] * int(size))
        cells.append(f"{min(gen):,.0f}-{max(gen):,.0f}" if gen else "-")
        cpu.append("| " + " | ".join(cells) + " |")
    head = ["S", *names]
    half = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for size in sizes:
        half.append("| " + " | ".join(
            [f"{int(size):,}", *(_at_half(w1[name].get(size) or {}) for name in names)]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(cpu) + "\n\n" + "\n".join(half)

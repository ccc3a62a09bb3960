"""The simulation behind docs/SCALING.md's sharding figures (deterministic).

Rooms are placed on K sequencing brokers by consistent hashing of the
folded room name (SHA-256, V virtual nodes per broker). Room sizes follow a
Zipf law (a few big rooms, many small ones), as chat networks' do. For each
K and V it prints the busiest broker's load over the mean, counted in rooms
and in members (what costs a broker: fan-out and requests scale with
members), and the share of rooms that move when one broker is added.

    python docs/shard_sim.py
"""

from __future__ import annotations

import bisect
import hashlib
import random
import statistics

ROOMS = 20_000
ZIPF_S = 1.1
MAX_MEMBERS = 50_000
SEED = 13


def point(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


class Ring:
    """Consistent hashing: a broker owns the arc before each of its V points."""

    def __init__(self, brokers: list[str], vnodes: int) -> None:
        pairs = sorted((point(f"{b}#{i}"), b) for b in brokers for i in range(vnodes))
        self.points = [p for p, _ in pairs]
        self.owners = [b for _, b in pairs]

    def owner(self, room: str) -> str:
        i = bisect.bisect(self.points, point(room)) % len(self.points)
        return self.owners[i]

    def walk(self, room: str) -> list[str]:
        """Brokers in ring order from the room's point (the first is ``owner``)."""
        i = bisect.bisect(self.points, point(room))
        seen: list[str] = []
        for j in range(len(self.points)):
            broker = self.owners[(i + j) % len(self.points)]
            if broker not in seen:
                seen.append(broker)
        return seen


def bounded(ring: Ring, brokers: list[str], table: list[tuple[str, int]],
            slack: float) -> dict[str, int]:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018),
    weighted by members: a room goes to the first broker along the ring whose
    load stays under ``slack`` times the mean, biggest rooms first."""
    cap = slack * sum(size for _, size in table) / len(brokers)
    load = dict.fromkeys(brokers, 0)
    for name, size in sorted(table, key=lambda item: -item[1]):
        for broker in ring.walk(name):
            if load[broker] + size <= cap or load[broker] == 0:
                load[broker] += size
                break
        else:
            load[min(load, key=load.__getitem__)] += size
    return load


def rooms() -> list[tuple[str, int]]:
    rng = random.Random(SEED)
    weights = [1 / (rank ** ZIPF_S) for rank in range(1, ROOMS + 1)]
    scale = MAX_MEMBERS / weights[0]
    names = [f"room-{rng.getrandbits(48):012x}" for _ in range(ROOMS)]
    return [(name, max(1, round(w * scale))) for name, w in zip(names, weights, strict=True)]


def main() -> None:
    table = rooms()
    total = sum(size for _, size in table)
    print(f"{ROOMS} rooms, {total} memberships, biggest room {table[0][1]} "
          f"({100 * table[0][1] / total:.1f}% of all)")
    print("K   V    max/mean rooms  max/mean members  bounded 1.25  "
          "moved on adding one (ideal 1/(K+1))")
    for k in (2, 4, 8, 16):
        brokers = [f"broker-{i}" for i in range(k)]
        for v in (1, 16, 64, 256):
            ring = Ring(brokers, v)
            by_rooms = dict.fromkeys(brokers, 0)
            by_members = dict.fromkeys(brokers, 0)
            placed = {}
            for name, size in table:
                owner = ring.owner(name)
                placed[name] = owner
                by_rooms[owner] += 1
                by_members[owner] += size
            bigger = Ring([*brokers, f"broker-{k}"], v)
            moved = sum(1 for name, _ in table if bigger.owner(name) != placed[name])
            capped = bounded(ring, brokers, table, 1.25)
            mean = statistics.mean(by_members.values())
            print(f"{k:<3} {v:<4} {max(by_rooms.values()) / statistics.mean(by_rooms.values()):>14.2f}"
                  f"  {max(by_members.values()) / mean:>16.2f}"
                  f"  {max(capped.values()) / mean:>12.2f}"
                  f"  {moved / ROOMS:>10.3f} ({1 / (k + 1):.3f})")


if __name__ == "__main__":
    main()
